"""Tokenize loose JSON (one object per line) into Megatron .bin/.idx datasets.

Example (GPT-2 BPE, as Megatron-LM)::

    python tools/preprocess_data.py --input pile_00.jsonl.zst --output-prefix data/pile \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --append-eod --workers 8

writes ``data/pile_text_document.bin/.idx``: one document per JSON line, one sequence per
document, EOD appended to the last sequence of every non-empty document and counted in its size.

For BERT, split sentences (Megatron's BERT datasets need one sequence per sentence)::

    python tools/preprocess_data.py --input wiki.jsonl.zst --output-prefix data/wiki \\
        --tokenizer-type BertWordPieceLowerCase --vocab-file bert-vocab.txt \\
        --split-sentences --workers 8

writes ``data/wiki_text_sentence.bin/.idx``: one sequence per non-empty sentence, ``doc_idx``
marking where each document starts (an empty document adds a boundary and no sequence), with
``--append-eod`` the EOD counted in the last sentence's size, as Megatron-LM. Sentences are
split by ``--sentence-splitter``: ``sentencex`` (default; rule-based, compiled, ships its rules,
offline and deterministic), ``nltk`` (Megatron's NLTK punkt, if nltk and its punkt data are
installed; never downloaded), ``simple`` (a regex) or ``auto`` (nltk if installed, else
sentencex). The sentences of a whole chunk of documents are tokenized in one batch call. As in
Megatron-LM, a key whose value is an array of strings is a document already split into
sentences (one sequence per non-empty element, not split again), e.g. Megatron's ``*_ss.json``.

Input is streamed (.jsonl/.json, .zst, .gz; never decompressed to disk), cut into chunks of many
lines (memory is bounded whatever the input size), and tokenized by ``--workers`` processes
(tools/preprocess_workers.py: a worker that dies is an error, never a hang); results are
written in input order, so the output is byte-identical for any number of workers. Outputs are
written under temporary names and renamed only when complete: after an error or Ctrl-C nothing
exists under the final names, and the temporaries of a run killed with -9 are removed by the
next run on the same prefix.

Tokenization goes through ``--tokenizer-backend`` (tools/preprocess_backends.py): ``fast``
(gigatoken, compiled byte-level BPE, ``pip install 'megatron-ltd[fast]'``), ``hf`` (the
tokenizer's own library) or ``auto`` (fast when installed, supported and identical to the
reference on fixed edge cases and the run's first documents; else hf, with one warning if it
differed). Both give the same bytes.

``--partitions`` is accepted for command-line compatibility with Megatron-LM but changes nothing:
Megatron splits the input into N files, encodes them separately and merges the results, which
gives the same bytes as one pass; here the single streaming pass already uses every worker.
"""

import argparse
import collections
import gzip
import itertools
import json
import os
import re
import signal
import sys
import threading
import time

if __package__ in (None, ""):  # run as `python tools/preprocess_data.py`: import from the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype
from megatron.errors import UserError, run_main
from tools.preprocess_backends import BACKENDS, ReferenceBackend, choose_backend
from tools.preprocess_workers import OrderedWorkers

_READ_BLOCK = 1 << 20  # bytes read from an input file at a time


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="input file (.jsonl, .json, .jsonl.zst, .zst, .gz), a glob, or a comma "
                        "separated list of them; one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract; nested keys with dots, e.g. meta.pile_set_name")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence, split by --sentence-splitter")
    g.add_argument("--sentence-splitter", default=DEFAULT_SENTENCE_SPLITTER,
                   choices=SENTENCE_SPLITTERS,
                   help="sentencex: rule-based, offline, deterministic (default); nltk: "
                        "Megatron's NLTK punkt, needs nltk and its punkt data installed (never "
                        "downloaded); simple: a dependency-free regex splitter; auto: nltk if "
                        "installed with its data, else sentencex, else simple")
    g.add_argument("--keep-newlines", action="store_true",
                   help="keep newlines between sentences when splitting")
    g.add_argument("--lang", default="english",
                   help="language for the sentence splitter: an NLTK punkt name (english, "
                        "german, ...) or, for sentencex, an ISO 639-1 code")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first one")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   help="GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase, "
                        "SentencePieceTokenizer, GPTSentencePieceTokenizer, NullTokenizer, ...")
    g.add_argument("--vocab-file", default=None, help="vocabulary file")
    g.add_argument("--merge-file", default=None, help="BPE merge file")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece model file")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (NullTokenizer)")
    g.add_argument("--tokenizer-backend", default="auto", choices=BACKENDS,
                   help="fast: gigatoken, a compiled tokenizer (pip install "
                        "'megatron-ltd[fast]'), for byte-level BPE (GPT2BPETokenizer, "
                        "HFTokenizer BPE); checked "
                        "against the reference on the first documents of every run. hf: the "
                        "tokenizer's own library. auto: fast when installed, supported and "
                        "identical, else hf")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every non-empty document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx (_sentence when splitting)")
    g.add_argument("--dataset-impl", default="mmap", help="only 'mmap' (MMIDIDX) is written")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes; 1: in this process, where the fast backend uses "
                        "its own threads on every core (best on few cores); N: N single-"
                        "threaded worker processes (many cores)")
    g.add_argument("--partitions", type=int, default=1,
                   help="accepted for Megatron compatibility; output does not depend on it")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="print progress every this many documents")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20,
                   help="input bytes per work item sent to a worker")
    args = p.parse_args(argv)

    if args.dataset_impl != "mmap":
        raise UserError(f"--dataset-impl {args.dataset_impl}: only 'mmap' (MMIDIDX) is "
                        f"supported; the legacy lazy/cached formats are not written")
    for flag in ("workers", "partitions", "log_interval", "chunk_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, "
                            f"got {getattr(args, flag)}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserError(f"--json-keys {' '.join(args.json_keys)}: keys repeat")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not "
                        f"exist")
    return args


def resolve_inputs(spec):
    """Input files named by ``--input``: comma separated paths and globs, in the order given."""
    paths = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        if re.search(r"[*?\[]", part):
            import glob

            matches = sorted(m for m in glob.glob(part) if os.path.isfile(m))
            if not matches:
                raise UserError(f"--input {part}: no file matches this pattern")
            paths.extend(matches)
        elif os.path.isdir(part):
            raise UserError(f"--input {part}: is a directory; give files or a glob "
                            f"such as {os.path.join(part, '*.jsonl')}")
        elif not os.path.isfile(part):
            raise UserError(f"--input {part}: input file not found")
        else:
            paths.append(part)
    if not paths:
        raise UserError("--input: no input file given")
    return paths


# ---------------------------------------------------------------------------------------------
# Streaming input
# ---------------------------------------------------------------------------------------------

def _zstd_blocks(raw, path):
    """Decompressed blocks of a (possibly multi-frame) .zst stream; errors if truncated."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, started = dctx.decompressobj(), False
    while True:
        data = raw.read(_READ_BLOCK)
        if not data:
            break
        while data:
            started = True
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:  # frame finished: anything left belongs to the next frame
                data = dobj.unused_data
                dobj, started = dctx.decompressobj(), False
            else:
                data = b""
    if started:
        raise UserError(f"{path}: zstd stream is truncated (last frame incomplete)")


def _plain_blocks(fileobj):
    while True:
        data = fileobj.read(_READ_BLOCK)
        if not data:
            return
        yield data


Chunk = collections.namedtuple("Chunk", "path first_line data input_pos")
Chunk.__doc__ = """Whole lines of one input file: ``data`` (bytes) starts at line ``first_line``;
``input_pos`` is how many (compressed) input bytes had been read when it was cut."""


def read_chunks(paths, chunk_bytes):
    """Cut the inputs into work items of about ``chunk_bytes`` bytes of whole lines.

    Memory is bounded by ``chunk_bytes`` plus the longest line, whatever the input size.
    """
    import zstandard

    done = 0
    for path in paths:
        with open(path, "rb") as raw:
            if path.endswith(".zst"):
                blocks = _zstd_blocks(raw, path)
            elif path.endswith(".gz"):
                blocks = _plain_blocks(gzip.GzipFile(fileobj=raw, mode="rb"))
            else:
                blocks = _plain_blocks(raw)
            buf, line = bytearray(), 1
            try:
                for block in blocks:
                    search = max(chunk_bytes, len(buf)) - 1  # no newline before: in the new block
                    buf += block
                    while len(buf) >= chunk_bytes:
                        cut = buf.find(b"\n", search)
                        if cut < 0:
                            break  # one line longer than a chunk: it goes on in the next block
                        data = bytes(buf[:cut + 1])
                        del buf[:cut + 1]
                        yield Chunk(path, line, data, done + raw.tell())
                        line += data.count(b"\n")
                        search = chunk_bytes - 1
            except zstandard.ZstdError as err:
                raise UserError(f"{path}: corrupt zstd data after line {line}: {err}") from None
            except (OSError, EOFError) as err:  # gzip: BadGzipFile is an OSError
                raise UserError(f"{path}: cannot read after line {line}: {err}") from None
            if buf:
                yield Chunk(path, line, bytes(buf), done + raw.tell())
            done += os.fstat(raw.fileno()).st_size


# ---------------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u201d\u2019]*(\s+)")
_OPENERS = "\"'([\u201c\u2018"


def simple_split_sentences(text, keep_newlines=False):
    """Split after . ! ? (plus closing quotes) when whitespace and a capital or digit follow.

    Deterministic and dependency-free. Sentences are stripped; with ``keep_newlines`` the
    newlines that separated a sentence from the next one are kept at its end.
    """
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        nxt = m.end()
        if nxt < len(text) and text[nxt] in _OPENERS:
            nxt += 1
        if nxt >= len(text) or not (text[nxt].isupper() or text[nxt].isdigit()):
            continue
        sentence = text[start:m.start(1)].strip()
        if sentence:
            if keep_newlines:
                sentence += "\n" * m.group(1).count("\n")
            sentences.append(sentence)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


#: ``--sentence-splitter`` choices; the default is deterministic and needs no download.
SENTENCE_SPLITTERS = ("sentencex", "nltk", "simple", "auto")
DEFAULT_SENTENCE_SPLITTER = "sentencex"

#: NLTK punkt's language names (Megatron's ``--lang``) -> the ISO 639-1 codes sentencex takes.
_ISO_LANG = {"english": "en", "german": "de", "french": "fr", "spanish": "es", "italian": "it",
             "portuguese": "pt", "dutch": "nl", "russian": "ru", "polish": "pl", "czech": "cs",
             "danish": "da", "estonian": "et", "finnish": "fi", "greek": "el",
             "norwegian": "no", "slovene": "sl", "swedish": "sv", "turkish": "tr",
             "malayalam": "ml"}


def _from_segments(text, segments, keep_newlines):
    """Sentences from consecutive segments that cover ``text``: stripped, blank ones dropped;
    with ``keep_newlines`` the newlines up to the next sentence are kept at a sentence's end."""
    out, ends, pos = [], [], 0
    for seg in segments:
        stripped = seg.strip()
        if stripped:
            out.append(stripped)
            ends.append(pos + len(seg.rstrip()))
        pos += len(seg)
    if keep_newlines:
        for i in range(len(out)):
            gap_end = ends[i + 1] - len(out[i + 1]) if i + 1 < len(out) else len(text)
            newlines = text.count("\n", ends[i], gap_end)
            if newlines:
                out[i] += "\n" * newlines
    return out


def _sentencex_splitter(lang, keep_newlines):
    try:
        import sentencex
    except ImportError:
        return None
    code = _ISO_LANG.get(lang.lower(), lang)

    def split(text):
        return _from_segments(text, sentencex.segment(code, text), keep_newlines)

    try:
        from importlib.metadata import version

        ver = version("sentencex")
    except Exception:  # installed without metadata
        ver = "?"
    return split, f"sentencex {ver} ({code})"


def _nltk_splitter(lang, keep_newlines):
    """NLTK punkt from installed data (punkt_tab, else the old punkt pickle); never downloads."""
    try:
        import nltk
    except ImportError:
        return None
    punkt = None
    try:  # nltk >= 3.8.2: the pickle-free punkt_tab data
        from nltk.tokenize.punkt import PunktTokenizer

        punkt = PunktTokenizer(lang)
    except Exception:
        try:  # older nltk: tokenizers/punkt/<lang>.pickle, as Megatron loads it
            punkt = nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
        except Exception:
            return None

    def split(text):
        spans = list(punkt.span_tokenize(text))
        out = []
        for i, (a, b) in enumerate(spans):
            sentence = text[a:b]
            if keep_newlines:
                gap_end = spans[i + 1][0] if i + 1 < len(spans) else len(text)
                sentence += "\n" * text.count("\n", b, gap_end)
            out.append(sentence)
        return out

    return split, f"nltk {getattr(nltk, '__version__', '?')} punkt ({lang})"


def make_sentence_splitter(lang, keep_newlines, name=DEFAULT_SENTENCE_SPLITTER):
    """``(split, description)`` for ``--sentence-splitter name``; ``split(text)`` -> sentences.

    ``sentencex`` (default): rule-based, compiled, ships its rules; the same output on every
    machine with the same sentencex version. ``nltk``: Megatron's NLTK punkt, from data
    already installed (never downloaded). ``simple``: the regex splitter above, no dependency.
    ``auto``: nltk if it and its data are installed, else sentencex, else simple.
    """
    if name not in SENTENCE_SPLITTERS:
        raise UserError(f"--sentence-splitter {name}: choose one of "
                        f"{', '.join(SENTENCE_SPLITTERS)}")
    if name in ("nltk", "auto"):
        made = _nltk_splitter(lang, keep_newlines)
        if made is not None:
            return made
        if name == "nltk":
            raise UserError(f"--sentence-splitter nltk: NLTK or its punkt data for --lang "
                            f"{lang} is not installed (pip install nltk; python -m "
                            f"nltk.downloader punkt_tab); it is never downloaded here. The "
                            f"default, --sentence-splitter sentencex, needs no data")
    if name in ("sentencex", "auto"):
        made = _sentencex_splitter(lang, keep_newlines)
        if made is not None:
            return made
        if name == "sentencex":
            raise UserError("--sentence-splitter sentencex: the sentencex package is not "
                            "installed (pip install 'sentencex>=1.0.32'; it needs Python >= "
                            "3.10); or use --sentence-splitter simple")
    return (lambda text: simple_split_sentences(text, keep_newlines)), "simple"


# ---------------------------------------------------------------------------------------------
# Encoding (runs in the workers)
# ---------------------------------------------------------------------------------------------

_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null", str: "a string"}


def build_tokenizer_from(cfg):
    from megatron.tokenizer import build_tokenizer

    kwargs = {k: cfg[k] for k in ("vocab_file", "merge_file", "tokenizer_model", "vocab_size")
              if cfg[k] is not None}
    return build_tokenizer(cfg["tokenizer_type"], **kwargs)


def _lookup(record, key):
    """``record[key]``, following dots into nested objects; raises KeyError if absent."""
    if key in record:
        return record[key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _invalid_unicode(text, key):
    """What is wrong with ``text`` if it is not valid Unicode (a lone surrogate, from a JSON
    escape such as \\ud800 or CESU-8 bytes ED A0 80), else None. No tokenizer encodes those."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"value of key '{key}' has a lone surrogate U+{ord(text[err.start]):04X} at " \
               f"character {err.start} (not valid Unicode)"
    return None


def document_layout(lengths, sentences_per_doc, eod):
    """Megatron's layout of tokenized documents, from the ragged ids of all their sentences.

    ``lengths``: ids per sentence, the sentences of all documents in order;
    ``sentences_per_doc``: how many of them each document has. Empty sentences are dropped; with
    ``eod`` it closes every document that kept a sentence and is counted in its last one.
    Returns ``(eod_positions, seq_lengths, seqs_per_doc)``: where the EOD ids go in the flat
    ids (``np.insert`` positions), the kept sequences' lengths and the sequences per document.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = lengths > 0
    doc_of = np.repeat(np.arange(len(sentences_per_doc)), sentences_per_doc)
    seqs_per_doc = np.bincount(doc_of[keep], minlength=len(sentences_per_doc))
    seq_lengths = lengths[keep]
    if eod is None:
        return np.zeros(0, np.int64), seq_lengths, seqs_per_doc
    last = (np.cumsum(seqs_per_doc) - 1)[seqs_per_doc > 0]  # each document's last sequence
    positions = np.cumsum(seq_lengths)[last]
    seq_lengths[last] += 1
    return positions, seq_lengths, seqs_per_doc


class Encoder:
    """Turns a chunk of JSON lines into token arrays, one set per JSON key."""

    def __init__(self, cfg, tokenizer, backend):
        self.cfg = cfg
        self.keys = cfg["json_keys"]
        self.tokenizer = tokenizer
        self.backend = backend  # tools/preprocess_backends.py: texts -> ragged ids
        self.dtype = np.dtype(cfg["dtype"])
        self.max_id = np.iinfo(self.dtype).max
        self.eod = self.tokenizer.eod if cfg["append_eod"] else None
        self.split = None
        if cfg["split_sentences"]:
            self.split, _ = make_sentence_splitter(cfg["lang"], cfg["keep_newlines"],
                                                   cfg["sentence_splitter"])

    def parse(self, line):
        """The texts of one line (one per key: a string or a list of them), or a string
        saying what is wrong with the line."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"malformed JSON ({err.msg} at column {err.colno})"
        except ValueError as err:  # invalid UTF-8
            return f"malformed JSON ({err})"
        if not isinstance(record, dict):
            return f"JSON value is {_JSON_TYPES.get(type(record), 'not an object')}, expected " \
                   f"an object"
        texts = []
        for key in self.keys:
            try:
                value = _lookup(record, key)
            except KeyError:
                return f"key '{key}' (--json-keys) not found"
            # A list of strings is a document already split into sentences (one sequence each),
            # as in the *_ss.json files Megatron-LM's --split-sentences step writes.
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                strings = value
            elif isinstance(value, str):
                strings = (value,)
            else:
                return f"value of key '{key}' is {_JSON_TYPES.get(type(value), 'not a string')}" \
                       f", expected a string or an array of strings"
            for text in strings:
                problem = _invalid_unicode(text, key)
                if problem:
                    return problem
            texts.append(value)
        return texts

    def documents(self, chunk):
        """``(columns, bad, error)``: the texts of the chunk's documents, one list per key.

        ``error`` is the first bad line's message unless --skip-bad-lines, then ``bad`` lists
        ``(path:line, problem)`` of the skipped lines.
        """
        columns = [[] for _ in self.keys]
        bad = []
        for i, line in enumerate(chunk.data.split(b"\n")):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not documents
            texts = self.parse(line)
            if isinstance(texts, str):
                where = f"{chunk.path}:{chunk.first_line + i}"
                if not self.cfg["skip_bad_lines"]:
                    return None, bad, f"{where}: {texts}"
                bad.append((where, texts))
                continue
            for column, text in zip(columns, texts):
                column.append(text)
        return columns, bad, None

    def encode(self, chunk):
        """``(docs, bad, error, per_key)``; ``per_key[k] = (tokens, seq_lengths, seqs_per_doc)``."""
        columns, bad, error = self.documents(chunk)
        if error is not None:
            return 0, bad, error, None
        per_key = []
        for column in columns:
            try:
                per_key.append(self.encode_texts(column))
            except UserError as err:
                last = chunk.first_line + chunk.data.count(b"\n", 0, len(chunk.data) - 1)
                return 0, bad, f"{chunk.path} (lines {chunk.first_line}-{last}): {err}", None
        return len(columns[0]) if columns else 0, bad, None, per_key

    def sentences(self, text):
        """A text's sentences: an array value is split already; else --split-sentences."""
        if isinstance(text, list):
            return text
        return self.split(text) if self.split is not None else [text]

    def encode_texts(self, texts):
        """``(tokens, seq_lengths, seqs_per_doc)`` of the documents ``texts``."""
        if self.split is None and all(isinstance(text, str) for text in texts):
            sentences, per_doc = texts, np.ones(len(texts), dtype=np.int64)
        else:
            split = [self.sentences(text) for text in texts]
            sentences = [s for doc in split for s in doc]
            per_doc = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        flat, lengths = self.backend.encode(sentences)
        if flat.size and (int(flat.max()) > self.max_id or int(flat.min()) < 0):
            bad = int(flat.max()) if int(flat.max()) > self.max_id else int(flat.min())
            raise UserError(f"token id {bad} does not fit the output dtype {self.dtype.name}; "
                            f"tokenizer vocab_size is {self.tokenizer.vocab_size}")
        positions, seq_lengths, seqs_per_doc = document_layout(lengths, per_doc, self.eod)
        tokens = flat.astype(self.dtype, copy=False)
        if positions.size:
            tokens = np.insert(tokens, positions, self.eod)
        return tokens, seq_lengths.astype(np.int32), seqs_per_doc


_WORKER_ENCODER = None


def _init_worker(encoder):
    """Runs in each forked worker: it inherits the parent's encoder (nothing is rebuilt)."""
    global _WORKER_ENCODER
    # One thread per worker: --workers sets the parallelism. Without this every worker's HF
    # tokenizer would also start a thread per core (workers x cores threads on big machines).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_ENCODER = encoder


def _encode_in_worker(chunk):
    return _WORKER_ENCODER.encode(chunk)


def _describe_chunk(chunk):
    return f"{chunk.path} from line {chunk.first_line}"


def _sample_texts(encoder, chunk, max_texts=200, max_chars=1 << 18, max_text_chars=1 << 14):
    """The first texts (sentences with --split-sentences) of ``chunk``, bad lines skipped, long
    ones cut short: what the fast backend is checked on before the run."""
    texts, size = [], 0
    lines = chunk.data.split(b"\n") if chunk is not None else []
    for line in lines:
        parsed = encoder.parse(line) if line.strip() else None
        for value in parsed if isinstance(parsed, list) else ():
            for text in encoder.sentences(value):
                texts.append(text[:max_text_chars])
                size += len(texts[-1])
                if len(texts) >= max_texts or size >= max_chars:
                    return texts
    return texts


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def _fmt_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def output_prefixes(output_prefix, json_keys, split_sentences):
    level = "sentence" if split_sentences else "document"
    return {key: f"{output_prefix}_{key}_{level}" for key in json_keys}


def remove_stale_temporaries(prefix, log=print):
    """Delete ``<prefix>.bin.tmp.<pid>``/``.idx.tmp.<pid>`` left by writers that no longer run
    (killed with -9, or a machine that went down); a live writer's files are left alone. The
    pid is of this machine: do not write one prefix from two hosts at once."""
    import glob

    removed = []
    for path in (p for ext in (".bin", ".idx")
                 for p in glob.glob(f"{glob.escape(prefix)}{ext}.tmp.*")):
        pid = path.rsplit(".", 1)[1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed:
        log(f"Removed {len(removed)} stale temporary file(s) of writers that are no longer "
            f"running: {', '.join(removed)}")
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _cpu_seconds():
    """CPU time of this process (all threads) and of its workers that have ended."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    """Run the tool; returns a summary dict. SIGTERM is handled like Ctrl-C (clean up, exit)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv):
    args = get_args(argv)
    paths = resolve_inputs(args.input)
    startup = time.time()
    cfg = {k: getattr(args, k) for k in (
        "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size",
        "json_keys", "append_eod", "split_sentences", "keep_newlines", "lang", "skip_bad_lines",
        "sentence_splitter")}
    tokenizer = build_tokenizer_from(cfg)
    if args.append_eod and getattr(tokenizer, "eod", None) is None:
        raise UserError(f"--append-eod: tokenizer {args.tokenizer_type} has no end-of-document "
                        f"token")
    cfg["dtype"] = best_fitting_dtype(tokenizer.vocab_size).name
    if args.split_sentences:
        splitter = make_sentence_splitter(args.lang, args.keep_newlines,
                                          args.sentence_splitter)[1]
        cfg["sentence_splitter"] = splitter.split()[0]  # 'auto' resolved once, for every worker
        print(f"Splitting sentences with {splitter}", file=sys.stderr)
    elif args.tokenizer_type.startswith("BertWordPiece"):
        print("Are you sure you don't want to split sentences?", file=sys.stderr)
    if args.partitions > 1:
        print(f"--partitions {args.partitions}: the input is streamed through one pool of "
              f"{args.workers} workers; output is the same as with one partition",
              file=sys.stderr)
    prefixes = output_prefixes(args.output_prefix, args.json_keys, args.split_sentences)
    for prefix in prefixes.values():
        remove_stale_temporaries(prefix, log=lambda msg: print(msg, file=sys.stderr))
    total_in = sum(os.path.getsize(p) for p in paths)
    for p in paths:
        print(f"Opening {p}")  # stdout, as Megatron-LM: stderr stays for errors and stats

    builders, pool = {}, None
    docs = nbytes = 0
    tokens = dict.fromkeys(args.json_keys, 0)
    bad_count, bad_first = 0, []
    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(prefix + ".bin", dtype=cfg["dtype"])
        chunks = read_chunks(paths, args.chunk_bytes)
        first = next(chunks, None)
        chunks = itertools.chain([first] if first is not None else [], chunks)
        reader = Encoder(cfg, tokenizer, ReferenceBackend(tokenizer))
        backend, note = choose_backend(args.tokenizer_backend, tokenizer,
                                       _sample_texts(reader, first), threads=args.workers == 1)
        print(f"Tokenizer backend: {note}")  # stdout, as the other notes
        encoder = Encoder(cfg, tokenizer, backend)
        if args.workers == 1:
            results = ((chunk, encoder.encode(chunk)) for chunk in chunks)
        else:
            pool = OrderedWorkers(args.workers, _init_worker, (encoder,), _encode_in_worker)
            results = pool.imap(chunks, ahead=4 * args.workers, describe=_describe_chunk)
        print(f"Time to startup: {time.time() - startup}")
        start, start_cpu = time.time(), _cpu_seconds()
        next_log = args.log_interval
        for chunk, (n_docs, bad, error, per_key) in results:
            if error is not None:
                raise UserError(error)
            bad_count += len(bad)
            bad_first.extend(bad[:max(0, 5 - len(bad_first))])
            for key, (toks, seq_lengths, seqs_per_doc) in zip(args.json_keys, per_key):
                builders[key].add_documents(toks, seq_lengths, seqs_per_doc)
                tokens[key] += toks.size
            docs += n_docs
            nbytes += len(chunk.data)
            if docs >= next_log:
                next_log = (docs // args.log_interval + 1) * args.log_interval
                elapsed = max(time.time() - start, 1e-9)
                line = (f"Processed {docs} documents ({docs / elapsed:.2f} docs/s, "
                        f"{nbytes / elapsed / 1024 / 1024:.2f} MB/s).")
                if total_in:
                    frac = min(chunk.input_pos / total_in, 1.0)
                    eta = elapsed * (1 - frac) / frac if frac > 0 else 0
                    line += f" {100 * frac:.1f}% of input, ETA {_fmt_seconds(eta)}"
                print(line, file=sys.stderr, flush=True)
        if pool is not None:
            pool.close()
            pool = None
        # An empty dataset only fails later, in training: say so now.
        if docs == 0:
            raise UserError(f"--input {args.input}: no documents (the input is empty or has "
                            f"only blank{' or skipped' if bad_count else ''} lines); nothing "
                            f"written")
        for key, count in tokens.items():
            if count == 0:
                raise UserError(f"--input {args.input}: the {docs} documents have no tokens "
                                f"under key '{key}' (every text is empty); nothing written, "
                                f"as training cannot sample from an empty dataset")
        for key, prefix in prefixes.items():
            builders.pop(key).finalize(prefix + ".idx")
    except BaseException:
        if pool is not None:
            pool.kill()
        for builder in builders.values():
            builder.abort()
        raise

    elapsed = max(time.time() - start, 1e-9)
    tokens = sum(tokens.values())
    cpu = _cpu_seconds() - start_cpu
    print(f"Done: {docs} documents, {tokens} tokens, {nbytes / 1024 / 1024:.2f} MB in "
          f"{elapsed:.2f} s ({docs / elapsed:.2f} docs/s, "
          f"{nbytes / elapsed / 1024 / 1024:.2f} MB/s; {cpu:.2f} CPU-s, "
          f"{nbytes / max(cpu, 1e-9) / 1024 / 1024:.2f} MB per CPU-s).", file=sys.stderr)
    if bad_count:
        print(f"Skipped {bad_count} bad lines (--skip-bad-lines); first: "
              + "; ".join(f"{where}: {why}" for where, why in bad_first), file=sys.stderr)
    for prefix in prefixes.values():
        print(f"Wrote {prefix}.bin and {prefix}.idx", file=sys.stderr)
    return {"documents": docs, "tokens": tokens, "bytes": nbytes, "bad_lines": bad_count,
            "seconds": elapsed, "outputs": list(prefixes.values())}


if __name__ == "__main__":
    run_main(main)
