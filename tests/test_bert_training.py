"""pretrain_bert end to end on CPU with --mock-data and random-LTD on: TP2 / PP2 / DP2 / TP2xPP2 /
TP2 with sequence parallelism (gloo ranks) match the single process (losses per iteration and
final weights), bitwise resume in the middle of the random-LTD schedule, a TP2 checkpoint
resharded to TP1 by tools/checkpoint_util.py continues with the same loss, and bad input ends in
one line (subprocess).

Dropout is 0 (dropout in TP regions uses per-rank streams by design, as in Megatron) and the
optimizer SGD for the layout runs (Adam would turn rounding noise in exactly-zero gradients into
full-size updates, so parameters could not be compared).
"""

import os
import subprocess
import sys

import pytest
import torch

import pretrain_bert
from distributed_harness import run_distributed
from megatron.checkpointing import checkpoint_file, flat_model_state
from training_helpers import MERGES, ROOT, VOCAB, tiny_bert_argv

sys.path.insert(0, os.path.join(ROOT, "tools"))
import checkpoint_util  # noqa: E402

# kept length 8, 16, 24 over iterations 1..3, then full: random-LTD is mid-schedule throughout
LTD = ["--random-ltd", "--random-ltd-start", "8", "--random-ltd-step", "8",
       "--random-ltd-schedule-steps", "3"]
ITERS = 4


def bert_argv(*extra, iters=ITERS):
    return tiny_bert_argv(*LTD, *extra, iters=iters)


def run(argv):
    logs = []
    return pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=argv, log=logs.append), logs


def losses(result):
    return [(d["lm loss"], d["sop loss"]) for _, d in result.train_losses]


def load_model(root, iteration, tp=0, pp=0, pp_size=1):
    return flat_model_state(torch.load(checkpoint_file(root, iteration, tp, pp, pp_size),
                                       weights_only=False)["model"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run (SGD, random-LTD on): losses of iterations 1..4 and the
    checkpoint after iteration 3."""
    root = str(tmp_path_factory.mktemp("bert_ref"))
    result, logs = run(bert_argv("--optimizer", "sgd", "--save", root, "--save-interval", "3"))
    kept = [int(l.split("random ltd reserved length: ")[1].split(" |")[0]) for l in logs
            if l.startswith(" iteration")]
    assert kept == [8, 16, 24, 32]
    return losses(result), load_model(root, 3), root


def _train(rank, world_size, argv):
    return losses(run(argv)[0])


LAYOUTS = {
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "DP2": (2, []),
    "TP2xPP2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "TP2-sequence-parallel": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


def _max_rel(a, b):
    return max(abs(x - y) / abs(y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    """Every rank reports the single process's 'lm loss' and 'sop loss' for iterations 1..3;
    the checkpoint, merged to one process by tools/checkpoint_util.py, holds its weights."""
    world, flags = LAYOUTS[layout]
    ref_losses, ref_model, _ = reference
    ckpt = str(tmp_path / "ckpt")
    argv = bert_argv("--optimizer", "sgd", "--save", ckpt, "--exit-interval", "3", *flags)
    per_rank = run_distributed(_train, world, args=(argv,), timeout=300)
    for got in per_rank:
        assert len(got) == 3
        err = _max_rel(got, ref_losses[:3])
        print(f"{layout}: max relative loss difference {err:.1e}")
        assert err < 2e-6, (got, ref_losses[:3])
    merged = str(tmp_path / "merged")
    checkpoint_util.convert(ckpt, merged, 1, 1, log=lambda *a: None)
    model = load_model(merged, 3)
    assert list(model) == list(ref_model)
    worst = 0.0
    for key, value in ref_model.items():
        worst = max(worst, (model[key] - value).abs().max().item())
        torch.testing.assert_close(model[key], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    print(f"{layout}: max abs weight difference {worst:.1e}")
    if layout == "TP2":
        _resharded_checkpoint_continues(ckpt, tmp_path, ref_losses)


def _resharded_checkpoint_continues(tp2_ckpt, tmp_path, ref_losses):
    """tools/checkpoint_util.py: the TP2 checkpoint resharded to TP1 (optimizer state too)
    continues with the single process's iteration-4 loss."""
    tp1 = str(tmp_path / "tp1")
    checkpoint_util.convert(tp2_ckpt, tp1, 1, 1, log=lambda *a: None)
    saved = torch.load(checkpoint_file(tp1, 3), weights_only=False)
    assert saved["args"].tensor_model_parallel_size == 1
    nested = saved["model"]
    assert set(nested) == {"language_model", "lm_head", "binary_head"}
    assert nested["lm_head"]["bias"].shape == (1024,)  # the vocab-parallel bias, merged
    back = str(tmp_path / "back")  # and back to TP2: the same shards, bit for bit
    checkpoint_util.convert(tp1, back, 2, 1, log=lambda *a: None)
    for t in range(2):
        original, again = load_model(tp2_ckpt, 3, tp=t), load_model(back, 3, tp=t)
        assert list(again) == list(original)
        for key, value in original.items():
            assert torch.equal(again[key], value), (t, key)
    resumed, _ = run(bert_argv("--optimizer", "sgd", "--load", tp1))
    assert [i for i, _ in resumed.train_losses] == [4]
    assert _max_rel(losses(resumed), ref_losses[3:]) < 2e-6


@pytest.mark.slow
def test_resume_in_the_middle_of_the_schedule_is_bitwise(tmp_path):
    """N iterations == N/2, save, resume, N/2 (Adam, post-LN, random-LTD mid-schedule):
    the same losses and parameters, bit for bit."""
    argv = bert_argv("--apply-residual-connection-post-layernorm", "--lr", "1e-3")
    full, _ = run(argv)
    ckpt = str(tmp_path / "ckpt")
    first, _ = run(argv + ["--save", ckpt, "--exit-interval", "2"])
    state = torch.load(checkpoint_file(ckpt, 2), weights_only=False)
    assert state["random_ltd_scheduler"]["consumed_layer_tokens"] == 4 * (
        (2 * 32 + 2 * 8) + (2 * 32 + 2 * 16))
    second, _ = run(argv + ["--load", ckpt])
    assert [i for i, _ in second.train_losses] == [3, 4]
    assert [d for _, d in first.train_losses + second.train_losses] == \
        [d for _, d in full.train_losses]
    for (name, a), b in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_no_binary_head_trains_and_strict_loads_refuse_other_heads(reference, tmp_path):
    """--bert-no-binary-head: only 'lm loss', no pooler / binary head / token types in the
    checkpoint. pretrain_bert loads strictly (its Provider has no LoadPolicy): a checkpoint
    with the binary head is refused in one line, and so is the reverse."""
    from megatron.errors import UserError

    ckpt = str(tmp_path / "plain")
    result, _ = run(bert_argv("--bert-no-binary-head", "--save", ckpt, iters=2))
    assert [set(d) for _, d in result.train_losses] == [{"lm loss"}] * 2
    saved = torch.load(checkpoint_file(ckpt, 2), weights_only=False)["model"]
    assert set(saved) == {"language_model", "lm_head"}
    assert set(saved["language_model"]["embedding"]) == {"word_embeddings",
                                                         "position_embeddings"}
    with_head = reference[2]
    for argv, needles in ((bert_argv("--bert-no-binary-head", "--load", with_head,
                                     "--finetune"), ("unexpected 5", "binary_head")),
                          (bert_argv("--load", ckpt, "--finetune"), ("missing 5", "pooler"))):
        with pytest.raises(UserError) as err:
            run(argv)
        assert "\n" not in str(err.value)
        for needle in needles:
            assert needle in str(err.value), str(err.value)


# ------------------------------------------------------------------------- bad input

def cli(*argv):
    return subprocess.run([sys.executable, "pretrain_bert.py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _with(argv, **replace):
    argv = list(argv)
    for flag, value in replace.items():
        i = argv.index(flag)
        argv[i + 1:i + 2] = value
    return argv


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2-tokenizer", "rope"])
def test_bad_input_is_one_line(case):
    argv = bert_argv(iters=2)
    if case == "gpt2-tokenizer":
        argv = _with(argv, **{"--tokenizer-type": ["GPT2BPETokenizer"],
                              "--vocab-file": [VOCAB, "--merge-file", MERGES]})
        assert_one_line(cli(*argv), "--tokenizer-type", "[CLS]")
    else:
        assert_one_line(cli(*argv, "--position-embedding-type", "rope"),
                        "position embeddings")


def _sentence_dataset(path, sentences_per_doc, vocab_limit=100, docs=40, seed=0,
                      length_range=(5, 13)):
    """A sentence-level dataset of random ids below ``vocab_limit`` (the test vocabulary has
    more): ``sentences_per_doc`` sequences of ``length_range`` ids per document."""
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    prefix = str(path)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        lengths = rng.integers(*length_range, size=sentences_per_doc)
        builder.add_document(rng.integers(10, vocab_limit, size=int(lengths.sum())), lengths)
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sentence-level-trains", "document-level", "one-sentence-docs",
                                  "ids-beyond-vocab", "missing-file"])
def test_real_data_bad_input_is_one_line_and_nothing_is_written(tmp_path, case):
    """pretrain_bert.py on real (non-mock) sentence-level data, and the data mistakes a user
    makes: a GPT-style document dataset, documents of one sentence, a dataset made with another
    (larger) vocabulary, a missing file. One error line, exit 2, no checkpoint written."""
    save = tmp_path / "ckpt"
    if case == "sentence-level-trains":
        prefix = _sentence_dataset(tmp_path / "ok_text_sentence", 3)
    elif case == "document-level":  # GPT-style: one long sequence per document
        prefix = _sentence_dataset(tmp_path / "gpt_text_document", 1, length_range=(40, 120))
    elif case == "one-sentence-docs":
        prefix = _sentence_dataset(tmp_path / "short_text_sentence", 1)
    elif case == "ids-beyond-vocab":
        prefix = _sentence_dataset(tmp_path / "big_text_sentence", 3, vocab_limit=60000)
    else:
        prefix = str(tmp_path / "absent_text_sentence")
    argv = [a for a in bert_argv(iters=2) if a != "--mock-data"]
    proc = cli(*argv, "--data-path", prefix, "--split", "90,10,0", "--save", str(save),
               "--data-cache-path", str(tmp_path / "cache"))
    if case == "sentence-level-trains":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "lm loss" in proc.stdout + proc.stderr
        assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
        return
    needles = {"document-level": ("--split-sentences",), "one-sentence-docs": ("2 sentences",),
               "ids-beyond-vocab": ("vocab",), "missing-file": ("absent_text_sentence",)}[case]
    assert_one_line(proc, *needles)
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not list(save.rglob("*.pt")) and not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.slow
def test_real_tokens_only_matches_across_layouts(reference):
    """--random-ltd-real-tokens-only (kept slots among real tokens; the mock samples are 50-100%
    real) changes training, and TP2 and PP2 runs equal the single process with it."""
    argv = bert_argv("--optimizer", "sgd", "--exit-interval", "3",
                     "--random-ltd-real-tokens-only")
    single = losses(run(argv)[0])
    plain = reference[0][:3]
    assert single[0] != plain[0]  # the first forward already keeps other tokens
    for world, flags in (LAYOUTS["TP2"], LAYOUTS["PP2"]):
        for got in run_distributed(_train, world, args=(argv + flags,), timeout=300):
            assert _max_rel(got, single) < 2e-6, (flags, got, single)
