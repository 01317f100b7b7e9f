"""GPT causal-LM finetuning on plain text (tasks/causal_lm): data preparation, finetune.py with
random-LTD / TokenBypass, exact resume, the single-layer sweep, bad inputs.

The corpora are tiny format-faithful fixtures written here: PTB's text-only files (lowercased,
numbers as N, <unk>, one sentence per line with a leading space) and the raw WikiText files
(' = Title = ' headings, blank ' ' lines, '@-@' separators)."""

import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from megatron.errors import UserError
from tasks.causal_lm import data as text_data
from tasks.causal_lm import finetune, layer_sweep
from test_examples import _clean_env
from training_helpers import MERGES, VOCAB, gpt_argv, run

TOKENIZER = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": VOCAB, "merge_file": MERGES,
             "tokenizer_model": None, "vocab_size": None}
SEQ = 32
LAYERS = 4

PTB_WORDS = ("the a of to in and for is that on said it by from at as with was mr. its million "
             "company year market stock shares new n't 's billion trading price sales board "
             "president chairman bank investors").split()
WIKI_WORDS = ("The game was released in Japan and North America , it is the third entry of "
              "the series . Its story follows a unit of soldiers during the war").split()


def write_ptb(path, lines, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            ids = rng.integers(0, len(PTB_WORDS) + 4, size=rng.integers(4, 18))
            words = [PTB_WORDS[i] if i < len(PTB_WORDS) else ("N" if i % 2 else "<unk>")
                     for i in ids]
            f.write(" " + " ".join(words) + " \n")
    return str(path)


def write_wikitext(path, articles, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for a in range(articles):
            f.write(" \n = Article {} = \n \n".format(a))
            for s in range(2):
                if s:
                    f.write(" = = Section {} = = \n \n".format(s))
                words = [WIKI_WORDS[i] for i in rng.integers(0, len(WIKI_WORDS), size=40)]
                words[5:5] = ["1", "@,@", "000", "@-@", "year"]
                f.write(" " + " ".join(words) + " \n \n")
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    lines = d / "notes.txt"
    lines.write_text("First line of notes.\n\nSecond line, after a blank one.\n  indented\n",
                     encoding="utf-8")
    return {"ptb_train": write_ptb(d / "ptb.train.txt", 160, 0),
            "ptb_valid": write_ptb(d / "ptb.valid.txt", 30, 1),
            "wiki_train": write_wikitext(d / "wiki.train.raw", 6, 2),
            "wiki_valid": write_wikitext(d / "wiki.valid.raw", 2, 3),
            "lines": str(lines), "dir": d}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_prefix):
    """A 4-layer GPT (seq 32) saved by pretrain_gpt.py: the checkpoint every finetune starts
    from."""
    out = str(tmp_path_factory.mktemp("pretrained") / "ckpt")
    run(gpt_argv(data_prefix, "--num-layers", str(LAYERS), "--max-position-embeddings",
                 str(SEQ), "--save", out, "--eval-iters", "0", iters=2))
    return out


def tokenize_rows(path, fmt):
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    out = []
    for row in text_data.iter_rows(path, fmt):
        if row:
            out.extend(tok.tokenize(row))
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# data


def test_rows_follow_the_hf_datasets():
    # ptb_text_only strips each line; wikitext-raw keeps the newline, blank lines become "";
    # lines keeps every line as it is
    assert text_data.row_text(" the cat sat \n", "ptb") == "the cat sat"
    assert text_data.row_text(" = Title = \n", "wikitext") == " = Title = \n"
    assert text_data.row_text(" \n", "wikitext") == ""
    assert text_data.row_text("  x \n", "lines") == "  x \n"
    assert text_data.row_text("\n", "lines") == "\n"


@pytest.mark.parametrize("fmt,key", [("ptb", "ptb_train"), ("wikitext", "wiki_train"),
                                     ("lines", "lines")])
def test_prepare_concatenates_rows_tokenized_one_by_one(texts, tmp_path, fmt, key):
    from megatron.data.indexed_dataset import IndexedDataset

    logs = []
    out = text_data.prepare_text(texts[key], fmt, str(tmp_path), TOKENIZER, workers=2,
                                 log=logs.append)
    expected = tokenize_rows(texts[key], fmt)
    ds = IndexedDataset(out.prefix)
    # one sequence, one document: the stream in file order, no EOD between rows
    assert list(ds.sizes) == [len(expected)] and list(ds.doc_idx) == [0, 1]
    np.testing.assert_array_equal(ds.get(0).astype(np.int64), expected)
    assert out.tokens == len(expected) and not out.cached
    with open(texts[key], encoding="utf-8") as f:
        rows = f.readlines()
    assert out.rows == len(rows)
    assert out.words == sum(len(text_data.row_text(r, fmt).split()) for r in rows)


def test_prepare_rows_do_not_merge_across_lines(tmp_path):
    # PTB rows are stripped and concatenated as HF run_clm does: "b" + "c" are two rows, each
    # tokenized alone, not the text "bc"
    path = tmp_path / "ptb.small.txt"
    path.write_text(" a b \n c d \n", encoding="utf-8")
    from megatron.data.indexed_dataset import IndexedDataset
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    out = text_data.prepare_text(str(path), "ptb", str(tmp_path / "d"), TOKENIZER)
    got = IndexedDataset(out.prefix).get(0).tolist()
    assert got == tok.tokenize("a b") + tok.tokenize("c d")


def test_prepare_cache(texts, tmp_path):
    d = str(tmp_path / "cache")
    first = text_data.prepare_text(texts["ptb_valid"], "ptb", d, TOKENIZER)
    stamp = os.stat(first.prefix + ".bin").st_mtime_ns
    again = text_data.prepare_text(texts["ptb_valid"], "ptb", d, TOKENIZER)
    assert again.cached and again.prefix == first.prefix and again.tokens == first.tokens
    assert os.stat(first.prefix + ".bin").st_mtime_ns == stamp
    # another format or tokenizer file is another entry
    other = text_data.prepare_text(texts["ptb_valid"], "lines", d, TOKENIZER)
    assert other.prefix != first.prefix and not other.cached
    vocab = tmp_path / "vocab.json"
    vocab.write_bytes(open(VOCAB, "rb").read() + b"\n")
    third = text_data.prepare_text(texts["ptb_valid"], "ptb", d,
                                   dict(TOKENIZER, vocab_file=str(vocab)))
    assert third.prefix != first.prefix and not third.cached
    # a changed source (mtime) is tokenized again
    src = tmp_path / "copy.txt"
    src.write_text(open(texts["ptb_valid"], encoding="utf-8").read(), encoding="utf-8")
    a = text_data.prepare_text(str(src), "ptb", d, TOKENIZER)
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10 ** 9))
    b = text_data.prepare_text(str(src), "ptb", d, TOKENIZER)
    assert a.prefix != b.prefix and not b.cached
    # an entry without its completion marker is not used
    os.remove(b.prefix[:-len("_text_document")] + ".json")
    assert not text_data.prepare_text(str(src), "ptb", d, TOKENIZER).cached


def test_prepare_bad_inputs(texts, tmp_path):
    d = str(tmp_path / "d")

    def err(path, fmt, tokenizer=TOKENIZER):
        with pytest.raises(UserError) as info:
            text_data.prepare_text(str(path), fmt, d, tokenizer)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "no such file" in err(tmp_path / "missing.txt", "ptb")
    (tmp_path / "empty.txt").write_text("")
    assert "no text" in err(tmp_path / "empty.txt", "lines")
    (tmp_path / "blank.txt").write_text(" \n\n \n")
    assert "no text" in err(tmp_path / "blank.txt", "wikitext")
    assert "--format ptb expects" in err(texts["wiki_train"], "ptb")
    assert "--format wikitext expects" in err(texts["ptb_train"], "wikitext")
    (tmp_path / "Upper.txt").write_text(" The Cat sat \n")
    assert "uppercase word 'The'" in err(tmp_path / "Upper.txt", "ptb")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    assert "latin1.txt:1: not UTF-8" in err(tmp_path / "latin1.txt", "lines")
    (tmp_path / "nul.txt").write_bytes(b"text\n\x00\x01\n")
    assert "nul.txt:2: contains NUL" in err(tmp_path / "nul.txt", "lines")
    assert "--format csv: expected one of" in err(texts["lines"], "csv")
    assert "--vocab-file" in err(texts["lines"], "lines",
                                 dict(TOKENIZER, vocab_file=str(tmp_path / "nope.json")))
    assert not os.path.isdir(d) or not [f for f in os.listdir(d) if f.endswith(".json")]


def test_other_ranks_wait_for_rank0(texts, tmp_path, monkeypatch):
    d = str(tmp_path / "d")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    kwargs = dict(tokenizer=TOKENIZER, data_dir=d, timeout=0.3, poll=0.05)
    with pytest.raises(UserError, match="rank 1 waited 0 s for rank 0"):
        text_data.prepare_on_rank0(texts["ptb_valid"], "ptb", rank=1, **kwargs)
    ready = text_data.prepare_on_rank0(texts["ptb_valid"], "ptb", rank=0, **kwargs)
    seen = text_data.prepare_on_rank0(texts["ptb_valid"], "ptb", rank=1, **kwargs)
    assert seen.cached and seen.prefix == ready.prefix
    # rank 0 fails: the others stop with its message (only for the same launch)
    bad = tmp_path / "ptb.bad.txt"  # past the lines every rank checks: only rank 0 sees it
    bad.write_bytes(b" ok line \n" * (text_data.CHECK_LINES + 1) + b" \xff\xfe \n")
    with pytest.raises(UserError, match="not UTF-8"):
        text_data.prepare_on_rank0(str(bad), "ptb", rank=0, **kwargs)
    with pytest.raises(UserError, match="rank 0 failed to prepare --input .*not UTF-8"):
        text_data.prepare_on_rank0(str(bad), "ptb", rank=1, **kwargs)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
    with pytest.raises(UserError, match="waited"):
        text_data.prepare_on_rank0(str(bad), "ptb", rank=1, **kwargs)


# ---------------------------------------------------------------------------------------------
# finetune.py


def ft_argv(texts, pretrained, tmp_path, save, *flags, extra=(), data="data"):
    return ["--train-text", texts["ptb_train"], "--valid-text", texts["ptb_valid"],
            "--format", "ptb", "--pretrained-checkpoint", pretrained,
            "--save", str(tmp_path / save), "--data-dir", str(tmp_path / data),
            "--global-batch-size", "4", "--micro-batch-size", "2", "--log-interval", "1",
            "--workers", "1", *flags, "--", "--num-workers", "0", "--device", "cpu", *extra]


def logged(lines, field):
    """{iteration: value} of a field of the training log lines."""
    out = {}
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/", line)
        f = re.search(re.escape(field) + r":\s+([0-9.E+-]+)", line)
        if m and f and line.lstrip().startswith("iteration"):
            out[int(m.group(1))] = float(f.group(1))
    return out


def model_state(save):
    from megatron.checkpointing import checkpoint_file, read_tracker

    it, _ = read_tracker(save)
    state = torch.load(checkpoint_file(save, it), map_location="cpu", weights_only=False)
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(prefix + k + ".", v)
            elif torch.is_tensor(v):
                flat[prefix + k] = v

    walk("", state["model"])
    return it, flat, state


@pytest.mark.slow
def test_finetune_random_ltd_schedule_and_result(texts, pretrained, tmp_path):
    lines = []
    iters, full_at, start = 8, 0.5, 8
    result = finetune.main(ft_argv(texts, pretrained, tmp_path, "ltd", "--train-iters",
                                   str(iters), "--random-ltd-start", str(start),
                                   "--random-ltd-step", "8", "--random-ltd-full-at",
                                   str(full_at)), log=lines.append)
    kept = logged(lines, "random ltd reserved length")
    # the kept length grows from 8 and reaches the full 32 after half of the run: iteration
    # line t reports step t - 1's length, full from step round(0.5 * 8) = 4
    steps = round(full_at * iters)
    assert kept[1] == start
    assert all(kept[t] < SEQ for t in range(1, steps + 1))
    assert all(kept[t] == SEQ for t in range(steps + 1, iters + 1))
    assert sorted(kept) == list(range(1, iters + 1))
    # layer tokens: layers 1..L-2 at the kept length, the first and last at full length
    expected = sum(4 * (2 * SEQ + (LAYERS - 2) * int(kept[t])) for t in kept)
    assert result["layer_tokens"] == expected
    assert logged(lines, "consumed layer tokens")[iters] == expected
    assert result["dense_layer_tokens"] == iters * 4 * SEQ * LAYERS
    assert 0 < result["layer_token_saving"] < 1
    # the whole validation text, scored once, on the finetuning token stream
    valid_tokens = len(tokenize_rows(texts["ptb_valid"], "ptb"))
    assert result["valid_tokens"] == valid_tokens
    assert result["train_tokens"] == len(tokenize_rows(texts["ptb_train"], "ptb"))
    assert math.isclose(result["valid_ppl"], math.exp(result["valid_loss"]))
    assert result["iterations"] == iters and result["finished"]
    assert result["random_ltd"]["schedule_steps"] == steps
    on_disk = json.load(open(tmp_path / "ltd" / finetune.RESULT_FILE))
    assert on_disk["layer_tokens"] == expected and on_disk["valid_loss"] == result["valid_loss"]
    assert any(line.startswith("finetune ptb: 8 iterations") for line in lines)
    assert any("validation results on ptb.valid.txt" in line for line in lines)
    # the paper's defaults reach pretrain_gpt.py
    argv = result["argv"]
    assert argv[argv.index("--lr") + 1] == "5e-05"
    assert argv[argv.index("--lr-decay-style") + 1] == "constant"
    assert "--finetune" in argv and "--use-checkpoint-args" in argv


@pytest.mark.slow
def test_finetune_dense_and_exact_resume(texts, pretrained, tmp_path):
    flags = ("--train-iters", "6", "--random-ltd-start", "8", "--random-ltd-step", "8")
    # dense: no dropping, layer tokens are the dense count
    dense_lines = []
    dense = finetune.main(ft_argv(texts, pretrained, tmp_path, "dense", "--train-iters", "3"),
                          log=dense_lines.append)
    assert dense["layer_tokens"] == dense["dense_layer_tokens"] == 3 * 4 * SEQ * LAYERS
    assert dense["random_ltd"] is None and not logged(dense_lines, "random ltd reserved length")
    assert "--random-ltd" not in dense["argv"]

    whole_lines, part_lines = [], []
    whole = finetune.main(ft_argv(texts, pretrained, tmp_path, "whole", *flags),
                          log=whole_lines.append)
    stopped = finetune.main(ft_argv(texts, pretrained, tmp_path, "part", *flags,
                                    extra=("--exit-interval", "3")), log=part_lines.append)
    assert not stopped["finished"] and stopped["iterations"] == 3
    assert not os.path.exists(tmp_path / "part" / finetune.RESULT_FILE)
    resumed = finetune.main(ft_argv(texts, pretrained, tmp_path, "part", *flags),
                            log=part_lines.append)
    assert resumed["resumed"] and "--finetune" not in resumed["argv"]
    assert resumed["argv"][resumed["argv"].index("--load") + 1] == str(tmp_path / "part")
    assert logged(part_lines, "lm loss") == logged(whole_lines, "lm loss")
    assert resumed["valid_loss"] == whole["valid_loss"]
    assert resumed["layer_tokens"] == whole["layer_tokens"]
    it_a, a, _ = model_state(str(tmp_path / "whole"))
    it_b, b, _ = model_state(str(tmp_path / "part"))
    assert it_a == it_b == 6 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # resuming into a --save of other settings is refused
    with pytest.raises(UserError, match="holds a run with other settings"):
        finetune.main(ft_argv(texts, pretrained, tmp_path, "part", "--train-iters", "6",
                              "--random-ltd-start", "16"), log=lambda *a: None)


@pytest.mark.slow
def test_finetune_tokenbypass_wikitext(texts, pretrained, tmp_path):
    lines = []
    argv = ft_argv(texts, pretrained, tmp_path, "tb", "--train-iters", "2", "--tokenbypass",
                   "--random-ltd-start", "16", "--random-ltd-full-at", "1.0")
    argv[argv.index("--format") + 1] = "wikitext"
    argv[argv.index("--train-text") + 1] = texts["wiki_train"]
    argv[argv.index("--valid-text") + 1] = texts["wiki_valid"]
    result = finetune.main(argv, log=lines.append)
    assert result["argv"][result["argv"].index("--random-ltd-method") + 1] == "tokenbypass"
    # TokenBypass on a 4-layer decoder: layer L/2 = 2 only, on the same schedule (16 twice)
    assert logged(lines, "random ltd reserved length") == {1: 16, 2: 16}
    assert result["layer_tokens"] == 2 * 4 * (3 * SEQ + 16)
    assert math.isfinite(result["valid_loss"])


def test_plan_defaults_follow_the_paper(texts, tmp_path):
    from types import SimpleNamespace

    opts = finetune.build_parser().parse_args(
        ["--train-text", "t", "--valid-text", "v", "--format", "ptb", "--save", "s",
         "--data-dir", "d", "--random-ltd-start", "128"])
    assert opts.global_batch_size == 32 and opts.lr == 5e-5 and opts.random_ltd_step == 16
    train = SimpleNamespace(tokens=1024 * 320 + 1)
    valid = SimpleNamespace(tokens=1024 * 40 + 1)
    run_ = finetune.plan(opts, train, valid, 1024, 24)
    # 320 samples per epoch, 2 epochs of batch 32 = 20 iterations; PTB reaches full at 80%
    assert run_["iterations"] == 20 and run_["eval_iters"] == 2
    assert run_["random_ltd"]["schedule_steps"] == 16 and run_["random_ltd"]["full_at"] == 0.8
    opts.format = "wikitext"
    assert finetune.plan(opts, train, valid, 1024, 24)["random_ltd"]["full_at"] == 0.7
    argv = finetune.ltd_argv(finetune.plan(opts, train, valid, 1024, 24)["random_ltd"])
    assert argv == ["--random-ltd", "--random-ltd-start", "128", "--random-ltd-schedule",
                    "fixed_linear", "--random-ltd-step", "16", "--random-ltd-schedule-steps",
                    "14"]
    opts.tokenbypass, opts.random_ltd_start = True, None
    assert finetune.ltd_argv(finetune.plan(opts, train, valid, 1024, 24)["random_ltd"]) == \
        ["--random-ltd", "--random-ltd-method", "tokenbypass"]


def test_finetune_bad_inputs(texts, pretrained, tmp_path):
    def err(*flags, extra=(), pre=pretrained):
        with pytest.raises(UserError) as info:
            finetune.main(ft_argv(texts, pre, tmp_path, "out", *flags, extra=extra),
                          log=lambda *a: None)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "--pretrained-checkpoint" in err(pre=str(tmp_path / "none"))
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    assert "latest_checkpointed_iteration.txt" in err(pre=str(empty))
    # a corrupt checkpoint file
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(pretrained, corrupt)
    for root, _, files in os.walk(corrupt):
        for name in files:
            if name == "model_optim_rng.pt":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"not a checkpoint")
    assert "cannot read checkpoint" in err(pre=str(corrupt))
    # a tokenizer that does not fit the checkpoint's vocabulary
    vocab = json.load(open(VOCAB, encoding="utf-8"))
    for i in range(100):
        vocab[f"extra_token_{i}"] = len(vocab)
    bigger = tmp_path / "bigger-vocab.json"
    bigger.write_text(json.dumps(vocab), encoding="utf-8")
    assert "has a vocabulary of" in err("--vocab-file", str(bigger))
    assert "--train-samples: finetune.py sets it" in err(extra=("--train-samples", "3"))
    assert "--train-iters: a finetune.py flag" in err(extra=("--train-iters", "3"))
    assert "--lr: a finetune.py flag" in err(extra=("--lr", "1"))
    assert "--random-ltd-full-at needs --random-ltd-start" in err("--random-ltd-full-at", "0.5")
    assert "--random-ltd-start 64 must be in [1, the sequence length 32]" in \
        err("--random-ltd-start", "64")
    assert "--random-ltd-step 16 must be in [1, --random-ltd-start 8]" in \
        err("--random-ltd-start", "8")
    assert "--global-batch-size 4 must be a positive multiple of --micro-batch-size 3" in \
        err("--micro-batch-size", "3")
    # the data: wrong --format for the file
    argv = ft_argv(texts, pretrained, tmp_path, "out")
    argv[argv.index("--train-text") + 1] = texts["wiki_train"]
    with pytest.raises(UserError, match="--train-text .*--format ptb expects"):
        finetune.main(argv, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "out" / "iter_0000001")


# ---------------------------------------------------------------------------------------------
# layer_sweep.py


@pytest.mark.slow
def test_layer_sweep_quick(texts, pretrained, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--train-text", texts["ptb_train"], "--valid-text", texts["ptb_valid"],
            "--format", "ptb", "--pretrained-checkpoint", pretrained,
            "--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--kept", "8",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "2",
            "--quick", "--jobs", "2", "--", "--num-workers", "0", "--device", "cpu"]
    lines = []
    summary = layer_sweep.main(argv, log=lines.append)
    rows = list(csv.DictReader(open(out / "layer_sweep.csv")))
    assert [r["run"] for r in rows] == ["baseline"] + [f"layer{i:02d}" for i in range(LAYERS)]
    assert [r["dropped_layer"] for r in rows] == [""] + [str(i) for i in range(LAYERS)]
    base = float(rows[0]["valid_loss"])
    for r in rows[1:]:
        assert math.isclose(float(r["delta_vs_baseline"]), float(r["valid_loss"]) - base,
                            abs_tol=1e-12)
        # one layer of four at 8 of 32 tokens, 2 iterations of 4 samples
        assert int(r["layer_tokens"]) == 2 * 4 * (3 * SEQ + 8)
    assert int(rows[0]["layer_tokens"]) == 2 * 4 * LAYERS * SEQ
    info = json.load(open(out / "layer_sweep.json"))
    assert info["settings"]["kept"] == 8 and len(info["rows"]) == LAYERS + 1
    assert info["summary"] == summary["summary"]
    assert len(info["summary"]["most_sensitive_layers"]) == 2
    assert isinstance(info["summary"]["edges_hurt_more"], bool)
    assert (out / "layer_sweep.png").stat().st_size > 0
    for i in (0, LAYERS - 1):  # edge layers need the ablation flag
        cmd = json.load(open(out / "runs" / f"layer{i:02d}.sweep_command.json"))["command"]
        assert "--random-ltd-allow-edge-layers" in cmd
    # rerun: every run is finished, nothing runs again
    again = []
    layer_sweep.main(argv, log=again.append)
    assert sum("finished before, skipped" in line for line in again) == LAYERS + 1
    # other settings in the same output directory are refused
    with pytest.raises(UserError, match="run layer00 was made with other settings"):
        layer_sweep.main([a if a != "8" else "16" for a in argv], log=lambda *a: None)


def test_layer_sweep_bad_inputs(texts, pretrained, tmp_path):
    base = ["--train-text", texts["ptb_train"], "--valid-text", texts["ptb_valid"],
            "--format", "ptb", "--pretrained-checkpoint", pretrained,
            "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "s"),
            "--global-batch-size", "4", "--micro-batch-size", "2", "--quick"]
    with pytest.raises(UserError, match=r"--layers: \[7\] out of range \[0, 3\]"):
        layer_sweep.main(base + ["--layers", "7"], log=lambda *a: None)
    with pytest.raises(UserError, match="--kept 32 must be in"):
        layer_sweep.main(base + ["--kept", "32"], log=lambda *a: None)
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        layer_sweep.main(base + ["--jobs", "0"], log=lambda *a: None)
    with pytest.raises(UserError, match="--random-ltd-layer-ids: a finetune.py flag"):
        layer_sweep.main(base + ["--", "--random-ltd-layer-ids", "1"], log=lambda *a: None)


# ---------------------------------------------------------------------------------------------
# examples/finetune_gpt_causal_lm.sh


def test_example_dry_run():
    import subprocess

    from training_helpers import ROOT

    script = os.path.join(ROOT, "examples", "finetune_gpt_causal_lm.sh")
    done = subprocess.run(["bash", script, "--epochs", "3", "--", "--log-interval", "5"],
                          env=_clean_env(DRY_RUN=1, LAUNCHER="torchrun", GPUS_PER_NODE=8,
                                          TASK="wikitext103", LTD_START=256),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cmd = done.stdout.split()
    assert cmd[0] == "torchrun" and "--nproc_per_node" in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8"
    k = cmd.index(os.path.join(ROOT, "tasks", "causal_lm", "finetune.py"))
    own, extra = cmd[k + 1:cmd.index("--")], cmd[cmd.index("--") + 1:]
    for flag, value in (("--format", "wikitext"), ("--global-batch-size", "32"),
                        ("--lr", "5e-5"), ("--random-ltd-start", "256")):
        assert own[own.index(flag) + 1] == value
    assert own[own.index("--train-text") + 1] == "data/wikitext103/wiki.train.raw"
    assert own[len(own) - 1 - own[::-1].index("--epochs") + 1] == "3"  # the caller's wins
    assert extra == ["--log-interval", "5"]
    assert "not found: data/wikitext103/wiki.train.raw" in done.stderr  # a warning in DRY_RUN
    bad = subprocess.run(["bash", script], env=_clean_env(METHOD="sparse"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "METHOD=sparse: expected" in bad.stderr


@pytest.mark.slow
def test_example_under_torchrun_matches_one_process(texts, pretrained, tmp_path):
    """Two gloo processes (DP 2) through the launcher: rank 0 tokenizes, rank 1 waits; the
    finetune and its whole-file evaluation agree with one process."""
    import shutil
    import subprocess
    import sys

    from distributed_harness import free_port
    from training_helpers import ROOT

    text_dir = tmp_path / "ptb"
    text_dir.mkdir()
    for name in ("ptb_train", "ptb_valid"):
        shutil.copy(texts[name], text_dir)
    flags = ["--train-iters", "4", "--global-batch-size", "4", "--workers", "1",
             "--random-ltd-step", "8", "--", "--device", "cpu", "--num-workers", "0",
             "--hidden-dropout", "0", "--attention-dropout", "0"]  # dropout streams per rank
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "finetune_gpt_causal_lm.sh"), *flags],
        env=_clean_env(LAUNCHER="torchrun", GPUS_PER_NODE=2, MASTER_PORT=free_port(),
                        PYTHON=sys.executable, TEXT_DIR=text_dir, PRETRAINED=pretrained,
                        SAVE=tmp_path / "dp2", MICRO_BATCH=2, LTD_START=8, OMP_NUM_THREADS=1),
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dp2 = json.load(open(tmp_path / "dp2" / finetune.RESULT_FILE))
    one = finetune.main(["--train-text", str(text_dir / "ptb.train.txt"),
                         "--valid-text", str(text_dir / "ptb.valid.txt"), "--format", "ptb",
                         "--pretrained-checkpoint", pretrained, "--save",
                         str(tmp_path / "one"), "--data-dir", str(text_dir / "tokenized"),
                         "--micro-batch-size", "2", "--random-ltd-start", "8", *flags],
                        log=lambda *a: None)
    assert dp2["iterations"] == one["iterations"] == 4
    assert dp2["layer_tokens"] == one["layer_tokens"]
    assert dp2["valid_tokens"] == one["valid_tokens"]
    assert math.isclose(dp2["valid_loss"], one["valid_loss"], rel_tol=1e-5), \
        (dp2["valid_loss"], one["valid_loss"], dp2["last_loop_valid_loss"],
         one["last_loop_valid_loss"])


@pytest.mark.slow
def test_imported_hf_gpt2_scores_as_transformers(texts, tmp_path):
    """From a Hugging Face GPT2LMHeadModel imported by tools/convert_hf.py (unpadded vocabulary),
    the whole-file validation loss of finetune.py (lr 0: the weights do not move) equals
    transformers' loss on the same token stream in disjoint windows."""
    transformers = pytest.importorskip("transformers")
    import shutil
    import subprocess
    import sys

    from megatron.data.indexed_dataset import IndexedDataset
    from training_helpers import ROOT

    if not os.path.isfile(os.path.join(ROOT, "tools", "convert_hf.py")):
        pytest.skip("tools/convert_hf.py is not in this build")
    vocab = json.load(open(VOCAB, encoding="utf-8"))
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=SEQ, n_embd=32, n_layer=LAYERS, n_head=4,
        activation_function="gelu_new", bos_token_id=0, eos_token_id=0))
    model.save_pretrained(hf_dir)
    shutil.copy(VOCAB, hf_dir / "vocab.json")
    shutil.copy(MERGES, hf_dir / "merges.txt")
    ckpt = tmp_path / "imported"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"),
                           "import", "--input", str(hf_dir), "--save", str(ckpt),
                           "--make-vocab-size-divisible-by", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = finetune.main(["--train-text", texts["ptb_train"], "--valid-text",
                            texts["ptb_valid"], "--format", "ptb", "--pretrained-checkpoint",
                            str(ckpt), "--save", str(tmp_path / "out"), "--data-dir",
                            str(tmp_path / "data"), "--global-batch-size", "4",
                            "--micro-batch-size", "2", "--train-iters", "1", "--lr", "0",
                            "--workers", "1", "--", "--num-workers", "0", "--device", "cpu"],
                           log=lambda *a: None)
    assert result["seq_length"] == SEQ  # from the checkpoint (n_positions)
    valid_prefix = result["argv"][result["argv"].index("--valid-data-path") + 1]
    tokens = torch.from_numpy(IndexedDataset(valid_prefix).get(0).astype(np.int64))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, SEQ):
            window = tokens[start:start + SEQ + 1]
            logits = model(window[:-1][None]).logits[0].double()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:],
                                                             reduction="sum"))
            count += len(window) - 1
    assert count == result["valid_tokens"] - 1
    assert math.isclose(result["valid_loss"], total / count, rel_tol=1e-5)
