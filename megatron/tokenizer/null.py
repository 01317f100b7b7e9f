"""``NullTokenizer``: the text already is token ids, written as space-separated integers.

For benchmarks and mock data. As in Megatron-LM, ``--vocab-size N`` means ids ``0..N-1`` plus an
end-of-document id ``N``, so ``vocab_size`` is ``N + 1`` and ``eod == vocab_size - 1 == N``.
"""

from megatron.errors import UserError
from megatron.tokenizer.abstract import AbstractTokenizer


class NullTokenizer(AbstractTokenizer):
    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise UserError(f"--vocab-size must be a positive integer for --tokenizer-type "
                            f"NullTokenizer, got {vocab_size!r}")
        super().__init__(vocab_size)
        self._eod_id = vocab_size
        self._vocab = None
        # Megatron returns -1 for the BERT-only tokens of this type.
        self._special_ids = {"eod": vocab_size, "eos": vocab_size, "cls": -1, "sep": -1,
                             "mask": -1}

    @property
    def vocab_size(self):
        return self._eod_id + 1

    @property
    def vocab(self):
        if self._vocab is None:  # built on first use only: N can be large
            self._vocab = {str(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self):
        return {i: token for token, i in self.vocab.items()}

    def tokenize(self, text):
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise UserError(f"--tokenizer-type NullTokenizer expects text of space-separated "
                            f"integer ids, got {text[:60]!r}") from None
        for idx in ids:
            if not 0 <= idx < self.vocab_size:
                raise UserError(f"--tokenizer-type NullTokenizer: id {idx} is outside "
                                f"[0, {self.vocab_size}) given by --vocab-size {self._eod_id}")
        return ids

    def detokenize(self, token_ids):
        return " ".join(str(int(i)) for i in token_ids)
