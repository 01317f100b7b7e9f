"""SentencePiece: Megatron's ``SentencePieceTokenizer`` and ``GPTSentencePieceTokenizer``.

``SentencePieceTokenizer`` (as Megatron-LM's, which follows NeMo) adds special tokens after the
model's pieces when the model lacks them: ``<CLS> <SEP> <EOD> <MASK>``, then the model's pad, bos
and eos pieces (``<PAD>``/``<BOS>``/``<EOS>`` when the model disables them), then
``<extra_id_0..n-1>``. Those tokens written in the text are encoded as their single id; the text
between them goes through SentencePiece. ``eod`` is ``<EOD>``.

``GPTSentencePieceTokenizer`` is the plain model: no added tokens, ``eod`` = the model's eos id.
"""

import re

from megatron.errors import UserError
from megatron.tokenizer._files import require_file
from megatron.tokenizer.abstract import AbstractTokenizer


def load_sentencepiece(model_file):
    import sentencepiece

    model_file = require_file(model_file, "--tokenizer-model")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load(model_file)
    except (OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--tokenizer-model {model_file}: not a SentencePiece model ({first})") \
            from None
    return processor


class _SentencePieceBase(AbstractTokenizer):
    """Shared vocab handling over a ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, model_file, *more_ctor_args):
        self._sp = load_sentencepiece(model_file)
        super().__init__(model_file, *more_ctor_args)
        self._vocab = {}
        self._inv_vocab = {}
        for idx in range(self._sp.get_piece_size()):
            piece = self._sp.id_to_piece(idx)
            self._vocab[piece] = idx
            self._inv_vocab[idx] = piece

    def _piece_or(self, idx, fallback):
        """The model's piece for ``idx``, or ``fallback`` when the model disables it (id -1)."""
        if 0 <= idx < self._sp.get_piece_size():
            return self._sp.id_to_piece(idx)
        return fallback

    @property
    def vocab_size(self):
        return len(self._vocab)

    @property
    def vocab(self):
        return self._vocab

    @property
    def inv_vocab(self):
        return self._inv_vocab

    @property
    def encoder(self):
        return self._vocab

    @property
    def decoder(self):
        return self._inv_vocab


class SentencePieceTokenizer(_SentencePieceBase):
    """Megatron's SentencePieceTokenizer (special tokens added, ``eod`` = ``<EOD>``)."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_file, vocab_extra_ids=0):
        super().__init__(model_file, vocab_extra_ids)
        self._special = {}  # token -> id, in the order Megatron adds them
        self._cls_id = self._add_special("<CLS>")
        self._sep_id = self._add_special("<SEP>")
        self._eod_id = self._add_special("<EOD>")
        self._mask_id = self._add_special("<MASK>")
        self._pad_id = self._add_special(self._piece_or(self._sp.pad_id(), "<PAD>"))
        self._bos_id = self._add_special(self._piece_or(self._sp.bos_id(), "<BOS>"))
        self._eos_id = self._add_special(self._piece_or(self._sp.eos_id(), "<EOS>"))
        self._extra_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for token in self._extra_tokens:
            self._add_special(token)
        self._inv_special = {idx: token for token, idx in self._special.items()}
        # Leftmost match wins; at one position the earliest-added token wins (regex alternation
        # order), which is how Megatron's scan breaks ties too.
        self._special_re = re.compile("|".join(re.escape(t) for t in self._special))

    def _add_special(self, token):
        if token not in self._vocab:
            idx = len(self._vocab)
            self._vocab[token] = idx
            self._inv_vocab[idx] = token
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    def tokenize(self, text):
        ids = []
        start = 0
        for match in self._special_re.finditer(text):
            ids.extend(self._sp.encode(text[start:match.start()], out_type=int))
            ids.append(self._special[match.group()])
            start = match.end()
        ids.extend(self._sp.encode(text[start:], out_type=int))
        return ids

    def tokenize_batch(self, texts):
        texts = list(texts)
        out = [None] * len(texts)
        plain = [i for i, t in enumerate(texts) if not self._special_re.search(t)]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], out_type=int)):
            out[i] = ids
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self.tokenize(text)
        return out

    def detokenize(self, token_ids):
        # Megatron's layout: each special token surrounded by single spaces.
        token_ids = [int(i) for i in token_ids]
        text = ""
        last = 0
        for pos, idx in enumerate(token_ids):
            if idx in self._inv_special:
                text += self._sp.decode(token_ids[last:pos]) + " " + self._inv_special[idx] + " "
                last = pos + 1
        return text + self._sp.decode(token_ids[last:])

    @property
    def cls(self):
        return self._cls_id

    @property
    def sep(self):
        return self._sep_id

    @property
    def pad(self):
        return self._pad_id

    @property
    def mask(self):
        return self._mask_id

    @property
    def bos(self):
        return self._bos_id

    @property
    def eos(self):
        return self._eos_id

    @property
    def eod(self):
        return self._eod_id

    @property
    def additional_special_tokens_ids(self):
        return [self._vocab[t] for t in self._extra_tokens]


class GPTSentencePieceTokenizer(_SentencePieceBase):
    """The SentencePiece model as is; ``eod`` = ``eos`` = the model's eos id."""

    tokenizer_type = "GPTSentencePieceTokenizer"

    def __init__(self, model_file):
        super().__init__(model_file)
        if self._sp.eos_id() < 0:
            raise UserError(f"--tokenizer-model {model_file}: the SentencePiece model has no eos "
                            f"piece, which GPTSentencePieceTokenizer uses as end-of-document")

    def tokenize(self, text):
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts):
        return self._sp.encode(list(texts), out_type=int)

    def detokenize(self, token_ids):
        return self._sp.decode([int(i) for i in token_ids])

    # Megatron returns -1 for the BERT-only tokens of this type.
    @property
    def cls(self):
        return -1

    @property
    def sep(self):
        return -1

    @property
    def mask(self):
        return -1

    @property
    def pad(self):
        return self._sp.pad_id()

    @property
    def bos(self):
        return self._sp.bos_id()

    @property
    def eos(self):
        return self._sp.eos_id()

    @property
    def eod(self):
        return self._sp.eos_id()
