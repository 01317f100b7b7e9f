import pytest
import torch

from distributed_harness import DistributedTestError, run_distributed
from megatron.errors import UserError
from megatron.parallel.initialize import (build_parallel_state, coordinates,
                                          expand_slurm_nodelist, rank_layout,
                                          read_distributed_env)


def test_megatron_rank_order():
    # 16 ranks, TP 2, PP 4 -> DP 2 (Megatron-LM's documented example)
    layout = rank_layout(16, tp=2, pp=4)
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13],
                            [14, 15]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14],
                            [13, 15]]
    assert layout["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert layout["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert layout["mp"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert coordinates(13, 16, 2, 4) == (1, 0, 3)
    with pytest.raises(UserError, match="world size 6 is not divisible"):
        rank_layout(6, tp=4, pp=1)


def test_environment_from_torchrun_and_slurm():
    env = read_distributed_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                "MASTER_ADDR": "node1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 3, "node1", 1234, "torchrun")
    env = read_distributed_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "64",
                                "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                                "SLURM_JOB_NODELIST": "gpu[07-14],login1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == \
        (9, 64, 1, "gpu07", "slurm")
    assert read_distributed_env({}).launcher == "single"
    with pytest.raises(UserError, match="RANK"):
        read_distributed_env({"RANK": "x", "WORLD_SIZE": "2"})
    assert expand_slurm_nodelist("a[1-3,7],b,c[08-09]") == ["a1", "a2", "a3", "a7", "b", "c08",
                                                            "c09"]


def _groups_body(rank, world_size):
    import torch.distributed as dist

    state = build_parallel_state(tp=2, pp=2)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=state.tp_group)
    return (state.tp_rank, state.dp_rank, state.pp_rank, state.pp_ranks, float(t))


def test_groups_on_four_gloo_ranks():
    out = run_distributed(_groups_body, 4)
    # TP 2 x PP 2 x DP 1: ranks (0,1) are stage 0, (2,3) stage 1
    assert [o[:3] for o in out] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    assert [o[3] for o in out] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [o[4] for o in out] == [1.0, 1.0, 5.0, 5.0]  # sum over each TP pair


def _failing_body(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("rank 1 breaks")
    dist.barrier()  # rank 0 would wait here forever


def test_a_failing_rank_ends_the_job_instead_of_hanging():
    with pytest.raises(DistributedTestError, match="rank 1 breaks"):
        run_distributed(_failing_body, 2, timeout=60)
