"""The tokenizer interface every Megatron tokenizer type implements."""

from abc import ABC, abstractmethod
from typing import Dict, List, Sequence

from megatron.errors import UserError


def vocab_size_with_padding(orig_vocab_size, make_vocab_size_divisible_by=128,
                            tensor_model_parallel_size=1):
    """Smallest size >= ``orig_vocab_size`` divisible by ``divisible_by * tp_size`` (Megatron).

    The extra rows are dummy tokens: they make the embedding GPU friendly and splittable evenly
    across tensor-parallel ranks. E.g. 50257 -> 50304 (128, TP1) and 50432 (128, TP2).
    """
    for flag, value in (("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
                        ("--tensor-model-parallel-size", tensor_model_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value!r}")
    if isinstance(orig_vocab_size, bool) or not isinstance(orig_vocab_size, int) \
            or orig_vocab_size < 1:
        raise UserError(f"vocabulary size must be a positive integer, got {orig_vocab_size!r}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple


def padded_vocab_message(orig_vocab_size, padded_vocab_size):
    """Megatron's log line for the padding step."""
    return (f" > padded vocab (size: {orig_vocab_size}) with "
            f"{padded_vocab_size - orig_vocab_size} dummy tokens (new size: {padded_vocab_size})")


class MissingSpecialToken(UserError, AttributeError):
    """The tokenizer type has no such special token.

    A UserError (the flags chose a tokenizer that cannot serve this model or tool) and an
    AttributeError, so ``hasattr(tok, "cls")`` and ``getattr(tok, "eod", None)`` work.
    """


class AbstractTokenizer(ABC):
    """Megatron's tokenizer interface: text <-> ids plus the ids of the special tokens.

    Subclasses call ``super().__init__(*ctor_args)`` with the arguments they were built from:
    pickling sends those arguments, and the unpickled copy rebuilds itself from the same files.
    That keeps multiprocessing cheap (a few short strings per worker) and works for tokenizers
    whose backend objects do not pickle.
    """

    #: Megatron's ``--tokenizer-type`` name of the subclass.
    tokenizer_type = "AbstractTokenizer"

    def __init__(self, *ctor_args):
        self._ctor_args = ctor_args

    def __reduce__(self):
        return (type(self), self._ctor_args)

    def __repr__(self):
        return f"<{self.tokenizer_type} vocab_size={self.vocab_size}>"

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of real tokens, before padding (see ``padded_vocab_size``)."""

    @property
    @abstractmethod
    def vocab(self) -> Dict[str, int]:
        """Token text -> id."""

    @property
    @abstractmethod
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token text."""

    def padded_vocab_size(self, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
        """``vocab_size`` rounded up as Megatron does for the embedding table."""
        return vocab_size_with_padding(self.vocab_size, make_vocab_size_divisible_by,
                                       tensor_model_parallel_size)

    # ---- text <-> ids -----------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Ids of ``text``; no special tokens are added."""

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """``[tokenize(t) for t in texts]``; subclasses override with a faster batch encoder."""
        return [self.tokenize(text) for text in texts]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        raise NotImplementedError(f"{self.tokenizer_type} has no detokenizer")

    # ---- special tokens ---------------------------------------------------------------------
    def _missing(self, what):
        raise MissingSpecialToken(f"--tokenizer-type {self.tokenizer_type} has no {what} token; "
                                 f"choose a tokenizer type that provides it")

    @property
    def eod(self) -> int:
        """End-of-document id, appended after each document by preprocessing."""
        return self._missing("end-of-document")

    @property
    def cls(self) -> int:
        return self._missing("[CLS]")

    @property
    def sep(self) -> int:
        return self._missing("[SEP]")

    @property
    def pad(self) -> int:
        return self._missing("[PAD]")

    @property
    def mask(self) -> int:
        return self._missing("[MASK]")

    @property
    def bos(self) -> int:
        return self._missing("beginning-of-sequence")

    @property
    def eos(self) -> int:
        return self._missing("end-of-sequence")

    @property
    def additional_special_tokens_ids(self):
        """Ids of the ``<extra_id_i>`` tokens (``--vocab-extra-ids``); None if not supported."""
        return None
