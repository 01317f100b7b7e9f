"""Tokenizer backends of tools/preprocess_data.py (``--tokenizer-backend auto|fast|hf``).

Both turn a list of texts into a ragged array: every text's ids back to back (``flat``) and the
number of ids of each text (``lengths``), so the output assembly never builds a Python list per
token.

* ``hf``: the Megatron tokenizer itself (HF tokenizers, sentencepiece): the reference. A text
  longer than ``max_piece_chars`` is encoded in pieces cut where the tokenizer's pre-tokenizer
  is known to cut anyway (before whitespace that follows a non-space character; byte-level BPE
  and WordPiece only), so one 50 MB document does not hold gigabytes of per-token strings.
* ``fast``: gigatoken (a compiled BPE tokenizer, ``pip install 'megatron-ltd[fast]'``) built
  from the same tokenizer, for byte-level BPE (GPT2BPETokenizer, HFTokenizer tokenizer.json
  BPE). SentencePiece models stay on ``hf``: gigatoken 0.10's SentencePiece normalizer is not
  sentencepiece's (see ``_NOT_IDENTICAL``). gigatoken was chosen by measurement
  (BENCHMARKS.md): end to end on the benchmark corpus the tool runs about 23x faster per core
  than with HF tokenizers; it releases the GIL, splits huge documents at pretoken-safe
  boundaries itself and returns one flat buffer plus offsets.

``choose_backend`` builds the fast backend when asked (or when ``auto`` and it is installed and
supports the tokenizer) and checks it against the reference on fixed probe strings and the
first documents of the run; any difference means the reference is used (``auto``, with one
warning) or the run stops (``fast``).
"""

import importlib.util
import itertools
import re
import sys

import numpy as np

from megatron.errors import UserError

BACKENDS = ("auto", "fast", "hf")

#: Tokenizer types whose pre-tokenizer never merges across a whitespace that follows a
#: non-space character, so texts may be cut there and encoded piece by piece.
_CUTTABLE = ("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase")

#: Tokenizer types gigatoken supports but does not reproduce exactly, and why.
_NOT_IDENTICAL = {
    kind: "its SentencePiece normalizer differs from sentencepiece's (e.g. U+0085, and "
          "U+200D after a combining accent, under nmt_nfkc; found by the property test in "
          "tests/test_preprocess_backends.py)"
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")}

#: Edge cases every run checks the fast backend on, beside its first documents.
PROBES = (
    "", " ", "a", "Hello world", "  leading, trailing and   inner   spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand\u00a0no-break\u2003em\u3000ideographic spaces",
    "emoji \U0001F600\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467 "
    "flags \U0001F1EB\U0001F1F7",
    "Unicode: \u00fcber na\u00efve \u00df \u0130stanbul \ufb01le e\u0301 \u1e9b\u0323",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631"
    "\u0628\u064a\u0629 \u0928\u092e\u0938\u094d\u0924\u0947",
    "control \x00\x01\x07\x1b[0m\x1f\x7f\x85 chars",
    "<|endoftext|> and [CLS] [SEP] <s></s> <unk> written in the text",
    "numbers 1234567890 3.14159 -2e10 0x1F 1,000,000",
    "contractions: it's I'm we'll they've don't she'd O'Neil 'quoted'",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    "w" * 3000 + " " + "ab" * 1500,
    "\u00e9" * 700 + "\U0001F600" * 300,
)


def _ragged(lists):
    """``(flat, lengths)`` of a list of id lists."""
    lengths = np.fromiter((len(ids) for ids in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64,
                       count=int(lengths.sum()))
    return flat, lengths


#: A space or newline after a non-whitespace character: byte-level BPE (GPT-2's regex) and
#: WordPiece pre-tokenizers always cut there, so encoding the pieces gives the same ids.
_CUT = re.compile(r"(?<=\S)[ \n]")


def cut_points(text, max_chars):
    """Offsets cutting ``text`` into pieces of about ``max_chars`` characters (more when no cut
    place is near), each just before a space or newline that follows a non-space."""
    cuts, pos = [], max_chars
    while pos < len(text):
        found = _CUT.search(text, pos)
        if found is None:
            break
        cuts.append(found.start())
        pos = found.start() + max_chars
    return cuts


class ReferenceBackend:
    """The Megatron tokenizer's own ``tokenize_batch`` (``--tokenizer-backend hf``).

    Texts are encoded in batches of at most about ``max_piece_chars`` characters, each turned
    into arrays at once: the library's per-token objects (HF Encodings, Python ints) never
    exist for more than one batch. A longer text is cut into pieces (``cut_points``) when the
    tokenizer type allows it, else encoded whole.
    """

    name = "hf"

    def __init__(self, tokenizer, max_piece_chars=1 << 20):
        self.tokenizer = tokenizer
        self.max_piece_chars = max_piece_chars
        self.cuttable = tokenizer.tokenizer_type in _CUTTABLE

    def encode(self, texts):
        limit = self.max_piece_chars
        if sum(map(len, texts)) <= limit:  # the usual case: one batch
            return _ragged(self.tokenizer.tokenize_batch(texts))
        flats, lengths, batch, size = [], [], [], 0
        for text in texts:
            bounds = [0, len(text)]
            if self.cuttable and len(text) > limit:
                bounds[1:1] = cut_points(text, limit)
            if len(bounds) > 2 or size + len(text) > limit:
                self._flush(batch, flats, lengths)
                batch, size = [], 0
            if len(bounds) > 2:  # one long text: its pieces, summed into one length
                pieces = [self._encode_one(text[a:b]) for a, b in zip(bounds, bounds[1:])]
                flats.extend(pieces)
                lengths.append(np.array([sum(map(len, pieces))]))
            else:
                batch.append(text)
                size += len(text)
        self._flush(batch, flats, lengths)
        return (np.concatenate(flats) if flats else np.zeros(0, np.int64),
                np.concatenate(lengths))

    def _encode_one(self, text):
        return np.asarray(self.tokenizer.tokenize(text), dtype=np.int64)

    def _flush(self, batch, flats, lengths):
        if batch:
            flat, batch_lengths = _ragged(self.tokenizer.tokenize_batch(batch))
            flats.append(flat)
            lengths.append(batch_lengths)


class GigatokenBackend:
    """gigatoken built from the same tokenizer (``--tokenizer-backend fast``).

    ``threads``: encode on gigatoken's own thread pool (one process); False in forked worker
    processes, where each worker is one thread (and a pool made before a fork would hang).
    """

    name = "fast"

    def __init__(self, tokenizer, threads):
        import gigatoken

        self.threads = threads
        self.version = getattr(gigatoken, "__version__", None) or _version("gigatoken")
        kind = tokenizer.tokenizer_type
        try:
            if kind in _NOT_IDENTICAL:
                raise ValueError(_NOT_IDENTICAL[kind])
            if kind not in ("GPT2BPETokenizer", "HFTokenizer"):
                raise ValueError(f"{kind} is not byte-level BPE")
            # The loaded HF object (tokenizers.Tokenizer / transformers tokenizer): gigatoken
            # reads its model, pre-tokenizer and added tokens from it.
            self._tok = gigatoken.Tokenizer(tokenizer._tok)
        except Exception as err:  # gigatoken refuses models it cannot reproduce
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnsupportedTokenizer(f"gigatoken {self.version} cannot encode "
                                       f"--tokenizer-type {kind}: {first}") from None

    def encode(self, texts):
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        layout = self._tok.encode_batch(list(texts), parallel=self.threads).layout
        offsets = np.asarray(layout.offsets.data)  # ListOffsetArray of uint32 ids
        flat = np.asarray(layout.content.data)[offsets[0]:offsets[-1]]
        return flat, np.diff(offsets)


class UnsupportedTokenizer(Exception):
    """The fast backend cannot encode this tokenizer (not installed, or another model kind)."""


def _version(package):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"


def first_difference(backend, tokenizer, texts):
    """The first text ``backend`` encodes differently from ``tokenizer.tokenize``, or None.

    One text at a time on the reference side: its batch call would start HF tokenizers' thread
    pool in this process, which then warns and turns itself off in forked workers."""
    flat, lengths = backend.encode(texts)
    for text, ids in zip(texts, np.split(flat, np.cumsum(lengths)[:-1])):
        if ids.tolist() != list(tokenizer.tokenize(text)):
            return text
    return None


def choose_backend(choice, tokenizer, sample_texts, threads, warn=None):
    """``(backend, note)``: the backend to use for ``--tokenizer-backend choice``.

    ``fast`` and ``auto`` build gigatoken and check it on ``PROBES`` and ``sample_texts`` (the
    run's first documents) against the reference; ``auto`` falls back to ``hf`` with one
    warning if gigatoken is missing, cannot encode this tokenizer or differs; ``fast`` stops.
    """
    if choice not in BACKENDS:
        raise UserError(f"--tokenizer-backend {choice}: choose one of {', '.join(BACKENDS)}")
    reference = ReferenceBackend(tokenizer)
    if choice == "hf":
        return reference, "hf (the tokenizer's own library)"
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    if importlib.util.find_spec("gigatoken") is None:
        if choice == "fast":
            raise UserError("--tokenizer-backend fast: gigatoken is not installed (pip install "
                            "'megatron-ltd[fast]' or pip install gigatoken)")
        return reference, "hf (gigatoken is not installed: pip install 'megatron-ltd[fast]')"
    try:
        fast = GigatokenBackend(tokenizer, threads=False)  # no thread pool before any fork
    except UnsupportedTokenizer as err:
        if choice == "fast":
            raise UserError(f"--tokenizer-backend fast: {err}") from None
        return reference, f"hf ({err})"
    differing = first_difference(fast, tokenizer, list(PROBES) + list(sample_texts))
    if differing is not None:
        shown = differing if len(differing) <= 60 else differing[:57] + "..."
        msg = (f"gigatoken {fast.version} encodes {shown!r} differently from "
               f"{tokenizer.tokenizer_type}'s reference tokenizer")
        if choice == "fast":
            raise UserError(f"--tokenizer-backend fast: {msg}; use --tokenizer-backend hf")
        warn(f"{msg}; using the reference (--tokenizer-backend hf) for this run")
        return reference, "hf (the fast backend differed)"
    fast.threads = threads
    return fast, f"fast (gigatoken {fast.version}, checked against the reference on the " \
                 f"first {len(sample_texts)} texts)"
