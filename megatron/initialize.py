"""Process start: device choice and seeding.

Multi-process start (torchrun / SLURM environments, process groups) is added with the parallel
layouts; a single process needs only a device and seeds.
"""

import os
import random

import numpy as np
import torch

from megatron.errors import UserError


def requested_device(device=None) -> str:
    """What ``select_device`` will resolve: ``--device`` if given, else $MEGATRON_DEVICE, else
    "cuda" when available, else "cpu" (no CUDA call beyond ``is_available``)."""
    if device is None:
        device = os.environ.get("MEGATRON_DEVICE")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_distributed_backend(device=None) -> str:
    """--distributed-backend's default: nccl where the run's device is a GPU, else gloo (also
    for --device cpu on a GPU node, where NCCL could not move the CPU tensors)."""
    return "nccl" if requested_device(device).startswith("cuda") else "gloo"


def select_device(device=None):
    """``--device`` if given, else CUDA when available, else CPU."""
    device = requested_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if device == "cuda":
        from megatron.parallel.initialize import local_cuda_index

        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        device = f"cuda:{local_cuda_index(local_rank, torch.cuda.device_count())}"
    device = torch.device(device)
    if device.type == "cuda":
        # Also for an explicit cuda:N: collectives on bookkeeping tensors (comm_device), the
        # RNG tracker and NCCL use the current device, which must be the model's.
        torch.cuda.set_device(device)
    return device


def set_random_seed(seed):
    """Seed python, numpy and torch (CPU and CUDA) the same way on every run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state(tracker=None):
    """Every RNG state a resumed run needs (Megatron's rng_state keys)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tracker.get_states() if tracker is not None else None,
    }
    return state


def set_rng_state(state, tracker=None):
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if tracker is not None and state.get("rng_tracker_states") is not None:
        tracker.set_states(state["rng_tracker_states"])
