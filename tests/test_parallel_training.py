"""pretrain_gpt under TP / PP / DP on CPU (gloo ranks) matches the single-process run.

Each layout trains a tiny GPT for a few steps with random-LTD off and on; losses must equal the
single-process run's (fp32, relative 1e-5), and the final checkpoint, converted back to one
process with tools/checkpoint_util.py, must hold the same parameters. Dropout is 0 (dropout in
TP regions uses per-rank streams by design, as in Megatron) and the optimizer SGD.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from distributed_harness import run_distributed
from training_helpers import ROOT, gpt_argv, launch_ranks, nccl_rank_env, run

pytestmark = pytest.mark.slow  # every test here runs several processes

sys.path.insert(0, os.path.join(ROOT, "tools"))
import checkpoint_util  # noqa: E402

LTD = ["--random-ltd", "--random-ltd-start", "8", "--random-ltd-step", "4",
       "--random-ltd-schedule-steps", "3"]


def argv_for(data_prefix, save, *extra):
    return gpt_argv(data_prefix, "--num-layers", "4", "--micro-batch-size", "1",
                    "--global-batch-size", "4", "--hidden-dropout", "0",
                    "--attention-dropout", "0", "--eval-interval", "100", "--eval-iters", "1",
                    "--lr-warmup-iters", "1", "--save", save,
                    # SGD: Adam would turn rounding noise in exactly-zero gradients (the key
                    # bias) into full-size updates, so parameters could not be compared.
                    "--optimizer", "sgd", "--lr", "0.05", *extra, iters=3)


def _train(rank, world_size, runs):
    """Run each argv in turn on this rank; return every run's losses."""
    return [[d["lm loss"] for _, d in run(argv)[0].train_losses] for argv in runs]


def _final_model(ckpt, tmp):
    """The checkpoint's parameters as one process would hold them."""
    out = os.path.join(tmp, "merged")
    checkpoint_util.convert(ckpt, out, 1, 1, log=lambda *a: None)
    state = torch.load(os.path.join(out, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=False)
    return state["model"]


@pytest.fixture(scope="module")
def reference(data_prefix, tmp_path_factory):
    """Single-process losses and final parameters, random-LTD off and on."""
    out = {}
    for name, extra in (("dense", []), ("ltd", LTD)):
        ckpt = str(tmp_path_factory.mktemp(f"ref_{name}"))
        result, _ = run(argv_for(data_prefix, ckpt, *extra))
        out[name] = ([d["lm loss"] for _, d in result.train_losses],
                     torch.load(os.path.join(ckpt, "iter_0000003", "mp_rank_00",
                                             "model_optim_rng.pt"), weights_only=False)["model"])
    return out


LAYOUTS = {
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "DP2": (2, []),
    "TP2xPP2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "TP2xDP2": (4, ["--tensor-model-parallel-size", "2"]),
    "TP2-sequence-parallel": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "DP2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, data_prefix, reference, tmp_path):
    world, flags = LAYOUTS[layout]
    runs = [argv_for(data_prefix, str(tmp_path / name), *flags, *extra)
            for name, extra in (("dense", []), ("ltd", LTD))]
    per_rank = run_distributed(_train, world, args=(runs,), timeout=300)
    for i, name in enumerate(("dense", "ltd")):
        ref_losses, ref_model = reference[name]
        for losses in per_rank:  # every rank reports the same (reduced, broadcast) losses
            assert losses[i] == pytest.approx(ref_losses, rel=1e-5)
        model = _final_model(str(tmp_path / name), str(tmp_path / f"{name}_merged"))
        assert sorted(model) == sorted(ref_model)
        for key, value in ref_model.items():
            torch.testing.assert_close(model[key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert reference["dense"][0] != reference["ltd"][0]  # dropping really happened
    if layout == "TP2xPP2":  # Megatron's tracker seeds, seed + 100 pp + 2718 + tp (dropout 0:
        _assert_tracker_seeds(str(tmp_path / "dense"), tp=2, pp=2)  # still as seeded)


def _logged_losses(stdout):
    return [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", stdout)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL)")
@pytest.mark.parametrize("layout", ["TP2", "PP2", "DP2"])
def test_layout_over_nccl_matches_single_process(layout, data_prefix, tmp_path):
    """The same on a GPU, ranks over NCCL (with one GPU both ranks share it, as two NCCL
    hosts): the losses rank 0 logs equal those of one process on the GPU. Every process is
    started fresh (a CUDA context does not survive a fork)."""
    world, flags = LAYOUTS[layout]
    argv = argv_for(data_prefix, str(tmp_path / "one"), "--device", "cuda", "--log-interval",
                    "1", *LTD)
    one = subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT, text=True,
                         capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    argv[argv.index("--save") + 1] = str(tmp_path / layout)
    procs = launch_ranks([*argv, *flags], world_size=world, rank_env=nccl_rank_env(world))
    try:
        outs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * world, outs[0][1][-3000:]
    expected = _logged_losses(one.stdout)
    assert len(expected) == 3
    assert _logged_losses(outs[0][0]) == pytest.approx(expected, rel=1e-4)


def _assert_tracker_seeds(root, tp, pp, seed=7):  # gpt_argv's --seed
    from megatron.checkpointing import checkpoint_file
    from megatron.parallel.random import MODEL_PARALLEL_RNG, model_parallel_seed

    for t in range(tp):
        for p in range(pp):
            entry = torch.load(checkpoint_file(root, 3, t, p, pp),
                               weights_only=False)["rng_state"][0]
            want = torch.Generator().manual_seed(model_parallel_seed(seed + 100 * p, t))
            assert torch.equal(entry["rng_tracker_states"][MODEL_PARALLEL_RNG]["cpu"],
                               want.get_state()), (t, p)


def _resume_one_step(rank, world_size, argv):
    return [d["lm loss"] for _, d in run(argv)[0].train_losses]


def test_conversion_keeps_the_next_step_loss(data_prefix, tmp_path):
    flags = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    ckpt = str(tmp_path / "tp2pp2")

    def four_iters(argv):
        argv[argv.index("--train-iters") + 1] = "4"
        return argv

    first = four_iters(argv_for(data_prefix, ckpt, *flags, *LTD, "--exit-interval", "3"))
    run_distributed(_train, 4, args=([first],), timeout=300)

    def resume(load, *extra):
        return four_iters(argv_for(data_prefix, str(tmp_path / "unused"), "--load", load,
                                   *extra, *LTD))

    original = run_distributed(_resume_one_step, 4, args=(resume(ckpt, *flags),), timeout=300)
    single = str(tmp_path / "tp1pp1")
    checkpoint_util.convert(ckpt, single, 1, 1, log=lambda *a: None)
    (from_single, _), = [run(resume(single))]
    back = str(tmp_path / "back")
    checkpoint_util.convert(single, back, 2, 2, log=lambda *a: None)
    round_trip = run_distributed(_resume_one_step, 4, args=(resume(back, *flags),), timeout=300)
    step4 = original[0][-1]
    assert from_single.train_losses[-1][0] == 4
    assert from_single.train_losses[-1][1]["lm loss"] == pytest.approx(step4, rel=1e-5)
    assert round_trip[0][-1] == pytest.approx(step4, rel=1e-5)


def test_tokenbypass_under_pipeline_and_data_parallelism(data_prefix, tmp_path):
    """The importance table is updated identically on every rank (DP sums, PP broadcast)."""
    tb = ["--random-ltd", "--random-ltd-method", "tokenbypass", "--random-ltd-start", "16",
          "--random-ltd-schedule", "constant"]
    single, _ = run(argv_for(data_prefix, str(tmp_path / "single"), *tb))
    flags = ["--pipeline-model-parallel-size", "2"]
    per_rank = run_distributed(_train, 4, args=(
        [argv_for(data_prefix, str(tmp_path / "pp2dp2"), *flags, *tb)],), timeout=300)
    ref = [d["lm loss"] for _, d in single.train_losses]
    for losses in per_rank:
        assert losses[0] == pytest.approx(ref, rel=1e-5)


def test_resume_with_another_data_parallel_size(data_prefix, tmp_path):
    ckpt = str(tmp_path / "dp2")

    def argv(*extra):
        a = argv_for(data_prefix, ckpt, *LTD, *extra)
        a[a.index("--train-iters") + 1] = "4"
        return a

    full, _ = run(argv("--save", str(tmp_path / "full")))
    run_distributed(_train, 2, args=([argv("--exit-interval", "2")],), timeout=300)
    resumed, _ = run(argv("--load", ckpt))  # DP 2 -> DP 1
    assert [i for i, _ in resumed.train_losses] == [3, 4]
    assert [d["lm loss"] for _, d in resumed.train_losses] == pytest.approx(
        [d["lm loss"] for _, d in full.train_losses[2:]], rel=1e-5)
