"""``build_tokenizer``: Megatron's ``--tokenizer-type`` name and file flags -> a tokenizer."""

from megatron.errors import UserError
from megatron.tokenizer.abstract import AbstractTokenizer

TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HFTokenizer",
    "NullTokenizer",
)

# Megatron-LM's newer spelling of HFTokenizer.
_ALIASES = {"HuggingFaceTokenizer": "HFTokenizer"}


def _check_extra_ids(vocab_extra_ids):
    if isinstance(vocab_extra_ids, bool) or not isinstance(vocab_extra_ids, int) \
            or vocab_extra_ids < 0:
        raise UserError(f"--vocab-extra-ids must be a non-negative integer, got "
                        f"{vocab_extra_ids!r}")
    return vocab_extra_ids


def build_tokenizer(tokenizer_type, *, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size=None, vocab_extra_ids=0) -> AbstractTokenizer:
    """The tokenizer named by ``--tokenizer-type``, built from the files its flags name.

    ``vocab_file``/``merge_file``/``tokenizer_model``/``vocab_size``/``vocab_extra_ids`` are
    ``--vocab-file``, ``--merge-file``, ``--tokenizer-model``, ``--vocab-size`` and
    ``--vocab-extra-ids``; each type reads only the ones it needs. The result pickles cheaply
    (it is rebuilt from the same files), so it can be sent to preprocessing worker processes.
    """
    kind = _ALIASES.get(tokenizer_type, tokenizer_type)
    if kind not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    if kind in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        from megatron.tokenizer.bert import BertWordPieceTokenizer

        return BertWordPieceTokenizer(vocab_file, lower_case=(kind == "BertWordPieceLowerCase"),
                                      vocab_extra_ids=_check_extra_ids(vocab_extra_ids))
    if kind == "GPT2BPETokenizer":
        from megatron.tokenizer.gpt2 import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab_file, merge_file)
    if kind == "SentencePieceTokenizer":
        from megatron.tokenizer.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(tokenizer_model,
                                      vocab_extra_ids=_check_extra_ids(vocab_extra_ids))
    if kind == "GPTSentencePieceTokenizer":
        from megatron.tokenizer.spm import GPTSentencePieceTokenizer

        return GPTSentencePieceTokenizer(tokenizer_model)
    if kind == "HFTokenizer":
        from megatron.tokenizer.hf import HFTokenizer

        return HFTokenizer(tokenizer_model)
    # NullTokenizer
    from megatron.tokenizer.null import NullTokenizer

    if vocab_size is None:
        raise UserError("--vocab-size is required for --tokenizer-type NullTokenizer")
    return NullTokenizer(vocab_size)
