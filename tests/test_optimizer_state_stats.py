"""--log-optimizer-states-to-tensorboard (megatron/optim/state_stats.py): Megatron-DeepSpeed's
optimizer/* TensorBoard tags.

- the statistics are the L2/L1 norms and largest absolute values of AdamW's ``exp_avg_sq``, its
  square root, ``exp_avg`` and the weights, read from torch's optimizer state; none before the
  first step;
- a run writes every tag; under TP 2 (shards on both ranks, replicated parameters once) and
  under DP 2 with the distributed optimizer (each rank holds half the moments) the values are
  the single-process run's (slow).
"""

import math

import pytest
import torch

from distributed_harness import run_distributed
from megatron.optim.optimizer import build_optimizer
from megatron.optim.state_stats import NAMES, optimizer_state_stats
from megatron.parallel.state import ParallelState
from training_helpers import gpt_argv, run

TAGS = sorted(f"optimizer/{name}_{kind}" for name in NAMES for kind in ("l2", "l1", "abs_max"))


def test_stats_are_the_norms_of_adams_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = build_optimizer(model, lr=0.1, log=lambda msg: None)
    assert optimizer_state_stats(optimizer, ParallelState()) == {}  # no moments yet
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    stats = optimizer_state_stats(optimizer, ParallelState())
    assert sorted(stats) == TAGS
    params = list(model.parameters())
    state = optimizer.optimizer.state
    series = {"variance": [state[p]["exp_avg_sq"] for p in params],
              "variance_sqrt": [state[p]["exp_avg_sq"].sqrt() for p in params],
              "momentum": [state[p]["exp_avg"] for p in params],
              "weight": [p.detach() for p in params]}
    for name, tensors in series.items():
        flat = torch.cat([t.flatten() for t in tensors]).double()
        assert stats[f"optimizer/{name}_l2"] == pytest.approx(float(flat.norm()), rel=1e-6)
        assert stats[f"optimizer/{name}_l1"] == pytest.approx(float(flat.abs().sum()), rel=1e-6)
        assert stats[f"optimizer/{name}_abs_max"] == pytest.approx(float(flat.abs().max()))


def _optimizer_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]
            if tag.startswith("optimizer/") and " vs " not in tag}  # (per iteration)


def _all_tags(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return events.Tags()["scalars"]


def _argv(data_prefix, tb_dir, *extra):
    return gpt_argv(data_prefix, "--tensorboard-dir", str(tb_dir),
                    "--log-optimizer-states-to-tensorboard", "--hidden-dropout", "0",
                    "--attention-dropout", "0", *extra, iters=3)


def _rank(rank, world_size, argv):
    run(argv)


@pytest.mark.slow
def test_every_element_counts_once_under_tp_and_zero(data_prefix, tmp_path):
    run(_argv(data_prefix, tmp_path / "single"))
    single = _optimizer_scalars(tmp_path / "single")
    assert "optimizer/variance_l2 vs tokens" in _all_tags(tmp_path / "single")  # as there
    assert sorted(single) == TAGS and all(len(v) == 3 for v in single.values())
    layouts = {"tp2": ["--tensor-model-parallel-size", "2"],
               "zero_dp2": ["--use-distributed-optimizer"]}
    for name, extra in layouts.items():
        run_distributed(_rank, world_size=2,
                        args=(_argv(data_prefix, tmp_path / name, *extra),), timeout=300)
        other = _optimizer_scalars(tmp_path / name)
        assert sorted(other) == TAGS, name
        for tag in TAGS:
            for a, b in zip(single[tag], other[tag]):
                assert math.isclose(a, b, rel_tol=1e-3), (name, tag, a, b)
