"""``HFTokenizer``: a Hugging Face tokenizer saved in a *local* directory (never downloaded).

``--tokenizer-model`` must be a directory written by ``save_pretrained`` (or holding
``tokenizer.json``). Loading needs the optional ``transformers`` package. As in Megatron-LM,
``tokenize`` is the tokenizer's own call, so it adds the special tokens that tokenizer adds
(a BOS for Llama-style tokenizers); ``eod`` is its eos id.
"""

import os

from megatron.errors import UserError
from megatron.tokenizer.abstract import DictVocabTokenizer


class HFTokenizer(DictVocabTokenizer):
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
        self._set_vocab(self._tok.get_vocab())

    @property
    def vocab_size(self):
        return len(self._tok)  # the tokenizer's own count, added tokens included

    def tokenize(self, text):
        return list(self._tok(text)["input_ids"])

    def tokenize_batch(self, texts):
        return [list(ids) for ids in self._tok(list(texts))["input_ids"]]

    def detokenize(self, token_ids):
        return self._tok.decode([int(i) for i in token_ids])

    def _special_id(self, name, what):
        """The tokenizer's own ``<name>_token_id`` (eod: ``eos_token_id``), read on each use."""
        if name == "eod":
            name, what = "eos", "end-of-document (eos)"
        idx = getattr(self._tok, f"{name}_token_id", None)
        return self._missing(what) if idx is None else idx
