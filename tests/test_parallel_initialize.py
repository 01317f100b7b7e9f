import dataclasses

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
    job = {"SLURM_PROCID": "0", "SLURM_NTASKS": "64", "SLURM_LOCALID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-14],login1"}
    srun_task = {**job, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                 "SLURM_STEP_NUM_TASKS": "64"}
    env = read_distributed_env(srun_task)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (9, 64, 1, "gpu07", 29500 + 4242, "slurm")
    # a step of fewer tasks than the job: the step's count
    assert read_distributed_env({**srun_task, "SLURM_STEP_NUM_TASKS": "8"}).world_size == 8
    # `python pretrain_gpt.py` run by the batch script itself (no srun): one process, not a
    # rank 0 waiting for 63 others that never start
    assert read_distributed_env(job).launcher == "single"
    assert read_distributed_env(job).world_size == 1
    assert read_distributed_env({}).launcher == "single"
    with pytest.raises(UserError, match="RANK"):
        read_distributed_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_nodelists_expand_as_scontrol_show_hostnames():
    assert expand_slurm_nodelist("a[1-3,7],b,c[08-09]") == ["a1", "a2", "a3", "a7", "b", "c08",
                                                            "c09"]
    assert expand_slurm_nodelist("node[1-2]-ib") == ["node1-ib", "node2-ib"]
    assert expand_slurm_nodelist("r[1-2]-n[01-02],login") == \
        ["r1-n01", "r1-n02", "r2-n01", "r2-n02", "login"]
    assert expand_slurm_nodelist("gpu-node[01-04,07]")[0] == "gpu-node01"
    assert expand_slurm_nodelist("single") == ["single"]


def test_parse_args_takes_the_world_size_of_an_srun_step_only(monkeypatch):
    from megatron.arguments import parse_args

    argv = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
            "--seq-length", "8", "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "16", "--train-iters", "1", "--mock-data", "--lr", "1e-3"]
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "64")
    assert parse_args(argv).world_size == 1  # the batch script
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert parse_args(argv).world_size == 2


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


def _fake_cuda(monkeypatch, device_count):
    """A CPU machine that claims ``device_count`` GPUs; records set_device and process start."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: device_count)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: calls.append(("set_device", torch.device("cuda", d)
                                                if isinstance(d, int) else torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend)))
    return calls


def test_nccl_start_sets_the_local_gpu_before_the_process_group(monkeypatch):
    from megatron.parallel.initialize import DistributedEnv, init_process_group

    env = DistributedEnv(rank=6, world_size=8, local_rank=2, master_addr="n0", master_port=1,
                         launcher="torchrun")
    calls = _fake_cuda(monkeypatch, 4)
    init_process_group(env)  # nccl: CUDA is "available"
    assert calls == [("set_device", torch.device("cuda", 2)), ("init", "nccl")]
    calls = _fake_cuda(monkeypatch, 4)
    init_process_group(env, "gloo")
    assert calls == [("init", "gloo")]
    # srun --gpus-per-task=1: one visible GPU, SLURM_LOCALID 3 -> that GPU
    calls = _fake_cuda(monkeypatch, 1)
    init_process_group(dataclasses.replace(env, local_rank=3))
    assert calls == [("set_device", torch.device("cuda", 0)), ("init", "nccl")]
    _fake_cuda(monkeypatch, 4)
    with pytest.raises(UserError, match="local rank 5 .* 4 are visible"):
        init_process_group(dataclasses.replace(env, local_rank=5))


def test_select_device_makes_the_chosen_gpu_current(monkeypatch):
    from megatron.initialize import select_device

    calls = _fake_cuda(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert select_device("cuda") == torch.device("cuda", 3)
    # an explicit index is made current too (comm_device() and the RNG tracker use the
    # current device, which must be the model's)
    assert select_device("cuda:5") == torch.device("cuda", 5)
    assert calls == [("set_device", torch.device("cuda", 3)),
                     ("set_device", torch.device("cuda", 5))]
    calls = _fake_cuda(monkeypatch, 1)
    assert select_device("cuda") == torch.device("cuda", 0)  # one GPU bound to this task
    assert select_device("cpu") == torch.device("cpu")
    assert calls == [("set_device", torch.device("cuda", 0))]


def test_process_groups_lists_each_existing_group_once():
    from megatron.parallel.state import ParallelState

    tp, dp = object(), object()  # stand-ins: only identity matters
    state = ParallelState(tp_size=2, tp_group=tp, dp_size=2, dp_group=dp, mp_group=tp)
    assert state.process_groups() == (tp, dp)
    assert ParallelState().process_groups() == ()


def test_no_known_process_groups_before_a_process_group_starts(monkeypatch):
    import torch.distributed as dist

    from megatron.parallel.initialize import known_process_groups

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert known_process_groups() == ()
