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
from megatron.tokenizer.abstract import DictVocabTokenizer


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


class _SentencePieceBase(DictVocabTokenizer):
    """Shared vocab handling over a ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, model_file, *more_ctor_args):
        self._sp = load_sentencepiece(model_file)
        super().__init__(model_file, *more_ctor_args)
        self._set_vocab({self._sp.id_to_piece(idx): idx
                         for idx in range(self._sp.get_piece_size())})

    def _piece_or(self, idx, fallback):
        """The model's piece for ``idx``, or ``fallback`` when the model disables it (id -1)."""
        if 0 <= idx < self._sp.get_piece_size():
            return self._sp.id_to_piece(idx)
        return fallback

    # Megatron's aliases of vocab and inv_vocab.
    encoder = DictVocabTokenizer.vocab
    decoder = DictVocabTokenizer.inv_vocab


class SentencePieceTokenizer(_SentencePieceBase):
    """Megatron's SentencePieceTokenizer (special tokens added, ``eod`` = ``<EOD>``)."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_file, vocab_extra_ids=0):
        super().__init__(model_file, vocab_extra_ids)
        self._special = {}  # token -> id, in the order Megatron adds them
        self._special_ids = {name: self._add_token(token) for name, token in (
            ("cls", "<CLS>"), ("sep", "<SEP>"), ("eod", "<EOD>"), ("mask", "<MASK>"),
            ("pad", self._piece_or(self._sp.pad_id(), "<PAD>")),
            ("bos", self._piece_or(self._sp.bos_id(), "<BOS>")),
            ("eos", self._piece_or(self._sp.eos_id(), "<EOS>")))}
        self._add_extra_ids(vocab_extra_ids)
        self._inv_special = {idx: token for token, idx in self._special.items()}
        # Leftmost match wins; at one position the earliest-added token wins (regex alternation
        # order), which is how Megatron's scan breaks ties too.
        self._special_re = re.compile("|".join(re.escape(t) for t in self._special))

    def _add_token(self, token):
        """Append ``token`` when absent and treat it as special: matched whole in the text."""
        idx = self._special[token] = super()._add_token(token)
        return idx

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


class GPTSentencePieceTokenizer(_SentencePieceBase):
    """The SentencePiece model as is; ``eod`` = ``eos`` = the model's eos id."""

    tokenizer_type = "GPTSentencePieceTokenizer"

    def __init__(self, model_file):
        super().__init__(model_file)
        if self._sp.eos_id() < 0:
            raise UserError(f"--tokenizer-model {model_file}: the SentencePiece model has no eos "
                            f"piece, which GPTSentencePieceTokenizer uses as end-of-document")
        # Megatron returns -1 for the BERT-only tokens of this type.
        self._special_ids = {"cls": -1, "sep": -1, "mask": -1, "pad": self._sp.pad_id(),
                             "bos": self._sp.bos_id(), "eos": self._sp.eos_id(),
                             "eod": self._sp.eos_id()}

    def tokenize(self, text):
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts):
        return self._sp.encode(list(texts), out_type=int)

    def detokenize(self, token_ids):
        return self._sp.decode([int(i) for i in token_ids])
