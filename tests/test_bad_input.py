"""Bad input to every entry point, run as a user would (a subprocess).

Each case must exit with status 2, print exactly one line on stderr (``error: ...`` naming the
file, line or flag), no traceback, and leave no output (nor temporary) files behind. Covered per
tool: missing file, malformed record, vocabulary/model mismatch, corrupt binary file.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import IndexedDatasetBuilder
from training_helpers import MERGES, ROOT, VOCAB, gpt_argv, run

GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]


def cli(tool, *argv):
    return subprocess.run([sys.executable, tool, *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def files_under(directory):
    return sorted(os.path.relpath(os.path.join(d, f), directory)
                  for d, _, names in os.walk(directory) for f in names)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files a user might wrongly pass: not JSON, foreign merges, empty, a directory, ..."""
    d = tmp_path_factory.mktemp("bad")
    (d / "ok.jsonl").write_text('{"text": "hello world"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (d / "number.jsonl").write_text('{"text": 5}\n')
    (d / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (d / "notjson.json").write_text("{not json")
    (d / "merges.txt").write_text("#version: 0.2\nzz qq\n")  # tokens not in VOCAB
    vocab = json.load(open(VOCAB))
    vocab.update({f"extra{i}": len(vocab) + i for i in range(600)})  # more ids than the model
    (d / "big-vocab.json").write_text(json.dumps(vocab))
    (d / "adir").mkdir()
    return d


def corrupt_copy(prefix, out, bin_bytes=None, idx_bytes=None):
    """Copy the dataset ``prefix`` to ``out`` with .bin/.idx contents replaced by a function."""
    for ext, mutate in ((".bin", bin_bytes), (".idx", idx_bytes)):
        data = open(prefix + ext, "rb").read()
        open(str(out) + ext, "wb").write(mutate(data) if mutate else data)
    return str(out)


HALF = lambda b: b[:len(b) // 2]  # noqa: E731
JUNK = lambda b: b"definitely not a dataset " * 4  # noqa: E731
EMPTY = lambda b: b""  # noqa: E731
DATASETS = {"truncated-bin": (HALF, None, "c.bin", "truncated"),
            "truncated-idx": (None, HALF, "c.idx", "truncated"),
            "junk-idx": (None, JUNK, "c.idx", "not an MMIDIDX index"),
            "empty": (EMPTY, EMPTY, "c.idx", "too short")}


@pytest.fixture(scope="module")
def checkpoint(data_prefix, tmp_path_factory):
    """A 2-iteration GPT checkpoint saved by pretraining (GPT-2 BPE, padded vocab 1536)."""
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, "--eval-iters", "0", iters=2))
    return ckpt


CHECKPOINTS = {"truncated": (HALF, "cannot read checkpoint"),
               "junk": (lambda b: b"\x80\x02garbage" + b"x" * 100, "cannot read checkpoint"),
               "empty": (EMPTY, "cannot read checkpoint"),
               "not-a-dict": (None, "is not a Megatron checkpoint")}


def broken_checkpoint(checkpoint, out, kind):
    """A copy of ``checkpoint`` whose model_optim_rng.pt is damaged as ``CHECKPOINTS[kind]``."""
    shutil.copytree(checkpoint, out)
    path = glob.glob(os.path.join(str(out), "iter_*", "mp_rank_00", "model_optim_rng.pt"))[0]
    mutate = CHECKPOINTS[kind][0]
    if mutate is None:
        torch.save([1, 2, 3], path)
    else:
        data = open(path, "rb").read()
        open(path, "wb").write(mutate(data))
    return str(out), path


# -- tools/preprocess_data.py ------------------------------------------------------------------

PREPROCESS = {
    "missing-input": (["--input", "{bad}/nope.jsonl", *GPT2], ["--input", "nope.jsonl"]),
    "input-is-dir": (["--input", "{bad}/adir", *GPT2], ["--input", "is a directory"]),
    "empty-input": (["--input", "{bad}/empty.jsonl", *GPT2], ["empty.jsonl", "no documents"]),
    "malformed-line": (["--input", "{bad}/malformed.jsonl", *GPT2],
                       ["malformed.jsonl:2", "malformed JSON"]),
    "not-utf8": (["--input", "{bad}/latin1.jsonl", *GPT2], ["latin1.jsonl:1", "utf-8"]),
    "missing-vocab": (["--input", "{bad}/ok.jsonl", "--tokenizer-type", "GPT2BPETokenizer",
                       "--vocab-file", "{bad}/nope.json", "--merge-file", MERGES],
                      ["--vocab-file", "nope.json"]),
    "vocab-not-json": (["--input", "{bad}/ok.jsonl", "--tokenizer-type", "GPT2BPETokenizer",
                        "--vocab-file", "{bad}/notjson.json", "--merge-file", MERGES],
                       ["--vocab-file", "notjson.json", "not valid JSON"]),
    "vocab-is-dir": (["--input", "{bad}/ok.jsonl", "--tokenizer-type", "GPT2BPETokenizer",
                      "--vocab-file", "{bad}/adir", "--merge-file", MERGES],
                     ["--vocab-file", "adir"]),
    "merges-not-of-vocab": (["--input", "{bad}/ok.jsonl", "--tokenizer-type", "GPT2BPETokenizer",
                             "--vocab-file", VOCAB, "--merge-file", "{bad}/merges.txt"],
                            ["--merge-file", "merges.txt", "does not match"]),
}


@pytest.mark.parametrize("case", PREPROCESS)
def test_preprocess_data(bad, tmp_path, case):
    argv, needles = PREPROCESS[case]
    proc = cli("tools/preprocess_data.py", *(a.format(bad=bad) for a in argv),
               "--output-prefix", tmp_path / "out")
    assert_user_error(proc, *needles)
    assert files_under(tmp_path) == []


# -- tools/merge_datasets.py -------------------------------------------------------------------

@pytest.mark.parametrize("case", DATASETS)
def test_merge_datasets_corrupt_input(data_prefix, tmp_path, case):
    bin_bytes, idx_bytes, name, what = DATASETS[case]
    (tmp_path / "in").mkdir()
    broken = corrupt_copy(data_prefix, tmp_path / "in" / "c", bin_bytes, idx_bytes)
    (tmp_path / "out").mkdir()
    proc = cli("tools/merge_datasets.py", "--inputs", data_prefix, broken,
               "--output-prefix", tmp_path / "out" / "m")
    assert_user_error(proc, name, what)
    assert files_under(tmp_path / "out") == []


def test_merge_datasets_missing_and_mismatched_inputs(data_prefix, tmp_path, bad):
    (tmp_path / "out").mkdir()
    out = ["--output-prefix", tmp_path / "out" / "m"]
    assert_user_error(cli("tools/merge_datasets.py", "--inputs", data_prefix, tmp_path / "nope",
                          *out), "nope.idx", "not found")
    assert_user_error(cli("tools/merge_datasets.py", "--input", tmp_path / "nodir", *out),
                      "--input", "not a directory")
    assert_user_error(cli("tools/merge_datasets.py", "--input", bad / "ok.jsonl", *out),
                      "--input", "not a directory")
    # Token ids of another vocabulary size (int32 vs the corpus's uint16) cannot be merged.
    with IndexedDatasetBuilder(str(tmp_path / "wide.bin"), dtype=np.int32) as builder:
        builder.add_document([70000, 2], [2])
        builder.finalize(str(tmp_path / "wide.idx"))
    assert_user_error(cli("tools/merge_datasets.py", "--inputs", data_prefix,
                          tmp_path / "wide", *out), "different token dtypes", "wide.idx (int32)")
    assert files_under(tmp_path / "out") == []


# -- tools/train_bpe_vocab.py ------------------------------------------------------------------

BPE = {"missing-input": ("nope.jsonl", ["--input", "nope.jsonl", "no such file"]),
       "input-is-dir": ("adir", ["--input", "adir", "is a directory"]),
       "empty-input": ("empty.jsonl", ["--input", "empty.jsonl", "no documents"]),
       "malformed-line": ("malformed.jsonl", ["malformed.jsonl:2", "expected a JSON object"]),
       "not-a-string": ("number.jsonl", ["number.jsonl:1", "string 'text'"]),
       "not-utf8": ("latin1.jsonl", ["latin1.jsonl:1", "utf-8"])}


@pytest.mark.parametrize("case", BPE)
def test_train_bpe_vocab(bad, tmp_path, case):
    name, needles = BPE[case]
    proc = cli("tools/train_bpe_vocab.py", "--input", bad / name, "--vocab-size", "300",
               "--output-dir", tmp_path / "vocab")
    assert_user_error(proc, *needles)
    assert files_under(tmp_path) == []


def test_train_bpe_vocab_output_dir_is_a_file(bad, tmp_path):
    (tmp_path / "vocab").write_text("x")
    proc = cli("tools/train_bpe_vocab.py", "--input", bad / "ok.jsonl", "--vocab-size", "300",
               "--output-dir", tmp_path / "vocab")
    assert_user_error(proc, "--output-dir", "not a directory")
    assert files_under(tmp_path) == ["vocab"]


def test_train_bpe_vocab_failed_write_keeps_the_previous_pair(tmp_path, monkeypatch):
    """A write that fails (disk full) on merges.txt leaves the old vocab.json and merges.txt
    as they were -- never a new vocabulary beside old merges -- and no temporary files."""
    import builtins

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_bpe_vocab

    out = tmp_path / "vocab"
    out.mkdir()
    (out / "vocab.json").write_text("old vocab")
    (out / "merges.txt").write_text("old merges")
    real_open = builtins.open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith("merges.txt.tmp"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    with pytest.raises(OSError, match="No space"):
        train_bpe_vocab.train_bpe(texts, 300, str(out))
    assert sorted(os.listdir(out)) == ["merges.txt", "vocab.json"]
    assert (out / "vocab.json").read_text() == "old vocab"
    assert (out / "merges.txt").read_text() == "old merges"


# -- pretrain_gpt.py ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated-bin", "junk-idx"])
def test_pretrain_corrupt_dataset(data_prefix, tmp_path, case):
    bin_bytes, idx_bytes, name, what = DATASETS[case]
    broken = corrupt_copy(data_prefix, tmp_path / "c", bin_bytes, idx_bytes)
    proc = cli("pretrain_gpt.py", *gpt_argv(broken, "--save", tmp_path / "save", iters=2))
    assert_user_error(proc, name, what)
    assert files_under(tmp_path / "save") == []


PRETRAIN = {
    "data-path-is-dir": (["--data-path", "{bad}/adir"], ["--data-path", "adir"]),
    "missing-vocab": (["--vocab-file", "{bad}/nope.json"], ["--vocab-file", "nope.json"]),
    "vocab-not-json": (["--vocab-file", "{bad}/notjson.json"], ["--vocab-file", "not valid JSON"]),
    "merges-not-of-vocab": (["--merge-file", "{bad}/merges.txt"], ["--merge-file", "merges.txt"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", PRETRAIN)
def test_pretrain_bad_files(data_prefix, bad, tmp_path, case):
    extra, needles = PRETRAIN[case]
    proc = cli("pretrain_gpt.py", *gpt_argv(data_prefix, "--save", tmp_path / "save", iters=2),
               *(a.format(bad=bad) for a in extra))  # later flags win
    assert_user_error(proc, *needles)
    assert files_under(tmp_path / "save") == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "not-a-dict"])
def test_pretrain_load_corrupt_checkpoint(data_prefix, checkpoint, tmp_path, kind):
    load, path = broken_checkpoint(checkpoint, tmp_path / "ckpt", kind)
    proc = cli("pretrain_gpt.py", *gpt_argv(data_prefix, "--load", load, "--save", load,
                                            iters=4))
    assert_user_error(proc, path, CHECKPOINTS[kind][1])
    assert files_under(load) == files_under(checkpoint)  # nothing new saved


@pytest.mark.slow
def test_pretrain_load_with_another_vocabulary_or_a_file(data_prefix, checkpoint, bad):
    proc = cli("pretrain_gpt.py", *gpt_argv(data_prefix, "--load", checkpoint, iters=4),
               "--tokenizer-type", "NullTokenizer", "--vocab-size", "100")
    assert_user_error(proc, "model_optim_rng.pt", "padded vocabulary of 1536")
    # A file where the checkpoint directory belongs is not "no checkpoint yet".
    proc = cli("pretrain_gpt.py", *gpt_argv(data_prefix, "--load", bad / "ok.jsonl", iters=2))
    assert_user_error(proc, "--load", "ok.jsonl", "not a directory")


# -- tools/generate_text.py --------------------------------------------------------------------

GENERATE = ["--prompt", "hello", "--max-new-tokens", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_generate_text_corrupt_checkpoint(checkpoint, tmp_path, kind):
    load, path = broken_checkpoint(checkpoint, tmp_path / "ckpt", kind)
    proc = cli("tools/generate_text.py", "--load", load, *GENERATE)
    assert_user_error(proc, path, CHECKPOINTS[kind][1])


@pytest.mark.slow
def test_generate_text_missing_checkpoint(bad):
    for load in (bad / "nope", bad / "ok.jsonl"):
        assert_user_error(cli("tools/generate_text.py", "--load", load, *GENERATE),
                          f"--load {load}", "latest_checkpointed_iteration.txt")


GENERATE_TOKENIZER = {
    "missing-vocab": (["--vocab-file", "{bad}/nope.json"], ["--vocab-file", "nope.json"]),
    "vocab-not-json": (["--vocab-file", "{bad}/notjson.json"], ["--vocab-file", "not valid JSON"]),
    "merges-not-of-vocab": (["--merge-file", "{bad}/merges.txt"], ["--merge-file", "merges.txt"]),
    "vocab-larger-than-model": (["--vocab-file", "{bad}/big-vocab.json"],
                                ["2101 tokens", "vocabulary of 1536"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", GENERATE_TOKENIZER)
def test_generate_text_tokenizer_files(checkpoint, bad, case):
    extra, needles = GENERATE_TOKENIZER[case]
    proc = cli("tools/generate_text.py", "--load", checkpoint, *GENERATE,
               *(a.format(bad=bad) for a in extra))
    assert_user_error(proc, *needles)


@pytest.mark.slow
def test_generate_text_vocab_path_stored_in_checkpoint_is_gone(checkpoint, tmp_path):
    load, path = broken_checkpoint(checkpoint, tmp_path / "ckpt", "truncated")
    ckpt = torch.load(os.path.join(checkpoint, os.path.relpath(path, load)), weights_only=False)
    ckpt["args"].vocab_file = str(tmp_path / "moved" / "vocab.json")
    torch.save(ckpt, path)
    proc = cli("tools/generate_text.py", "--load", load, *GENERATE)
    assert_user_error(proc, "moved/vocab.json", "stored in the checkpoint", "pass --vocab-file")


# -- tools/checkpoint_util.py ------------------------------------------------------------------

CONVERT = ["--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "junk", "not-a-dict"])
def test_checkpoint_util_corrupt_checkpoint(checkpoint, tmp_path, kind):
    load, path = broken_checkpoint(checkpoint, tmp_path / "ckpt", kind)
    proc = cli("tools/checkpoint_util.py", "--load", load, "--save", tmp_path / "out", *CONVERT)
    assert_user_error(proc, path, CHECKPOINTS[kind][1])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_checkpoint_util_missing_or_mismatched_checkpoint(checkpoint, tmp_path, bad):
    out = tmp_path / "out"
    proc = cli("tools/checkpoint_util.py", "--load", tmp_path / "nope", "--save", out, *CONVERT)
    assert_user_error(proc, "--load", "nope", "latest_checkpointed_iteration.txt")
    # args that say TP 2 while the directory holds one tensor rank
    load, path = broken_checkpoint(checkpoint, tmp_path / "ckpt", "truncated")
    ckpt = torch.load(os.path.join(checkpoint, os.path.relpath(path, load)), weights_only=False)
    ckpt["args"].tensor_model_parallel_size = 2
    torch.save(ckpt, path)
    proc = cli("tools/checkpoint_util.py", "--load", load, "--save", out, *CONVERT)
    assert_user_error(proc, "holds 1 shards along tensor_model_parallel_size but its args say 2")
    assert not os.path.exists(out)
    proc = cli("tools/checkpoint_util.py", "--load", checkpoint, "--save", bad / "ok.jsonl",
               *CONVERT)
    assert_user_error(proc, "cannot write", "ok.jsonl")


@pytest.mark.slow
def test_corrupt_tracker_file(data_prefix, checkpoint, tmp_path):
    """latest_checkpointed_iteration.txt holding binary garbage (not UTF-8) names the file."""
    load = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, load)
    tracker = os.path.join(load, "latest_checkpointed_iteration.txt")
    with open(tracker, "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    for tool, argv in (("tools/generate_text.py", GENERATE),
                       ("tools/checkpoint_util.py", ["--save", tmp_path / "out", *CONVERT]),
                       ("pretrain_gpt.py", gpt_argv(data_prefix, iters=2))):
        assert_user_error(cli(tool, "--load", load, *argv), tracker,
                          "expected an iteration number")
    assert not os.path.exists(tmp_path / "out")
