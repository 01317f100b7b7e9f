"""The tokenizer interface every Megatron tokenizer type implements."""

from abc import ABC, abstractmethod
from types import MappingProxyType
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
    #: Special token name (``"eod"``, ``"cls"``, ...) -> id. Subclasses set their own dict in
    #: ``__init__``; a name that is absent raises MissingSpecialToken.
    _special_ids = MappingProxyType({})

    def _missing(self, what):
        raise MissingSpecialToken(f"--tokenizer-type {self.tokenizer_type} has no {what} token; "
                                 f"choose a tokenizer type that provides it")

    def _special_id(self, name, what):
        """Id of the special token ``name`` (from ``_special_ids``); ``what`` names it in errors."""
        idx = self._special_ids.get(name)
        return self._missing(what) if idx is None else idx

    @property
    def eod(self) -> int:
        """End-of-document id, appended after each document by preprocessing."""
        return self._special_id("eod", "end-of-document")

    @property
    def cls(self) -> int:
        return self._special_id("cls", "[CLS]")

    @property
    def sep(self) -> int:
        return self._special_id("sep", "[SEP]")

    @property
    def pad(self) -> int:
        return self._special_id("pad", "[PAD]")

    @property
    def mask(self) -> int:
        return self._special_id("mask", "[MASK]")

    @property
    def bos(self) -> int:
        return self._special_id("bos", "beginning-of-sequence")

    @property
    def eos(self) -> int:
        return self._special_id("eos", "end-of-sequence")

    @property
    def additional_special_tokens_ids(self):
        """Ids of the ``<extra_id_i>`` tokens (``--vocab-extra-ids``); None if not supported."""
        return None


class DictVocabTokenizer(AbstractTokenizer):
    """A tokenizer whose vocabulary is the dicts ``_vocab`` (token -> id) and ``_inv_vocab``.

    Tokens appended with ``_add_token`` (special tokens, ``<extra_id_i>``) get the next free id.
    """

    #: The ``<extra_id_i>`` tokens added by ``_add_extra_ids``; None when the type has none.
    _extra_tokens = None

    def _set_vocab(self, vocab):
        self._vocab = vocab
        self._inv_vocab = {idx: token for token, idx in vocab.items()}

    def _add_token(self, token):
        """Id of ``token``, appended to the vocab first when absent."""
        if token not in self._vocab:
            idx = len(self._vocab)
            self._vocab[token] = idx
            self._inv_vocab[idx] = token
        return self._vocab[token]

    def _add_extra_ids(self, count):
        """Append ``<extra_id_0..count-1>`` (Megatron's ``--vocab-extra-ids``)."""
        self._extra_tokens = [f"<extra_id_{i}>" for i in range(count)]
        for token in self._extra_tokens:
            self._add_token(token)

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
    def additional_special_tokens_ids(self):
        if self._extra_tokens is None:
            return None
        return [self._vocab[t] for t in self._extra_tokens]


class TokenizersBackedTokenizer(DictVocabTokenizer):
    """Encoding through a Hugging Face ``tokenizers.Tokenizer`` set with ``_set_backend``."""

    def _set_backend(self, tok):
        self._tok = tok
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); else the plain batch call.
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def tokenize(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts):
        return [enc.ids for enc in self._encode_batch(list(texts), add_special_tokens=False)]
