"""GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (``GPT2BPETokenizer``).

Ids are the same as OpenAI's GPT-2 encoder (and Megatron's copy of it) for any text: the HF
``tokenizers`` BPE model with GPT-2's byte-level pre-tokenizer (same regex, no prefix space) and
merge ranks from ``merges.txt``. As in Megatron, ``<|endoftext|>`` written inside the text is
*not* special: it is encoded as ordinary characters; the eod id is only ever appended by callers.
"""

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from megatron.errors import UserError
from megatron.tokenizer._files import read_text, require_file
from megatron.tokenizer.abstract import TokenizersBackedTokenizer

EOD_TOKEN = "<|endoftext|>"


def load_gpt2_vocab(vocab_file):
    """vocab.json -> {token: id}, checked to be a JSON object of strings to distinct ids."""
    text = read_text(vocab_file, "--vocab-file")
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--vocab-file {vocab_file}: not valid JSON ({err.msg}, line {err.lineno})"
                        f"; expected GPT-2's vocab.json") from None
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"--vocab-file {vocab_file}: expected a non-empty JSON object mapping "
                        f"token strings to integer ids (GPT-2's vocab.json)")
    seen = {}
    for token, idx in vocab.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise UserError(f"--vocab-file {vocab_file}: id of token {token!r} is {idx!r}; "
                            f"expected a non-negative integer")
        if idx in seen:
            raise UserError(f"--vocab-file {vocab_file}: id {idx} is used by both "
                            f"{seen[idx]!r} and {token!r}")
        seen[idx] = token
    return vocab


def load_gpt2_merges(merge_file, vocab, vocab_file):
    """merges.txt -> [(left, right), ...] in rank order, checked against ``vocab``.

    The optional ``#version`` header is skipped, as GPT-2's and HF's readers do. Every merge's
    two parts and its result must be vocab tokens; otherwise the two files do not belong together.
    """
    lines = read_text(merge_file, "--merge-file").split("\n")
    merges = []
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"--merge-file {merge_file} line {lineno}: expected two tokens "
                            f"separated by a space, got {line!r}")
        left, right = parts
        for token in (left, right, left + right):
            if token not in vocab:
                raise UserError(
                    f"--merge-file {merge_file} does not match --vocab-file {vocab_file}: "
                    f"merge {line!r} on line {lineno} needs token {token!r}, which is not in the "
                    f"vocab; use the vocab.json and merges.txt of the same tokenizer")
        merges.append((left, right))
    return merges


class GPT2BPETokenizer(TokenizersBackedTokenizer):
    """GPT-2 byte-level BPE; ``eod`` is the id of ``<|endoftext|>``."""

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file, merge_file):
        vocab_file = require_file(vocab_file, "--vocab-file")
        merge_file = require_file(merge_file, "--merge-file")
        super().__init__(vocab_file, merge_file)
        vocab = load_gpt2_vocab(vocab_file)
        merges = load_gpt2_merges(merge_file, vocab, vocab_file)
        if EOD_TOKEN not in vocab:
            raise UserError(f"--vocab-file {vocab_file}: has no {EOD_TOKEN} token, which GPT-2 "
                            f"uses as the end-of-document id")
        self._set_vocab(vocab)
        self._special_ids = {"eod": vocab[EOD_TOKEN], "eos": vocab[EOD_TOKEN]}
        # No unk token: a byte-level vocab has a token for each of the 256 bytes. (A vocab
        # lacking one would silently drop that byte here, where GPT-2's encoder raises KeyError.)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._set_backend(tok)

    def detokenize(self, token_ids):
        # Invalid UTF-8 byte sequences become U+FFFD, like GPT-2's errors='replace'.
        return self._tok.decode([int(i) for i in token_ids], skip_special_tokens=False)
