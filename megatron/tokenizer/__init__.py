"""Tokenizers named by Megatron's ``--tokenizer-type``.

    tok = build_tokenizer("GPT2BPETokenizer", vocab_file="gpt2-vocab.json",
                          merge_file="gpt2-merges.txt")
    ids = tok.tokenize("Hello world") + [tok.eod]
    padded = vocab_size_with_padding(tok.vocab_size, 128, tensor_model_parallel_size=2)
"""

from megatron.tokenizer.abstract import (
    AbstractTokenizer,
    MissingSpecialToken,
    padded_vocab_message,
    vocab_size_with_padding,
)
from megatron.tokenizer.build import TOKENIZER_TYPES, build_tokenizer

# The concrete classes import their backends (tokenizers, sentencepiece, transformers), so they
# are loaded on first use: `from megatron.tokenizer import GPT2BPETokenizer` still works.
_LAZY = {
    "GPT2BPETokenizer": "megatron.tokenizer.gpt2",
    "BertWordPieceTokenizer": "megatron.tokenizer.bert",
    "SentencePieceTokenizer": "megatron.tokenizer.spm",
    "GPTSentencePieceTokenizer": "megatron.tokenizer.spm",
    "NullTokenizer": "megatron.tokenizer.null",
    "HFTokenizer": "megatron.tokenizer.hf",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AbstractTokenizer",
    "BertWordPieceTokenizer",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HFTokenizer",
    "MissingSpecialToken",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TOKENIZER_TYPES",
    "build_tokenizer",
    "padded_vocab_message",
    "vocab_size_with_padding",
]
