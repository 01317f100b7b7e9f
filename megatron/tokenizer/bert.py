"""BERT WordPiece from ``vocab.txt`` (``BertWordPieceLowerCase`` / ``BertWordPieceCase``).

Same tokens as Google's BERT ``FullTokenizer`` used by Megatron: text cleaned (control chars
removed, whitespace normalised), CJK characters split, punctuation split; LowerCase also lowercases
and strips accents; then greedy longest-match WordPiece with ``##`` continuations and ``[UNK]``
for words that cannot be covered (or are longer than 200 characters, BERT's and Megatron's
``max_input_chars_per_word``; HF's default is 100). Runs on the HF ``tokenizers`` BERT
normaliser, pre-tokenizer and WordPiece model, plus one fix: HF's CJK test misses the
ideographs U+2B820..U+2B91F (it starts that range at U+2B920), which BERT splits off as words.
Special tokens written inside the text (``[MASK]``) are ordinary text, as in Megatron.

As Megatron does, ``[BOS]`` and ``[EOS]`` (and ``<extra_id_i>`` for ``--vocab-extra-ids``) are
appended to the vocab when absent; ``eod`` is the ``[EOS]`` id.
"""

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from megatron.errors import UserError
from megatron.tokenizer._files import read_text, require_file
from megatron.tokenizer.abstract import TokenizersBackedTokenizer

REQUIRED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

#: BERT's (and Megatron's bert_tokenization) WordpieceTokenizer limit: a longer word is [UNK].
MAX_INPUT_CHARS_PER_WORD = 200

#: CJK ideographs BERT's ``_is_chinese_char`` splits off but HF ``tokenizers`` does not.
_CJK_MISSED_BY_HF = "[\U0002B820-\U0002B91F]"


def load_bert_vocab(vocab_file):
    """vocab.txt -> {token: id}: one token per line, id = line number from 0, stripped.

    As in BERT's ``load_vocab``, a repeated token keeps the id of its last line.
    """
    lines = read_text(vocab_file, "--vocab-file").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    vocab = {}
    for idx, line in enumerate(lines):
        vocab[line.strip()] = idx
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"--vocab-file {vocab_file}: BERT WordPiece vocab lacks the special "
                        f"token(s) {' '.join(missing)}; expected one token per line including "
                        f"{' '.join(REQUIRED_TOKENS)}")
    return vocab


def _clean_up_tokenization(text):
    """BERT's ``clean_up_tokenization``: no space before simple punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


class BertWordPieceTokenizer(TokenizersBackedTokenizer):
    """BERT WordPiece; ``lower_case`` picks BertWordPieceLowerCase vs BertWordPieceCase."""

    def __init__(self, vocab_file, lower_case=True, vocab_extra_ids=0):
        vocab_file = require_file(vocab_file, "--vocab-file")
        super().__init__(vocab_file, lower_case, vocab_extra_ids)
        self.tokenizer_type = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
        self.lower_case = lower_case
        vocab = load_bert_vocab(vocab_file)
        tok = Tokenizer(models.WordPiece(vocab=dict(vocab), unk_token="[UNK]",
                                         max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lower_case,
            lowercase=lower_case)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CJK_MISSED_BY_HF), behavior="isolated"),
            pre_tokenizers.BertPreTokenizer()])
        self._set_backend(tok)

        self._set_vocab(vocab)
        # Tokens the WordPiece model never produces from text; they only get ids.
        bos_id = self._add_token("[BOS]")
        eos_id = self._add_token("[EOS]")
        self._add_extra_ids(vocab_extra_ids)
        # Megatron-LM: eod is the [EOS] id (appended to the vocab if the file lacks it).
        self._special_ids = {"cls": vocab["[CLS]"], "sep": vocab["[SEP]"], "pad": vocab["[PAD]"],
                             "mask": vocab["[MASK]"], "unk": vocab["[UNK]"], "bos": bos_id,
                             "eos": eos_id, "eod": eos_id}

    def convert_ids_to_tokens(self, token_ids):
        return [self._inv_vocab[int(i)] for i in token_ids]

    def detokenize(self, token_ids):
        """Tokens joined by spaces, ``##`` pieces glued on, BERT's punctuation clean-up."""
        text = " ".join(self.convert_ids_to_tokens(token_ids)).replace(" ##", "").strip()
        return _clean_up_tokenization(text)

    def decode_token_ids(self, token_ids):
        """Megatron's variant used in evaluation: drops [PAD] and [CLS], no clean-up."""
        out = ""
        for token in self.convert_ids_to_tokens(token_ids):
            if token in ("[PAD]", "[CLS]"):
                continue
            out += token[2:] if token.startswith("##") else " " + token
        return out

    @property
    def unk(self):
        return self._special_ids["unk"]
