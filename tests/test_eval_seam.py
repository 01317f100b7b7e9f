"""The evaluation seam of the training loop: a whole evaluation set once over the data-parallel
ranks, and ratios (correct / total, loss sum / tokens) summed, never averaged as means."""

import numpy as np
import pytest
import torch

from megatron.data.samplers import build_eval_data_loader
from megatron.parallel.state import ParallelState
from megatron.training import reduce_loss_dicts, sum_metric_pairs


class _Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return {"value": np.array([idx], dtype=np.int64)}


@pytest.mark.parametrize("n,mbs,dp", [(7, 2, 2), (1, 4, 3), (12, 3, 2), (5, 1, 1), (0, 2, 2)])
def test_every_sample_exactly_once_over_the_ranks(n, mbs, dp):
    seen, counts = [], set()
    for rank in range(dp):
        loader = build_eval_data_loader(_Numbers(n), mbs, rank, dp)
        counts.add(len(loader))
        batches = list(loader)
        assert len(batches) == loader.num_micro_batches
        for batch in batches:
            assert batch["value"].shape == (mbs, 1)  # full micro-batches: fixed p2p shapes
            valid = batch["eval_valid"].bool()
            seen += batch["value"][valid, 0].tolist()
            assert batch["index"][valid].tolist() == batch["value"][valid, 0].tolist()
    assert len(counts) == 1  # every rank runs the same number of micro-batches
    assert sorted(seen) == list(range(n))


def test_ratios_are_summed_not_averaged():
    reported = [{"lm loss": torch.tensor(2.0), "correct": (torch.tensor(3.0), 4)},
                {"lm loss": torch.tensor(4.0), "correct": (torch.tensor(0.0), 1)}]
    losses = reduce_loss_dicts(reported, ParallelState())
    assert losses == {"lm loss": 3.0, "correct": 3.0 / 5.0}  # not (3/4 + 0/1) / 2
    assert sum_metric_pairs(reported, ParallelState()) == {"lm loss": (6.0, 2.0),
                                                           "correct": (3.0, 5.0)}


def _pp2_dp2(rank, world_size):
    from megatron.parallel.initialize import build_parallel_state

    parallel = build_parallel_state(1, 2)
    reported = []
    if parallel.is_last_stage:  # DP ranks see different micro-batches
        reported = [{"correct": (parallel.dp_rank + 1.0, 3), "loss": 1.0 + parallel.dp_rank}]
    return sum_metric_pairs(reported, parallel), reduce_loss_dicts(reported, parallel)


@pytest.mark.slow
def test_sums_over_data_parallel_ranks_reach_every_pipeline_stage():
    from distributed_harness import run_distributed

    results = run_distributed(_pp2_dp2, world_size=4)
    for sums, losses in results:
        assert sums == {"correct": (3.0, 6.0), "loss": (3.0, 2.0)}
        assert losses == {"correct": 0.5, "loss": 1.5}
