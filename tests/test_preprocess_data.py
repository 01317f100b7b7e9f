"""tools/preprocess_data.py and tools/merge_datasets.py: jsonl -> .bin/.idx -> read back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.errors import run_main
from megatron.tokenizer import build_tokenizer
from tools import merge_datasets, preprocess_data
from tools.preprocess_data import simple_split_sentences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets", "tokenizers")
VOCAB = os.path.join(ASSETS, "gpt2-vocab.json")
MERGES = os.path.join(ASSETS, "gpt2-merges.txt")
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]

WORDS = ("the of and to in is was for on that with as by at from his her which an be this "
         "are were had it not or have one Megatron token dropping layer model data").split()


def make_records(n, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        sentences = []
        for _ in range(rng.integers(0, 4)):
            words = rng.choice(WORDS, rng.integers(1, 12)).tolist()
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
        text = ("\n" if i % 5 == 0 else " ").join(sentences)
        records.append({"text": text, "meta": {"pile_set_name": ["Pile-CC", "ArXiv"][i % 2]}})
    return records


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)


@pytest.fixture(scope="module")
def records():
    return make_records(300)


def run(args):
    """Run the tool in this process (workers fork from it); returns its summary dict."""
    return preprocess_data.main([str(a) for a in args])


def files(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


def test_round_trip_pile_records(tmp_path, tok, records):
    src = write_jsonl(tmp_path / "pile.jsonl", records)
    out = str(tmp_path / "out")
    summary = run(["--input", src, "--output-prefix", out, "--json-keys", "text",
                   "meta.pile_set_name", "--append-eod", "--log-interval", "100", *GPT2])
    assert summary["documents"] == len(records)
    text = IndexedDataset(out + "_text_document")
    names = IndexedDataset(out + "_meta.pile_set_name_document")
    assert text.dtype == np.uint16  # vocab 1501 < 65500, code 8
    assert open(out + "_text_document.idx", "rb").read()[17] == 8
    assert text.num_documents == names.num_documents == len(records)
    for d, record in enumerate(records):
        for ds, value in ((text, record["text"]), (names, record["meta"]["pile_set_name"])):
            seqs = [ds[i].tolist() for i in range(ds.doc_idx[d], ds.doc_idx[d + 1])]
            ids = tok.tokenize(value)
            # one sequence per document, EOD counted in it; an empty document has none
            assert seqs == ([ids + [tok.eod]] if ids else [])


def test_sentence_split_round_trip(tmp_path, tok, records):
    src = write_jsonl(tmp_path / "s.jsonl", records[:60])
    out = str(tmp_path / "s")
    run(["--input", src, "--output-prefix", out, "--split-sentences", "--sentence-splitter",
         "simple", "--append-eod", *GPT2])
    ds = IndexedDataset(out + "_text_sentence")
    for d, record in enumerate(records[:60]):
        expected = [tok.tokenize(s) for s in simple_split_sentences(record["text"])]
        expected = [ids for ids in expected if ids]
        if expected:
            expected[-1] = expected[-1] + [tok.eod]
        assert [ds[i].tolist() for i in range(ds.doc_idx[d], ds.doc_idx[d + 1])] == expected


def test_simple_sentence_splitter():
    text = "Hello there. How are you?  I am fine!\nSee e.g. this. 3 cats.\n\n\"Quoted.\" Done"
    assert simple_split_sentences(text) == [
        "Hello there.", "How are you?", "I am fine!", "See e.g. this.", "3 cats.",
        "\"Quoted.\"", "Done"]
    assert simple_split_sentences(text, keep_newlines=True)[2:5] == [
        "I am fine!\n", "See e.g. this.", "3 cats.\n\n"]
    assert simple_split_sentences("  ") == []


def test_zst_and_inputs_forms_give_same_files(tmp_path, records):
    plain = write_jsonl(tmp_path / "all.jsonl", records)
    data = open(plain, "rb").read()
    half = data.index(b"\n", len(data) // 2) + 1
    cctx = zstandard.ZstdCompressor()
    with open(tmp_path / "all.jsonl.zst", "wb") as f:  # two frames, split mid-stream
        f.write(cctx.compress(data[:half]) + cctx.compress(data[half:]))
    run(["--input", plain, "--output-prefix", tmp_path / "p", "--append-eod", *GPT2])
    run(["--input", tmp_path / "all.jsonl.zst", "--output-prefix", tmp_path / "z",
         "--append-eod", *GPT2])
    assert files(str(tmp_path / "z_text_document")) == files(str(tmp_path / "p_text_document"))
    # The same lines split over two files, given as a comma list and as a glob.
    (tmp_path / "parts").mkdir()
    open(tmp_path / "parts" / "0.jsonl", "wb").write(data[:half])
    open(tmp_path / "parts" / "1.jsonl", "wb").write(data[half:])
    run(["--input", f"{tmp_path}/parts/0.jsonl,{tmp_path}/parts/1.jsonl",
         "--output-prefix", tmp_path / "c", "--append-eod", *GPT2])
    run(["--input", f"{tmp_path}/parts/*.jsonl", "--output-prefix", tmp_path / "g",
         "--append-eod", *GPT2])
    for name in ("c", "g"):
        assert files(str(tmp_path / f"{name}_text_document")) == \
            files(str(tmp_path / "p_text_document"))


@pytest.mark.parametrize("extra", [[], ["--split-sentences", "--keep-newlines"]])
def test_workers_byte_identical(tmp_path, records, extra):
    src = write_jsonl(tmp_path / "w.jsonl", records)
    common = ["--input", src, "--append-eod", "--chunk-bytes", "2000", "--json-keys", "text",
              "meta.pile_set_name", *extra, *GPT2]
    run([*common, "--output-prefix", tmp_path / "w1", "--workers", "1"])
    run([*common, "--output-prefix", tmp_path / "w2", "--workers", "2", "--partitions", "2"])
    level = "sentence" if extra else "document"
    for key in ("text", "meta.pile_set_name"):
        assert files(str(tmp_path / f"w1_{key}_{level}")) == \
            files(str(tmp_path / f"w2_{key}_{level}"))


def test_merge_equals_single_run(tmp_path, records):
    whole = write_jsonl(tmp_path / "whole.jsonl", records)
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "a.jsonl", records[:120])
    write_jsonl(tmp_path / "b.jsonl", records[120:])
    run(["--input", whole, "--output-prefix", tmp_path / "single", "--append-eod", *GPT2])
    run(["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "shards" / "a",
         "--append-eod", *GPT2])
    run(["--input", tmp_path / "b.jsonl", "--output-prefix", tmp_path / "shards" / "b",
         "--append-eod", *GPT2])
    merge_datasets.main(["--input", str(tmp_path / "shards"),
                         "--output-prefix", str(tmp_path / "merged")])
    assert files(str(tmp_path / "merged")) == files(str(tmp_path / "single_text_document"))
    merge_datasets.main(["--inputs", str(tmp_path / "shards" / "a_text_document"),
                         str(tmp_path / "shards" / "b_text_document"),
                         "--output-prefix", str(tmp_path / "merged2")])
    assert files(str(tmp_path / "merged2")) == files(str(tmp_path / "single_text_document"))
    # Output inside the input directory, twice: the earlier output is not merged into itself.
    for _ in range(2):
        merge_datasets.main(["--input", str(tmp_path / "shards"),
                             "--output-prefix", str(tmp_path / "shards" / "all")])
        assert files(str(tmp_path / "shards" / "all")) == \
            files(str(tmp_path / "single_text_document"))


def _fails(capsys, tool, argv, *expected):
    """``tool`` exits 2 with one line on stderr containing every ``expected`` string."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(tool.main, [str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ")
    for text in expected:
        assert text in err[-1], err[-1]
    return err[-1]


def test_merge_errors(tmp_path, records, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, merge_datasets, ["--input", tmp_path / "empty", "--output-prefix",
                                    tmp_path / "m"], "no .bin/.idx datasets")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(tmp_path / "a.jsonl", records[:10])
    run(["--input", tmp_path / "a.jsonl", "--output-prefix", shards / "a", *GPT2])
    # An int32 dataset next to the uint16 one.
    with IndexedDatasetBuilder(str(shards / "c.bin"), dtype=np.int32) as b:
        b.add_document([1, 2], [2])
        b.finalize(str(shards / "c.idx"))
    _fails(capsys, merge_datasets, ["--input", shards, "--output-prefix", tmp_path / "m"],
           "different token dtypes", "c.idx (int32)")
    os.remove(shards / "c.bin")
    _fails(capsys, merge_datasets, ["--input", shards, "--output-prefix", tmp_path / "m"],
           "c.idx has no matching c.bin")
    assert not os.path.exists(tmp_path / "m.bin") and not os.path.exists(tmp_path / "m.idx")


@pytest.mark.parametrize("extra", [[], ["--split-sentences", "--sentence-splitter", "simple"],
                                   ["--workers", "2"]])
def test_array_of_sentences_is_a_pre_split_document(tmp_path, tok, extra):
    """As Megatron-LM: a key holding an array of strings (its *_ss.json files) is a document
    already split into sentences, one sequence per non-empty element, EOD on the last."""
    docs = [["First sentence here.", "Second one! ", "Third: \u00fcnic\u00f6de \u2713"],
            [], ["", "Only non-empty elements count."], "A plain string. Still one document."]
    src = write_jsonl(tmp_path / "ss.jsonl", [{"text": d} for d in docs])
    out = str(tmp_path / "o")
    run(["--input", src, "--output-prefix", out, "--append-eod", *extra, *GPT2])
    ds = IndexedDataset(out + ("_text_sentence" if extra[:1] == ["--split-sentences"]
                               else "_text_document"))
    assert ds.num_documents == len(docs)
    for d, doc in enumerate(docs):
        if isinstance(doc, str):
            doc = simple_split_sentences(doc) if extra[:1] == ["--split-sentences"] else [doc]
        expected = [ids for ids in (tok.tokenize(t) for t in doc) if ids]
        if expected:
            expected[-1] = expected[-1] + [tok.eod]
        got = [ds[i].tolist() for i in range(ds.doc_idx[d], ds.doc_idx[d + 1])]
        assert got == expected, d


BAD_INPUTS = [
    ("malformed", ['{"text": "ok"}', '{"text": "broken'], "bad.jsonl:2", "malformed JSON"),
    ("not_object", ['{"text": "ok"}', '["a list"]'], "bad.jsonl:2", "expected an object"),
    ("missing_key", ['{"text": "ok"}', '{"txt": "x"}'], "bad.jsonl:2", "key 'text'"),
    ("non_string", ['{"text": 5}'], "bad.jsonl:1", "is a number, expected a string"),
    ("mixed_array", ['{"text": ["a", 5]}'], "bad.jsonl:1",
     "is an array, expected a string or an array of strings"),
]


@pytest.mark.parametrize("name, lines, where, what", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_lines_fail_cleanly(tmp_path, capsys, name, lines, where, what):
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o", *GPT2],
           where, what)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no outputs, no temporaries
    # With two workers the same first error is reported.
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                     "--workers", "2", "--chunk-bytes", "1", *GPT2], where, what)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_nested_key_missing_names_key(tmp_path, capsys):
    src = write_jsonl(tmp_path / "n.jsonl", ['{"text": "a", "meta": {"x": "y"}}'])
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                     "--json-keys", "meta.pile_set_name", *GPT2],
           "n.jsonl:1", "key 'meta.pile_set_name'")


def test_corrupt_and_truncated_zst(tmp_path, capsys, records):
    data = open(write_jsonl(tmp_path / "r.jsonl", records), "rb").read()
    comp = zstandard.ZstdCompressor().compress(data)
    open(tmp_path / "trunc.jsonl.zst", "wb").write(comp[:len(comp) // 2])
    _fails(capsys, preprocess_data, ["--input", tmp_path / "trunc.jsonl.zst", "--output-prefix",
                                     tmp_path / "o", *GPT2], "trunc.jsonl.zst", "truncated")
    open(tmp_path / "junk.zst", "wb").write(b"this is not zstd data" * 10)
    _fails(capsys, preprocess_data, ["--input", tmp_path / "junk.zst", "--output-prefix",
                                     tmp_path / "o", *GPT2], "junk.zst", "corrupt zstd")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o")]


def test_skip_bad_lines(tmp_path, tok, capsys):
    lines = ['{"text": "good one"}', "{oops", '{"text": 3}', "", '{"text": "good two"}']
    src = write_jsonl(tmp_path / "s.jsonl", lines)
    summary = run(["--input", src, "--output-prefix", tmp_path / "o", "--skip-bad-lines",
                   "--append-eod", *GPT2])
    assert summary["bad_lines"] == 2 and summary["documents"] == 2
    err = capsys.readouterr().err
    assert "Skipped 2 bad lines" in err and "s.jsonl:2" in err and "s.jsonl:3" in err
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [a.tolist() for a in ds[0:2]] == [tok.tokenize("good one") + [tok.eod],
                                             tok.tokenize("good two") + [tok.eod]]


def test_flag_errors(tmp_path, capsys):
    src = write_jsonl(tmp_path / "f.jsonl", ['{"text": "x"}'])
    base = ["--input", src, "--output-prefix", tmp_path / "o", *GPT2]
    _fails(capsys, preprocess_data, [*base, "--dataset-impl", "lazy"], "--dataset-impl lazy",
           "only 'mmap'")
    _fails(capsys, preprocess_data, [*base, "--workers", "0"], "--workers")
    _fails(capsys, preprocess_data, ["--input", tmp_path / "nope.jsonl", "--output-prefix",
                                     tmp_path / "o", *GPT2], "nope.jsonl", "not found")
    _fails(capsys, preprocess_data, ["--input", f"{tmp_path}/*.zst", "--output-prefix",
                                     tmp_path / "o", *GPT2], "no file matches")
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix",
                                     tmp_path / "no" / "o", *GPT2], "does not exist")


def test_command_line_exit_status(tmp_path):
    """The real entry point: one line on stderr, status 2, nothing written."""
    src = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', "{nope"])
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", src,
                           "--output-prefix", str(tmp_path / "o"), *GPT2], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert lines == [proc.stderr.strip().splitlines()[-1]]
    assert "bad.jsonl:2: malformed JSON" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


# ---------------------------------------------------------------------------------------------
# BERT: --split-sentences with WordPiece, one sequence per sentence (<prefix>_text_sentence)
# ---------------------------------------------------------------------------------------------

BERT_VOCAB = os.path.join(ASSETS, "bert-vocab.txt")
BERT = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", BERT_VOCAB]
try:
    import sentencex  # noqa: F401  (the default --sentence-splitter; a dependency)
    HAVE_SENTENCEX = True
except ImportError:
    HAVE_SENTENCEX = False
needs_sentencex = pytest.mark.skipif(not HAVE_SENTENCEX, reason="sentencex is not installed")

#: English prose the default splitter (sentencex) must keep whole: abbreviations, initials,
#: decimals, versions, quotes, ellipses. Each entry is one document's gold sentences.
GOLD = [
    ["Dr. Smith arrived at noon.", "He was late."],
    ["Mr. and Mrs. Jones live on Elm St. near the park.", "They have two dogs."],
    ["The U.S. economy grew in 2019.", "Growth slowed later."],
    ["Use a solvent, e.g. acetone, to clean it.", "Then let it dry."],
    ["Some fruits, i.e. apples and pears, keep well.", "Others do not."],
    ["The price rose to 3.75 dollars.", "Sales fell by 2.5 percent."],
    ["\"Are you coming?\" she asked.", "He said nothing."],
    ["He said, \"I will be there.\"", "He never came."],
    ["Wait...", "Is that right?"],
    ["I thought about it... and then I left.", "Nobody noticed."],
    ["Prof. Adams and Gen. Lee met at 5 p.m. on Tuesday.", "The meeting was short."],
    ["J. R. R. Tolkien wrote many books.", "Most are long."],
    ["He earned a Ph.D. from MIT.", "Then he taught."],
    ["Version 2.0.1 fixed the bug.", "Version 2.1 added features."],
    ["Smith et al. reported similar results.", "Their sample was small."],
    ["\u201cHello,\u201d she said.", "\u201cGoodbye.\u201d", "He left."],
    ["Visit www.example.com for more.", "It is free."],
]


@pytest.fixture(scope="module")
def bert():
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=BERT_VOCAB)


def bert_records(n, seed=0):
    """Prose documents (gold sentences joined by spaces or newlines); every 7th is empty."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sentences = [] if i % 7 == 3 else [
            s for k in rng.choice(len(GOLD), rng.integers(1, 5)) for s in GOLD[k]]
        out.append({"text": ("\n\n" if i % 5 == 0 else " ").join(sentences)})
    return out


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [[ds[i].tolist() for i in range(ds.doc_idx[d], ds.doc_idx[d + 1])]
            for d in range(ds.num_documents)]


@needs_sentencex
def test_sentencex_keeps_abbreviations_decimals_quotes():
    split, name = preprocess_data.make_sentence_splitter("english", False)
    assert name.startswith("sentencex")
    for gold in GOLD:
        assert split(" ".join(gold)) == gold
    # Megatron's --lang names map to the ISO codes sentencex takes.
    assert preprocess_data.make_sentence_splitter("german", False)[1].endswith("(de)")


@needs_sentencex
def test_sentencex_keep_newlines():
    split, _ = preprocess_data.make_sentence_splitter("english", True, "sentencex")
    text = "First one.\n\nSecond one. Third\none.\n"
    assert split(text) == ["First one.\n\n", "Second one.", "Third\none.\n"]
    split, _ = preprocess_data.make_sentence_splitter("english", False, "sentencex")
    assert split(text) == ["First one.", "Second one.", "Third\none."]
    assert split("   \n ") == [] and split("") == []


def _idx_header(path):
    raw = open(path, "rb").read()
    n, docs = np.frombuffer(raw, "<u8", 2, 18)
    sizes = np.frombuffer(raw, "<i4", int(n), 34)
    pointers = np.frombuffer(raw, "<i8", int(n), 34 + 4 * int(n))
    doc_idx = np.frombuffer(raw, "<i8", int(docs), 34 + 12 * int(n))
    assert len(raw) == 34 + 12 * int(n) + 8 * int(docs)
    return raw[:9], int(np.frombuffer(raw, "<u8", 1, 9)[0]), raw[17], sizes, pointers, doc_idx


@needs_sentencex
def test_bert_sentence_round_trip(tmp_path, bert, capsys):
    records = bert_records(80)
    src = write_jsonl(tmp_path / "b.jsonl", records)
    out = str(tmp_path / "bert")
    summary = run(["--input", src, "--output-prefix", out, "--split-sentences",
                   "--append-eod", *BERT])
    assert summary["outputs"] == [out + "_text_sentence"]
    err = capsys.readouterr().err
    assert "Splitting sentences with sentencex" in err
    assert "Are you sure you don't want to split sentences?" not in err
    split, _ = preprocess_data.make_sentence_splitter("english", False)
    expected_docs = []
    for r in records:
        seqs = [ids for ids in (bert.tokenize(s) for s in split(r["text"])) if ids]
        if seqs:
            seqs[-1] = seqs[-1] + [bert.eod]  # EOD ([EOS]) counted in the last sentence
        expected_docs.append(seqs)
    assert read_docs(out + "_text_sentence") == expected_docs
    # The .idx as megatron-core reads it: MMIDIDX v1, uint16 (code 8), sizes/pointers/doc_idx.
    magic, version, code, sizes, pointers, doc_idx = _idx_header(out + "_text_sentence.idx")
    assert (magic, version, code) == (b"MMIDIDX\x00\x00", 1, 8)
    lens = [len(s) for d in expected_docs for s in d]
    assert sizes.tolist() == lens
    assert pointers.tolist() == (2 * np.concatenate(([0], np.cumsum(lens)[:-1]))).tolist()
    assert doc_idx.tolist() == np.concatenate(([0], np.cumsum([len(d) for d in
                                                                 expected_docs]))).tolist()
    assert os.path.getsize(out + "_text_sentence.bin") == 2 * sum(lens)
    assert any(len(d) == 0 for d in expected_docs) and any(len(d) > 2 for d in expected_docs)


@needs_sentencex
def test_bert_append_eod_accounting(tmp_path, bert):
    records = bert_records(30, seed=1)
    src = write_jsonl(tmp_path / "e.jsonl", records)
    run(["--input", src, "--output-prefix", tmp_path / "with", "--split-sentences",
         "--append-eod", *BERT])
    run(["--input", src, "--output-prefix", tmp_path / "without", "--split-sentences", *BERT])
    with_eod, without = read_docs(str(tmp_path / "with_text_sentence")), \
        read_docs(str(tmp_path / "without_text_sentence"))
    assert len(with_eod) == len(without) == len(records)
    for a, b in zip(with_eod, without):
        assert len(a) == len(b)  # EOD adds no sequence ...
        if b:  # ... it ends the last one, counted in its size
            assert a[:-1] == b[:-1] and a[-1] == b[-1] + [bert.eod]
            assert bert.eod not in b[-1]


@needs_sentencex
@pytest.mark.parametrize("tokenizer", ["BertWordPieceLowerCase", "BertWordPieceCase"])
def test_bert_workers_and_zst_byte_identical(tmp_path, tokenizer):
    records = bert_records(150, seed=2)
    plain = write_jsonl(tmp_path / "w.jsonl", records)
    open(tmp_path / "w.jsonl.zst", "wb").write(
        zstandard.ZstdCompressor().compress(open(plain, "rb").read()))
    common = ["--split-sentences", "--append-eod", "--chunk-bytes", "3000",
              "--tokenizer-type", tokenizer, "--vocab-file", BERT_VOCAB]
    run(["--input", plain, "--output-prefix", tmp_path / "one", "--workers", "1", *common])
    run(["--input", tmp_path / "w.jsonl.zst", "--output-prefix", tmp_path / "two",
         "--workers", "2", *common])
    assert files(str(tmp_path / "one_text_sentence")) == files(str(tmp_path / "two_text_sentence"))


def test_bert_without_split_warns(tmp_path, capsys):
    src = write_jsonl(tmp_path / "n.jsonl", bert_records(3))
    run(["--input", src, "--output-prefix", tmp_path / "o", *BERT])
    assert "Are you sure you don't want to split sentences?" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "o_text_document.idx")


def _nltk_punkt_installed():
    try:
        return preprocess_data._nltk_splitter("english", False) is not None
    except Exception:
        return False


@needs_sentencex
def test_sentence_splitter_choices(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", bert_records(5))
    split_auto, name = preprocess_data.make_sentence_splitter("english", False, "auto")
    if _nltk_punkt_installed():
        assert name.startswith("nltk")
    else:  # no download is ever tried: auto falls back to sentencex
        assert name.startswith("sentencex")
        _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                         "--split-sentences", "--sentence-splitter", "nltk",
                                         *BERT], "--sentence-splitter nltk", "not installed")
        assert not [n for n in os.listdir(tmp_path) if n.startswith("o")]
    run(["--input", src, "--output-prefix", tmp_path / "s", "--split-sentences",
         "--sentence-splitter", "simple", *BERT])
    assert "Splitting sentences with simple" in capsys.readouterr().err


BERT_BAD = [
    ("malformed", ['{"text": "Dr. Who. Ok."}', '{"text": "broken'], "bad.jsonl:2",
     "malformed JSON"),
    ("missing_key", ['{"text": "Fine."}', '{"body": "x"}'], "bad.jsonl:2", "key 'text'"),
]


@pytest.mark.parametrize("name, lines, where, what", BERT_BAD, ids=[b[0] for b in BERT_BAD])
@pytest.mark.parametrize("workers", ["1", "2"])
@needs_sentencex
def test_bert_bad_lines(tmp_path, capsys, name, lines, where, what, workers):
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                     "--split-sentences", "--workers", workers,
                                     "--chunk-bytes", "1", *BERT], where, what)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


@needs_sentencex
def test_bert_bad_inputs(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ok.jsonl", bert_records(4))
    split = ["--split-sentences"]
    _fails(capsys, preprocess_data, ["--input", tmp_path / "missing.jsonl", "--output-prefix",
                                     tmp_path / "o", *split, *BERT], "missing.jsonl",
           "not found")
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o", *split,
                                     "--tokenizer-type", "BertWordPieceLowerCase",
                                     "--vocab-file", tmp_path / "nope.txt"], "nope.txt")
    vocab = open(BERT_VOCAB, encoding="utf-8").read().split("\n")
    (tmp_path / "vocab.txt").write_text("\n".join(t for t in vocab if t not in ("[MASK]",
                                                                               "[SEP]")))
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o", *split,
                                     "--tokenizer-type", "BertWordPieceCase",
                                     "--vocab-file", tmp_path / "vocab.txt"],
           "vocab.txt", "special token", "[SEP] [MASK]")
    data = open(src, "rb").read() * 50
    comp = zstandard.ZstdCompressor().compress(data)
    open(tmp_path / "trunc.jsonl.zst", "wb").write(comp[:len(comp) // 2])
    _fails(capsys, preprocess_data, ["--input", tmp_path / "trunc.jsonl.zst", "--output-prefix",
                                     tmp_path / "o", *split, *BERT], "trunc.jsonl.zst",
           "truncated")
    open(tmp_path / "junk.jsonl.zst", "wb").write(b"\x28\xb5\x2f\xfd" + b"garbage" * 40)
    _fails(capsys, preprocess_data, ["--input", tmp_path / "junk.jsonl.zst", "--output-prefix",
                                     tmp_path / "o", *split, "--workers", "2", *BERT],
           "junk.jsonl.zst", "zstd")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o_") or n.startswith("o.")]
