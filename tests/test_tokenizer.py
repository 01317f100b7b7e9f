"""megatron.tokenizer against the reference implementations, on the tiny vocabs in tests/assets.

The vocabularies are made by tests/assets/make_tokenizer_assets.py.
"""

import json
import os
import pickle

import pytest

from megatron.errors import UserError
from megatron.tokenizer import (
    AbstractTokenizer,
    TOKENIZER_TYPES,
    build_tokenizer,
    padded_vocab_message,
    vocab_size_with_padding,
)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizers")
GPT2_VOCAB = os.path.join(ASSETS, "gpt2-vocab.json")
GPT2_MERGES = os.path.join(ASSETS, "gpt2-merges.txt")
BERT_VOCAB = os.path.join(ASSETS, "bert-vocab.txt")
SPM_MODEL = os.path.join(ASSETS, "spm.model")

TEXTS = [
    "Hello world",
    "The quick brown fox's tail wasn't there; they're gone, I'm sure.",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\n\ttabbed\n",
    "multiple     spaces\u00a0and a no-break space",
    "Café au lait, crème brûlée, déjà vu: naïve résumé",
    "Ärger über Öl; Straße",
    "Москва — столица России.",
    "東京は日本の首都です。北京欢迎你",
    "emoji 🙂🚀✨ and combining e\u0301",
    "numbers 1234567890 3.14159 1e-5 0x1F",
    "code: def f(x):\n    return x ** 2  # square",
    "punctuation!?!... (brackets) [square] {curly} <angle> \"quotes\" 'single'",
    "",
    " ",
    "\n",
]


def gpt2():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB, merge_file=GPT2_MERGES)


def one_line_user_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# ---- padding ----------------------------------------------------------------------------------
def test_vocab_size_with_padding():
    assert vocab_size_with_padding(50257) == 50304
    assert vocab_size_with_padding(50257, 128, 2) == 50432  # multiple of 256
    assert vocab_size_with_padding(50257, 128, 8) == 51200  # multiple of 1024
    assert vocab_size_with_padding(30522, 128) == 30592
    assert vocab_size_with_padding(50304, 128) == 50304  # already a multiple
    assert vocab_size_with_padding(1, 1) == 1
    assert padded_vocab_message(50257, 50304) == \
        " > padded vocab (size: 50257) with 47 dummy tokens (new size: 50304)"
    tok = gpt2()
    assert tok.padded_vocab_size() == 1536  # 1501 real tokens
    assert tok.padded_vocab_size(128, 4) == 1536
    assert tok.padded_vocab_size(64, 1) == 1536
    assert tok.padded_vocab_size(1000, 1) == 2000


@pytest.mark.parametrize("args, flag", [
    ((50257, 0, 1), "--make-vocab-size-divisible-by"),
    ((50257, 128, 0), "--tensor-model-parallel-size"),
    ((50257, 128.0, 1), "--make-vocab-size-divisible-by"),
    ((0, 128, 1), "vocabulary size"),
])
def test_vocab_size_with_padding_rejects_bad_values(args, flag):
    with pytest.raises(UserError) as excinfo:
        vocab_size_with_padding(*args)
    one_line_user_error(excinfo, flag)


# ---- GPT-2 BPE --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast(GPT2_VOCAB, GPT2_MERGES)


def test_gpt2_round_trip_and_batch():
    tok = gpt2()
    assert isinstance(tok, AbstractTokenizer)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.detokenize(ids) == text
    assert tok.tokenize_batch(TEXTS) == [tok.tokenize(t) for t in TEXTS]
    assert tok.tokenize("") == []


def test_gpt2_matches_transformers(hf_gpt2):
    tok = gpt2()
    for text in TEXTS:
        assert tok.tokenize(text) == hf_gpt2(text)["input_ids"], text
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == hf_gpt2.decode(ids)
    assert tok.vocab == hf_gpt2.get_vocab()


def test_gpt2_specials_and_vocab():
    tok = gpt2()
    vocab = json.load(open(GPT2_VOCAB, encoding="utf-8"))
    assert tok.vocab_size == len(vocab) == 1501
    assert tok.eod == tok.eos == vocab["<|endoftext|>"] == 1500
    assert tok.inv_vocab[tok.eod] == "<|endoftext|>"
    assert all(tok.inv_vocab[i] == t for t, i in tok.vocab.items())
    # As in Megatron, the marker written inside the text is ordinary text, not the eod id.
    ids = tok.tokenize("a<|endoftext|>b")
    assert tok.eod not in ids and tok.detokenize(ids) == "a<|endoftext|>b"
    assert tok.detokenize(tok.tokenize("doc") + [tok.eod]) == "doc<|endoftext|>"
    with pytest.raises(UserError) as excinfo:
        tok.cls
    one_line_user_error(excinfo, "GPT2BPETokenizer", "[CLS]")
    assert not hasattr(tok, "mask") and getattr(tok, "sep", None) is None


def test_gpt2_pickles_small():
    tok = gpt2()
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # rebuilt from the file paths in the worker, not shipped whole
    copy = pickle.loads(blob)
    assert copy.tokenize(TEXTS[5]) == tok.tokenize(TEXTS[5]) and copy.eod == tok.eod


def test_gpt2_missing_files(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing, merge_file=GPT2_MERGES)
    one_line_user_error(excinfo, "--vocab-file", missing)
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB, merge_file=missing)
    one_line_user_error(excinfo, "--merge-file", missing)
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB)
    one_line_user_error(excinfo, "--merge-file")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path), merge_file=GPT2_MERGES)
    one_line_user_error(excinfo, "--vocab-file", "not a file")


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "JSON object"),
    ("{}", "JSON object"),
    ('{"a": "0"}', "non-negative integer"),
    ('{"a": 0, "b": 0}', "id 0 is used by both"),
    ('{"a": -1}', "non-negative integer"),
])
def test_gpt2_malformed_vocab(tmp_path, content, needle):
    bad = tmp_path / "vocab.json"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad), merge_file=GPT2_MERGES)
    one_line_user_error(excinfo, "--vocab-file", str(bad), needle)


def test_gpt2_vocab_not_utf8(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_bytes(b'{"\xff": 0}')
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad), merge_file=GPT2_MERGES)
    one_line_user_error(excinfo, "--vocab-file", "UTF-8")


def test_gpt2_vocab_merges_mismatch(tmp_path):
    vocab = json.load(open(GPT2_VOCAB, encoding="utf-8"))
    # Drop the result of the 10th merge: the merges file no longer belongs to this vocab.
    merges = open(GPT2_MERGES, encoding="utf-8").read().split("\n")
    left, right = merges[10].split()
    del vocab[left + right]
    vocab = {t: i for i, t in enumerate(vocab)}
    small = tmp_path / "vocab.json"
    small.write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(small), merge_file=GPT2_MERGES)
    one_line_user_error(excinfo, "--merge-file", GPT2_MERGES, "--vocab-file", str(small),
                        "line 11")


def test_gpt2_malformed_merges_and_missing_eod(tmp_path):
    bad = tmp_path / "merges.txt"
    bad.write_text("#version: 0.2\nĠ t\nthree part line\n", encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=GPT2_VOCAB, merge_file=str(bad))
    one_line_user_error(excinfo, "--merge-file", "line 3", "two tokens")

    vocab = json.load(open(GPT2_VOCAB, encoding="utf-8"))
    del vocab["<|endoftext|>"]
    no_eod = tmp_path / "vocab.json"
    no_eod.write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(no_eod), merge_file=GPT2_MERGES)
    one_line_user_error(excinfo, "--vocab-file", "<|endoftext|>")


# ---- BERT WordPiece ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind, lower", [("BertWordPieceLowerCase", True),
                                         ("BertWordPieceCase", False)])
def test_bert_matches_transformers(kind, lower):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast(BERT_VOCAB, do_lower_case=lower)
    tok = build_tokenizer(kind, vocab_file=BERT_VOCAB)
    assert tok.tokenizer_type == kind
    texts = TEXTS + ["x" * 90, "HeLLo WoRLD", "\x00control\x07chars"]
    for text in texts:
        assert tok.tokenize(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.cls == ref.cls_token_id and tok.sep == ref.sep_token_id
    assert tok.pad == ref.pad_token_id and tok.mask == ref.mask_token_id


@pytest.mark.parametrize("kind, lower", [("BertWordPieceLowerCase", True),
                                         ("BertWordPieceCase", False)])
def test_bert_long_words_and_cjk_as_megatron(kind, lower):
    """Megatron's bert_tokenization (Google's BERT): words up to 200 characters are split into
    pieces (HF's default limit is 100), and U+2B820..U+2B91F are CJK characters split off as
    words (HF's range starts at U+2B920)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast(BERT_VOCAB, do_lower_case=lower)
    ref.backend_tokenizer.model.max_input_chars_per_word = 200  # Megatron's limit
    tok = build_tokenizer(kind, vocab_file=BERT_VOCAB)
    for text in ["the" * 34, "the" * 50, "the" * 66 + "th", "the" * 67, "x" * 150]:
        ids = tok.tokenize(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], len(text)
        assert (ids == [tok.unk]) == (len(text) > 200), len(text)
    assert len(tok.tokenize("the" * 50)) > 1
    a, b, unk = tok.vocab["a"], tok.vocab["b"], tok.unk
    for cp in (0x2B81F, 0x2B820, 0x2B900, 0x2B91F, 0x2B920):
        assert tok.tokenize(f"a{chr(cp)}b") == [a, unk, b], hex(cp)
    assert tok.tokenize_batch(["a\U0002B820b", "the" * 50]) == \
        [tok.tokenize("a\U0002B820b"), tok.tokenize("the" * 50)]


def test_bert_lower_vs_case():
    lower = build_tokenizer("BertWordPieceLowerCase", vocab_file=BERT_VOCAB)
    case = build_tokenizer("BertWordPieceCase", vocab_file=BERT_VOCAB)
    assert lower.detokenize(lower.tokenize("Café, Déjà Vu!")) == "cafe, deja vu!"
    assert case.detokenize(case.tokenize("Café, Déjà Vu!")) == "Café, Déjà Vu!"
    assert lower.detokenize(lower.tokenize("It's here .")) == "it's here."
    # Special tokens inside the text are ordinary text (Megatron's BERT tokenizer).
    assert lower.mask not in lower.tokenize("a [MASK] b")


def test_bert_special_tokens_and_extra_ids():
    lines = open(BERT_VOCAB, encoding="utf-8").read().split("\n")[:-1]
    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=BERT_VOCAB, vocab_extra_ids=3)
    assert [tok.pad, tok.unk, tok.cls, tok.sep, tok.mask] == [0, 1, 2, 3, 4]
    # Megatron appends [BOS] and [EOS] when absent, then <extra_id_i>; eod is [EOS].
    assert tok.bos == len(lines) and tok.eos == len(lines) + 1 and tok.eod == tok.eos
    assert tok.additional_special_tokens_ids == [len(lines) + 2 + i for i in range(3)]
    assert tok.vocab_size == len(lines) + 5
    assert tok.inv_vocab[tok.eos] == "[EOS]" and tok.vocab["<extra_id_2>"] == tok.vocab_size - 1
    assert tok.decode_token_ids([tok.cls, tok.vocab["the"], tok.pad]) == " the"
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.vocab_size == tok.vocab_size and copy.tokenize("Hello") == tok.tokenize("Hello")


def test_bert_vocab_errors(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("BertWordPieceCase", vocab_file=str(bad))
    one_line_user_error(excinfo, "--vocab-file", str(bad), "[CLS]", "[MASK]")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("BertWordPieceCase", vocab_file=str(tmp_path / "missing.txt"))
    one_line_user_error(excinfo, "--vocab-file", "missing.txt")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("BertWordPieceCase", vocab_file=BERT_VOCAB, vocab_extra_ids=-1)
    one_line_user_error(excinfo, "--vocab-extra-ids")


# ---- SentencePiece ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp():
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=SPM_MODEL)


def test_gpt_sentencepiece_matches_processor(sp):
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=SPM_MODEL)
    for text in TEXTS:
        assert tok.tokenize(text) == sp.encode(text), text
        assert tok.detokenize(tok.tokenize(text)) == sp.decode(sp.encode(text))
    assert tok.tokenize_batch(TEXTS) == [sp.encode(t) for t in TEXTS]
    assert tok.vocab_size == sp.get_piece_size() == 600
    assert tok.eod == tok.eos == sp.eos_id() and tok.bos == sp.bos_id()
    assert tok.cls == tok.sep == tok.mask == -1
    assert tok.vocab[sp.id_to_piece(100)] == 100


def test_megatron_sentencepiece(sp):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SPM_MODEL, vocab_extra_ids=2)
    n = sp.get_piece_size()
    # Added after the pieces, in Megatron's order; the model has no pad piece -> <PAD>.
    added = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>"]
    assert [tok.inv_vocab[n + i] for i in range(5)] == added
    assert [tok.cls, tok.sep, tok.eod, tok.mask, tok.pad] == [n, n + 1, n + 2, n + 3, n + 4]
    assert tok.bos == sp.bos_id() and tok.eos == sp.eos_id()  # existing pieces, not re-added
    assert tok.additional_special_tokens_ids == [n + 5, n + 6]
    assert tok.vocab_size == n + 7
    for text in TEXTS:
        assert tok.tokenize(text) == sp.encode(text)
    # Special tokens in the text are single ids; the rest goes through the model.
    text = "hello <EOD>world<MASK><SEP>x"
    ids = tok.tokenize(text)
    assert ids == (sp.encode("hello ") + [tok.eod] + sp.encode("world") + [tok.mask, tok.sep]
                   + sp.encode("x"))
    assert tok.detokenize(ids) == "hello <EOD> world <MASK>  <SEP> x"
    assert tok.tokenize_batch(["plain text", text]) == [sp.encode("plain text"), ids]
    assert pickle.loads(pickle.dumps(tok)).tokenize(text) == ids


def test_sentencepiece_errors(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        with pytest.raises(UserError) as excinfo:
            build_tokenizer(kind, tokenizer_model=str(bad))
        one_line_user_error(excinfo, "--tokenizer-model", str(bad))
        with pytest.raises(UserError) as excinfo:
            build_tokenizer(kind, tokenizer_model=str(tmp_path / "missing.model"))
        one_line_user_error(excinfo, "--tokenizer-model", "missing.model")
        with pytest.raises(UserError) as excinfo:
            build_tokenizer(kind)
        one_line_user_error(excinfo, "--tokenizer-model")


# ---- Null, HF, type names ---------------------------------------------------------------------
def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.vocab_size == 101 and tok.eod == tok.eos == 100 == tok.vocab_size - 1
    assert tok.tokenize("1 2  3\n99") == [1, 2, 3, 99]
    assert tok.tokenize("") == []
    assert tok.detokenize([1, 2, 3]) == "1 2 3"
    assert tok.padded_vocab_size() == 128
    assert tok.cls == tok.sep == tok.mask == -1
    assert pickle.loads(pickle.dumps(tok)).eod == 100
    with pytest.raises(UserError) as excinfo:
        tok.tokenize("1 two 3")
    one_line_user_error(excinfo, "NullTokenizer", "integer")
    with pytest.raises(UserError) as excinfo:
        tok.tokenize("101")
    one_line_user_error(excinfo, "--vocab-size")
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("NullTokenizer")
    one_line_user_error(excinfo, "--vocab-size")


def test_hf_tokenizer_local_only(tmp_path, hf_gpt2):
    hf_gpt2.save_pretrained(str(tmp_path / "saved"))
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path / "saved"))
    assert tok.tokenize(TEXTS[1]) == gpt2().tokenize(TEXTS[1])
    assert tok.eod == hf_gpt2.eos_token_id
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("HFTokenizer", tokenizer_model="gpt2")  # a hub name: never downloaded
    one_line_user_error(excinfo, "--tokenizer-model", "local")


def test_unknown_type():
    with pytest.raises(UserError) as excinfo:
        build_tokenizer("GPT3Tokenizer", vocab_file=GPT2_VOCAB)
    one_line_user_error(excinfo, "--tokenizer-type", "GPT3Tokenizer", *TOKENIZER_TYPES)
