"""``HFTokenizer``: a Hugging Face tokenizer saved in a *local* directory (never downloaded).

``--tokenizer-model`` must be a directory written by ``save_pretrained`` (or holding
``tokenizer.json``). Loading needs the optional ``transformers`` package. As in Megatron-LM,
``tokenize`` is the tokenizer's own call, so it adds the special tokens that tokenizer adds
(a BOS for Llama-style tokenizers); ``eod`` is its eos id.
"""

import os

from megatron.errors import UserError
from megatron.tokenizer.abstract import AbstractTokenizer


class HFTokenizer(AbstractTokenizer):
    tokenizer_type = "HFTokenizer"

    def __init__(self, tokenizer_model):
        if tokenizer_model is None:
            raise UserError("--tokenizer-model is required for --tokenizer-type HFTokenizer "
                            "(a local directory saved with save_pretrained)")
        path = os.fspath(tokenizer_model)
        if not os.path.isdir(path):
            raise UserError(f"--tokenizer-model {path}: not a local directory; HFTokenizer loads "
                            f"only tokenizers saved on disk (no downloads)")
        super().__init__(path)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError("--tokenizer-type HFTokenizer needs the 'transformers' package "
                            "(pip install 'megatron-ltd[hf]')") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--tokenizer-model {path}: cannot load a tokenizer ({first})") \
                from None
        self._vocab = self._tok.get_vocab()
        self._inv_vocab = {idx: token for token, idx in self._vocab.items()}

    @property
    def vocab_size(self):
        return len(self._tok)

    @property
    def vocab(self):
        return self._vocab

    @property
    def inv_vocab(self):
        return self._inv_vocab

    def tokenize(self, text):
        return list(self._tok(text)["input_ids"])

    def tokenize_batch(self, texts):
        return [list(ids) for ids in self._tok(list(texts))["input_ids"]]

    def detokenize(self, token_ids):
        return self._tok.decode([int(i) for i in token_ids])

    def _special(self, attr, what):
        idx = getattr(self._tok, attr, None)
        return self._missing(what) if idx is None else idx

    @property
    def eod(self):
        return self._special("eos_token_id", "end-of-document (eos)")

    @property
    def eos(self):
        return self._special("eos_token_id", "end-of-sequence")

    @property
    def bos(self):
        return self._special("bos_token_id", "beginning-of-sequence")

    @property
    def pad(self):
        return self._special("pad_token_id", "[PAD]")

    @property
    def cls(self):
        return self._special("cls_token_id", "[CLS]")

    @property
    def sep(self):
        return self._special("sep_token_id", "[SEP]")

    @property
    def mask(self):
        return self._special("mask_token_id", "[MASK]")
