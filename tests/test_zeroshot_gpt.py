"""GPT zero-shot evaluation (tasks/zeroshot_gpt, Megatron-LM's LAMBADA and WIKITEXT103).

The window arithmetic is checked by hand and against per-target forwards (each target scored
once, with the left context its window gives it); LAMBADA against models whose prediction is
known (one token everywhere) and against a direct per-passage argmax loop; the printed lines
against Megatron's format; TP2 x PP2 x DP2 against one process; bad inputs end in one line.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.checkpointing import flat_model_state, megatron_model_state
from megatron.errors import UserError
from megatron.tokenizer import build_tokenizer
from tasks.main import main as tasks_main
from tasks.zeroshot_gpt.datasets import (LambadaDataset, WindowedLMDataset, count_windows,
                                         lambada_tokens, read_lambada, read_wikitext)
from tasks.zeroshot_gpt.detokenizer import (get_detokenizer, lambada_detokenizer,
                                            ptb_detokenizer, wikitext_detokenizer)
from training_helpers import MERGES, ROOT, VOCAB, gpt_argv, run

ASSETS = os.path.join(ROOT, "tests", "assets", "zeroshot")
LAMBADA = os.path.join(ASSETS, "lambada.jsonl")
WIKI = os.path.join(ASSETS, "wiki.test.tokens")
SEQ = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny forwards: one intra-op thread is ~30x faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)


@pytest.fixture(scope="module")
def checkpoint(data_prefix, tmp_path_factory):
    """A tiny GPT (2 layers, hidden 32, seq 32, padded vocab 1536) after 4 training steps."""
    ckpt = str(tmp_path_factory.mktemp("zs") / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, "--eval-iters", "0", iters=4))
    return ckpt


def direct_model(ckpt):
    from tools.generate_text import load_model

    return load_model(ckpt)[0]


def task_argv(task, ckpt, *extra, data=None):
    return ["--task", task, "--valid-data", data or (LAMBADA if task == "LAMBADA" else WIKI),
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES,
            "--make-vocab-size-divisible-by", "64", "--device", "cpu", "--load", ckpt, *extra]


def evaluate(task, ckpt, *extra, data=None):
    logs = []
    metrics = tasks_main(task_argv(task, ckpt, *extra, data=data), log=logs.append)
    return metrics, logs


def constant_checkpoint(ckpt, out, token):
    """A copy of ``ckpt`` whose model predicts ``token`` after any input: the final LayerNorm
    outputs its bias (weight 0), the bias is that token's (enlarged) embedding."""
    shutil.copytree(ckpt, out)
    path = os.path.join(out, "iter_0000004", "mp_rank_00", "model_optim_rng.pt")
    saved = torch.load(path, weights_only=False)
    flat = flat_model_state(saved["model"])
    emb = flat["language_model.embedding.word_embeddings.weight"]
    emb[token] *= 10.0
    flat["language_model.encoder.final_layernorm.weight"].zero_()
    flat["language_model.encoder.final_layernorm.bias"].copy_(emb[token])
    saved["model"] = megatron_model_state(flat)
    torch.save(saved, path)
    model = direct_model(out)
    with torch.no_grad():
        logits = model(torch.randint(0, 1500, (3, 9)))
    assert (logits.argmax(-1) == token).all()
    return out


# -- detokenizer ----------------------------------------------------------------------------

def test_wikitext_detokenizer_by_hand():
    text = (" = = History = = \n The tower is 14 @.@ 5 metres ( 48 ft ) tall , on 2 @,@ 300 "
            "stones ; a self @-@ taught engineer 's \" proper light \" . \n")
    assert wikitext_detokenizer(text) == (
        " == History ==\nThe tower is 14.5 metres (48 ft) tall, on 2,300 stones; a "
        "self-taught engineer's \"proper light\".\n")
    assert wikitext_detokenizer(" = = = Restoration = = = ") == " === Restoration === "
    assert wikitext_detokenizer("the boys ' bikes") == "the boys' bikes"


def test_ptb_and_lambada_detokenizers_and_choice_by_path():
    # Megatron's PTB rule " N " -> "1 " drops the space before the number; kept as Megatron's.
    assert ptb_detokenizer("it is n't $ 1 million \n and N years") == \
        "it isn't $1 million\nand1 years"
    assert lambada_detokenizer("as is .") == "as is ."
    assert get_detokenizer("/data/wikitext-103/wiki.test.tokens") is wikitext_detokenizer
    assert get_detokenizer("/data/ptb/ptb.test.txt") is ptb_detokenizer
    assert get_detokenizer("lambada_test.jsonl") is lambada_detokenizer
    assert get_detokenizer("/data/other.txt") is None


# -- WikiText windows -----------------------------------------------------------------------

def scored_targets(dataset):
    """For every window, the global indices of the tokens it scores."""
    out = []
    for i in range(len(dataset)):
        mask = dataset[i]["pad_mask"]
        out.append([i * dataset.stride + j + 1 for j in np.flatnonzero(mask)])
    return out


def test_window_arithmetic_by_hand():
    # 11 tokens (10 targets), windows of 6 + 1 tokens starting every 4 tokens:
    # window 0 = tokens 0..6 scores 1..6; window 1 = tokens 4..10 scores 7..10 (its first two
    # targets, 5 and 6, are context); window 2 = tokens 8..10 + padding scores nothing (Megatron's
    # count, max(ceil((10 - 4) / 4) + 1, 1) = 3, includes it).
    ds = WindowedLMDataset(list(range(100, 111)), 6, pad_id=0, num_original_tokens=5,
                           num_tokenized_tokens=11, stride=4)
    assert len(ds) == count_windows(10, 4) == 3
    assert scored_targets(ds) == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], []]
    assert ds[1]["text"].tolist() == list(range(104, 111))
    assert ds[2]["text"].tolist() == [108, 109, 110, 0, 0, 0, 0]  # padded with the pad id
    # Disjoint windows (stride = seq_len, Megatron's --overlapping-eval None).
    disjoint = WindowedLMDataset(list(range(11)), 4, 0, 5, 11, stride=None)
    assert scored_targets(disjoint) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert count_windows(0, 3) == 1 and count_windows(3, 3) == 1 and count_windows(4, 3) == 2


@pytest.mark.parametrize("n,seq,stride", [(50, 8, 3), (33, 32, 32), (17, 32, 5), (64, 16, 1)])
def test_every_target_scored_exactly_once(n, seq, stride):
    ds = WindowedLMDataset(list(range(n)), seq, 0, 2, n, stride)
    flat = [t for window in scored_targets(ds) for t in window]
    assert sorted(flat) == list(range(1, n))


def window_loss_sum(model, dataset):
    """Sum over the windows of the loss of their scored targets."""
    total = 0.0
    with torch.no_grad():
        for i in range(len(dataset)):
            text = torch.as_tensor(dataset[i]["text"])[None]
            losses = model(text[:, :-1], labels=text[:, 1:])[0]
            total += float((losses * torch.as_tensor(dataset[i]["pad_mask"])).sum())
    return total


def per_target_loss_sum(model, tokens, seq, stride):
    """Each target t predicted from the context its window gives it: tokens from the start of
    the window that scores t (window 0 for t <= seq, else ceil((t - seq) / stride))."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(tokens)):
            start = 0 if t <= seq else math.ceil((t - seq) / stride) * stride
            logits = model(torch.tensor([tokens[start:t]]))[0, -1]
            total += float(F.cross_entropy(logits.float(), torch.tensor(tokens[t])))
    return total


def test_window_loss_equals_one_pass_when_a_window_covers_the_text(checkpoint, tokenizer):
    model = direct_model(checkpoint)
    tokens = tokenizer.tokenize("The tower is round and tapers slightly towards the top.")
    assert len(tokens) <= SEQ + 1
    with torch.no_grad():
        one_pass = float(model(torch.tensor([tokens[:-1]]),
                               labels=torch.tensor([tokens[1:]])).sum())
    for stride in (SEQ, 8, 1):  # any stride: one window scores all the targets
        ds = WindowedLMDataset(tokens, SEQ, tokenizer.eod, 5, len(tokens), stride)
        assert window_loss_sum(model, ds) == pytest.approx(one_pass, rel=1e-5)


def test_overlapping_windows_equal_per_target_forwards(checkpoint, tokenizer):
    model = direct_model(checkpoint)
    tokens = tokenizer.tokenize(open(WIKI).read()[:600])
    assert len(tokens) > 3 * SEQ
    for stride in (SEQ, 7):
        ds = WindowedLMDataset(tokens, SEQ, tokenizer.eod, 5, len(tokens), stride)
        assert window_loss_sum(model, ds) == pytest.approx(
            per_target_loss_sum(model, tokens, SEQ, stride), rel=1e-5)


LOSS_LINE = re.compile(r"^ validation results on WIKITEXT103 \| avg loss: (\S+) \| ppl: (\S+) \| "
                       r"adjusted ppl: (\S+) \| token ratio: (\S+) \|$")
ACC_LINE = re.compile(r"^ validation results on LAMBADA \| number correct: (\S+) \| "
                      r"total examples: (\S+) \| avg accuracy: (\S+)$")


def framed(logs, pattern):
    """The result line matching ``pattern``, checked to sit between Megatron's dash lines."""
    (i,) = [i for i, line in enumerate(logs) if pattern.match(line)]
    assert logs[i - 1] == logs[i + 1] == "-" * (len(logs[i]) + 1)
    return pattern.match(logs[i]).groups()


@pytest.mark.slow
def test_wikitext103_metrics_and_lines(checkpoint, tokenizer):
    model = direct_model(checkpoint)
    text = open(WIKI, encoding="utf-8").read()
    words = len(text.strip().split(" "))
    tokens = tokenizer.tokenize(wikitext_detokenizer(text))
    total = per_target_loss_sum(model, tokens, SEQ, 32)
    val_loss = total / (len(tokens) - 1)
    ratio = (len(tokens) - 1) / (words - 1)
    metrics, logs = evaluate("WIKITEXT103", checkpoint)
    assert metrics["num original tokens"] == words and metrics["num tokenized tokens"] == \
        len(tokens)
    assert metrics["avg loss"] == pytest.approx(val_loss, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(min(20, val_loss)), rel=1e-4)
    assert metrics["adjusted ppl"] == pytest.approx(math.exp(min(20, val_loss * ratio)),
                                                    rel=1e-4)
    assert metrics["token ratio"] == ratio
    assert framed(logs, LOSS_LINE) == (f"{metrics['avg loss']:.4E}", f"{metrics['ppl']:.4E}",
                                       f"{metrics['adjusted ppl']:.4E}", str(ratio))
    assert f" > number of original tokens: {words}, number of detokenized tokens: " \
           f"{len(tokens)}" in logs
    assert logs[-1] == "done :-)"
    # --overlapping-eval 8: more windows, every target still scored once, with more context.
    overlapped, _ = evaluate("WIKITEXT103", checkpoint, "--overlapping-eval", "8",
                             "--eval-micro-batch-size", "3")
    assert overlapped["avg loss"] == pytest.approx(
        per_target_loss_sum(model, tokens, SEQ, 8) / (len(tokens) - 1), rel=1e-5)


# -- LAMBADA --------------------------------------------------------------------------------

def test_lambada_plain_and_strict_split_by_hand(tokenizer):
    text = "He said that it was unbelievableness"
    plain_ctx, plain_label = lambada_tokens(text, tokenizer, strict=False)
    strict_ctx, strict_label = lambada_tokens(text, tokenizer, strict=True)
    word = [546, 1266, 696, 68, 85, 867, 75, 273, 1022]  # " unbelievableness" in this vocab
    assert tokenizer.tokenize(" unbelievableness") == word
    assert plain_label == [1022] and plain_ctx == tokenizer.tokenize(text)[:-1]
    assert strict_label == word and strict_ctx == tokenizer.tokenize("He said that it was")
    ds = LambadaDataset([(strict_ctx, strict_label)], SEQ, pad_id=tokenizer.eod)
    sample = ds[0]
    n = len(strict_ctx)
    assert sample["text"].tolist() == strict_ctx + word + [tokenizer.eod] * (SEQ + 1 - n - 9)
    # target j is token j + 1: the label tokens n .. n + 8 are targets n - 1 .. n + 7
    assert np.flatnonzero(sample["pad_mask"]).tolist() == list(range(n - 1, n + 8))


HAND = ["We walked down to the harbour and looked at the",  # ends with " the"
        "The farmer moved his sheep to the upper field",  # " fiel" + "d"
        "She could not find her shoes, so she looked under the bed and then in the",
        "The old sailor kept a lamp in his window"]


@pytest.mark.slow
@pytest.mark.parametrize("token,plain,strict", [
    (264, 2, 2),  # " the": the passages ending in "the" are right in both modes
    (67, 1, 0),  # "d": "field"'s last token is right, its first (" fiel") is not
])
def test_lambada_counts_of_a_model_that_always_predicts_one_token(checkpoint, tmp_path, token,
                                                                  plain, strict):
    ckpt = constant_checkpoint(checkpoint, str(tmp_path / "const"), token)
    data = tmp_path / "hand.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in HAND))
    for flags, expected in (((), plain), (("--strict-lambada",), strict)):
        metrics, logs = evaluate("LAMBADA", ckpt, *flags, data=str(data))
        assert metrics["number correct"] == expected and metrics["total examples"] == 4
        assert framed(logs, ACC_LINE) == (f"{float(expected):.4E}", "4.0000E+00",
                                          f"{expected / 4:.4E}")


def direct_lambada_correct(model, tokenizer, path, strict):
    """Passages whose label tokens are each the argmax after their unpadded prefix."""
    correct = 0
    with torch.no_grad():
        for line in open(path):
            context, label = lambada_tokens(json.loads(line)["text"], tokenizer, strict)
            tokens = (context + label)[-(SEQ + 1):]
            logits = model(torch.tensor([tokens[:-1]]))[0]
            predicted = logits[-len(label):].argmax(-1).tolist()
            correct += predicted == label
    return correct


@pytest.mark.slow
def test_lambada_matches_a_direct_argmax_loop(checkpoint, tokenizer, tmp_path):
    # Passages the trained model gets right: a context from the fixture followed by the
    # model's own greedy next token (kept where the text tokenizes back to the same ids).
    model = direct_model(checkpoint)
    lines = []
    for text in open(LAMBADA).read().splitlines():
        for cut in (6, 9, 12):
            context = tokenizer.tokenize(text[text.index('"text": "') + 9:])[:cut]
            with torch.no_grad():
                best = int(model(torch.tensor([context]))[0, -1, :tokenizer.vocab_size].argmax())
            passage = tokenizer.detokenize(context + [best])
            if best != tokenizer.eod and tokenizer.tokenize(passage) == context + [best]:
                lines.append(passage)
    assert len(lines) >= 3
    data = tmp_path / "mixed.jsonl"
    fixture = open(LAMBADA).read()
    data.write_text(fixture + "".join(json.dumps({"text": line}) + "\n" for line in lines))
    for strict in (False, True):
        expected = direct_lambada_correct(model, tokenizer, data, strict)
        metrics, _ = evaluate("LAMBADA", checkpoint, *(["--strict-lambada"] if strict else []),
                              data=str(data))
        assert metrics["number correct"] == expected
        assert metrics["total examples"] == 7 + len(lines)
    assert direct_lambada_correct(model, tokenizer, data, False) >= len(lines)


# -- parallel layouts -----------------------------------------------------------------------

def _parallel_eval(rank, world_size, runs):
    return [tasks_main(argv, log=lambda *a: None) for argv in runs]


@pytest.mark.slow
def test_tp2_pp2_dp2_equal_one_process(checkpoint, tmp_path):
    """The TP1/PP1 checkpoints evaluated under TP2 x PP2 x DP2: the trained one through --load
    (weights only, from another layout), the one-token one through --pretrained-checkpoint."""
    from distributed_harness import run_distributed

    # " group" (id 809, in TP rank 1's half of the vocabulary) ends one fixture passage
    const = constant_checkpoint(checkpoint, str(tmp_path / "const"), 809)
    cases = [("WIKITEXT103", checkpoint, ("--overlapping-eval", "8")),
             ("LAMBADA", checkpoint, ()), ("LAMBADA", const, ("--strict-lambada",)),
             ("LAMBADA", const, ())]
    one = [evaluate(task, ckpt, *extra, "--eval-micro-batch-size", "1")[0]
           for task, ckpt, extra in cases]
    parallel = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                "--eval-micro-batch-size", "2"]  # 7 passages over DP2: one padding slot
    runs = []
    for task, ckpt, extra in cases:
        argv = task_argv(task, ckpt, *extra, *parallel)
        if ckpt == const:
            argv[argv.index("--load")] = "--pretrained-checkpoint"
        runs.append(argv)
    results = run_distributed(_parallel_eval, world_size=8, args=(runs,), timeout=300)
    for rank_result in results:
        for got, want in zip(rank_result, one):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert one[3]["number correct"] == one[2]["number correct"] == 1  # "... the group"
    assert one[0]["avg loss"] > 0


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    ('{"text": "fine words here"}\n{"text": \n', "bad.jsonl:2: not a JSON line"),
    ('{"text": "fine words here"}\n{"txt": "no text key"}\n', "bad.jsonl:2: expected a JSON"),
    ('["a list"]\n', "bad.jsonl:1: expected a JSON object"),
    ('{"text": "   "}\n', "bad.jsonl:1: expected a JSON object with a non-empty 'text'"),
    ('{"text": "single"}\n', "bad.jsonl:1: the passage has no context"),
    ("\n\n", "no LAMBADA passages"),
])
def test_lambada_reader_errors_name_file_and_line(tmp_path, tokenizer, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(needle)):
        read_lambada(str(path), tokenizer, strict=True, seq_len=SEQ)


def test_reader_errors_for_missing_non_utf8_and_tiny_files(tmp_path, tokenizer):
    with pytest.raises(UserError, match="--valid-data .*nope.jsonl: no such file"):
        read_lambada(str(tmp_path / "nope.jsonl"), tokenizer, False, SEQ)
    latin = tmp_path / "wiki.latin1.tokens"
    latin.write_bytes(b" = A = \n caf\xe9 \n")
    with pytest.raises(UserError, match=r"wiki.latin1.tokens:2: not UTF-8"):
        read_wikitext(str(latin), tokenizer, SEQ, 32)
    tiny = tmp_path / "wiki.tiny.tokens"
    tiny.write_text("a")
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        read_wikitext(str(tiny), tokenizer, SEQ, 32)
    with pytest.raises(UserError, match="--overlapping-eval 40 is larger than --seq-length 32"):
        read_wikitext(WIKI, tokenizer, SEQ, 40, log=lambda *a: None)


def test_long_passage_keeps_label_and_end_of_context(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text('{"text": "%s final"}\n' % " ".join(["word"] * 60))
    logs = []
    ds = read_lambada(str(path), tokenizer, True, SEQ, log=logs.append)
    context, label = ds.samples[0]
    assert label == tokenizer.tokenize(" final") and len(context) + len(label) == SEQ + 1
    assert any("kept the end of their context" in line for line in logs)


def cli(*argv):
    return subprocess.run([sys.executable, "tasks/main.py", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_cli_bad_inputs(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok then"}\n{"text": 3}\n')
    assert_one_line_error(cli(*task_argv("LAMBADA", checkpoint, data=str(bad))), "bad.jsonl:2")
    assert_one_line_error(cli(*task_argv("LAMBADA", checkpoint, data=str(tmp_path / "no.json"))),
                          "no.json: no such file")
    assert_one_line_error(cli(*task_argv("WIKITEXT103", checkpoint), "--valid-data", WIKI,
                              LAMBADA), "--valid-data", "exactly one file")
    # The checkpoint's model is not the one the flags describe (another vocabulary size).
    assert_one_line_error(cli(*task_argv("WIKITEXT103", checkpoint),
                              "--make-vocab-size-divisible-by", "1000"),
                          "model_optim_rng.pt", "padded vocabulary of 1536")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint, corrupt)
    path = corrupt / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    path.write_bytes(path.read_bytes()[:1000])
    assert_one_line_error(cli(*task_argv("LAMBADA", str(corrupt))), str(path),
                          "cannot read checkpoint")
