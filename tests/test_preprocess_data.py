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
    run(["--input", src, "--output-prefix", out, "--split-sentences", "--append-eod", *GPT2])
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


@pytest.mark.parametrize("extra", [[], ["--split-sentences"], ["--workers", "2"]])
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
