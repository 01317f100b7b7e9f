"""Process start for multi-process runs: rank discovery (torchrun or SLURM) and process groups.

Ranks are laid out as in Megatron-LM: tensor-parallel ranks are adjacent, then data-parallel,
then pipeline-parallel::

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a tensor-parallel group sits inside one node (fast links) and each pipeline stage holds a
contiguous block of ranks. Every rank creates every group in the same order (a
torch.distributed requirement) and keeps the handles of its own in the ``ParallelState``.
"""

import dataclasses
import datetime
import os
import re
from typing import Dict, List, Mapping, Optional

from megatron.errors import USER_ERROR_STATUS, UserError, print_error
from megatron.parallel.heartbeat import name_ranks
from megatron.parallel.state import ParallelState


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun', 'slurm' or 'single'


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """Expand SLURM's compressed host list (``scontrol show hostnames``): ``"gpu[01-03,07],
    login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]``; zero padding is kept,
    text may follow a bracket and an item may hold several (``"r[1-2]-n[01-02]-ib"`` -> r1-n01-ib,
    r1-n02-ib, r2-n01-ib, r2-n02-ib)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):  # split at the commas outside brackets
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    hosts = []
    for item in filter(None, (item.strip() for item in items)):
        names = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [text + value for value in _expand_ranges(ranges)] if ranges else [text]
            names = [name + choice for name in names for choice in choices]
        hosts.extend(names)
    return hosts


def _expand_ranges(ranges: str) -> List[str]:
    values = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            values.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        else:
            values.append(part)
    return values


def read_distributed_env(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, else SLURM's
    SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID and the first host of SLURM_JOB_NODELIST
    inside an srun step (so ``srun python pretrain_gpt.py ...`` works without torchrun), else a
    single process."""
    env = os.environ if environ is None else environ

    def integer(name):
        try:
            return int(env[name])
        except ValueError:
            raise UserError(f"environment variable {name}={env[name]!r} is not an integer")

    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(integer("RANK"), integer("WORLD_SIZE"),
                              integer("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                              env.get("MASTER_ADDR", "127.0.0.1"),
                              integer("MASTER_PORT") if "MASTER_PORT" in env else 29500,
                              "torchrun")
    # An srun task has the step's variables; the batch script itself (`python pretrain_gpt.py`
    # run directly inside sbatch/salloc) has SLURM_PROCID=0 and the job's SLURM_NTASKS too,
    # but is one process: waiting there for SLURM_NTASKS ranks would hang.
    in_srun_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and in_srun_step:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        hosts = expand_slurm_nodelist(nodelist) if nodelist else []
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        port = integer("MASTER_PORT") if "MASTER_PORT" in env else \
            29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        return DistributedEnv(integer("SLURM_PROCID"), integer(tasks),
                              integer("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                              addr, port, "slurm")
    return DistributedEnv(0, 1, 0, "127.0.0.1", 29500, "single")


def rank_layout(world_size: int, tp: int, pp: int) -> Dict[str, List[List[int]]]:
    """Global ranks of every tensor-, data- and pipeline-parallel group, and of every
    embedding group (first and last stage of a pipeline, which share the tied embedding)."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not divisible by "
                        f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)

    def rank(p, d, t):
        return p * dp * tp + d * tp + t

    return {
        "tp": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "embedding": [sorted({rank(0, d, t), rank(pp - 1, d, t)})
                      for d in range(dp) for t in range(tp)],
        # one model replica: its TP x PP ranks (grad-norm and inf checks reduce over it)
        "mp": [[rank(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }


def coordinates(rank: int, world_size: int, tp: int, pp: int):
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    dp = world_size // (tp * pp)
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def local_cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with ``local_rank`` on its node, ``device_count`` GPUs visible.

    One visible GPU is this process's own whatever its local rank (``srun --gpus-per-task=1``
    or a per-rank CUDA_VISIBLE_DEVICES); otherwise local rank i takes GPU i.
    """
    if device_count < 1:
        raise UserError("CUDA is not available on this machine")
    if device_count == 1:
        return 0
    if not 0 <= local_rank < device_count:
        raise UserError(f"local rank {local_rank} (LOCAL_RANK / SLURM_LOCALID) has no GPU: "
                        f"{device_count} are visible on this node; start at most "
                        f"{device_count} processes per node")
    return local_rank


def init_process_group(env: DistributedEnv, backend: Optional[str] = None,
                       timeout_minutes: float = 10.0):
    """Start torch.distributed for ``env`` (by default ``default_distributed_backend()``: nccl
    on GPU, gloo on CPU).

    With nccl the process's GPU (``local_cuda_index``) is made current first, as Megatron-LM
    does: NCCL communicators, ``barrier()`` and the object collectives use the current
    device, and without it every rank would start on GPU 0.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        from megatron.initialize import default_distributed_backend

        backend = default_distributed_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_cuda_index(env.local_rank, torch.cuda.device_count()))
    dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:"
                            f"{env.master_port}", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def build_parallel_state(tp: int, pp: int, rng_tracker=None,
                         timeout_minutes: Optional[float] = None) -> ParallelState:
    """Create every group (same order on every rank) and return this rank's ParallelState.

    With one process no group is created and the default (single-process) layout is returned.
    ``timeout_minutes`` (--distributed-timeout-minutes) bounds every wait on the new groups
    (torch's default for a new group is its backend's, 30 minutes, not the world's).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if tp * pp != 1:
            raise UserError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
                            f"{pp} needs {tp * pp} processes; start with torchrun or srun")
        return ParallelState(rng_tracker=rng_tracker)
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = rank_layout(world, tp, pp)
    mine = {}
    for kind in ("tp", "dp", "pp", "embedding", "mp"):
        for ranks in layout[kind]:
            group = dist.new_group(ranks, timeout=None if timeout_minutes is None
                                   else datetime.timedelta(minutes=timeout_minutes))
            if rank in ranks:
                mine[kind] = (group, ranks)
    tp_rank, dp_rank, pp_rank = coordinates(rank, world, tp, pp)
    dp = world // (tp * pp)
    return ParallelState(
        tp_size=tp, tp_rank=tp_rank, tp_group=mine["tp"][0] if tp > 1 else None,
        pp_size=pp, pp_rank=pp_rank, pp_group=mine["pp"][0] if pp > 1 else None,
        dp_size=dp, dp_rank=dp_rank, dp_group=mine["dp"][0] if dp > 1 else None,
        pp_ranks=tuple(mine["pp"][1]), tp_ranks=tuple(mine["tp"][1]),
        dp_ranks=tuple(mine["dp"][1]),
        embedding_group=mine["embedding"][0] if "embedding" in mine and pp > 1 else None,
        mp_group=mine["mp"][0] if tp * pp > 1 else None,
        rng_tracker=rng_tracker)


# What gloo says when a wait outlives the process group's timeout, and when a peer's process
# went away (its sockets closed); NCCL's watchdog says "Watchdog caught collective operation
# timeout", the store "Timed out after ... waiting for clients" at start-up and "wait timeout
# after ...ms, keys: ..." for a key a frozen peer never set (NCCL's communicator set-up).
# A gloo rank that timed out closes its connections; a third rank waiting on it through one of
# them reads the bare "Application timeout caused pair closure" (no gloo path in the text).
_PAIR_CLOSED_BY_TIMEOUT = "Application timeout caused pair closure"
_TIMEOUT_MARKERS = ("Timed out", "timed out", "operation timeout", "wait timeout",
                    _PAIR_CLOSED_BY_TIMEOUT)
_LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "Connection refused",
                      # torch's detail for NCCL's remote error (a peer's process ended)
                      "ncclRemoteError")


class PeerWaitError(RuntimeError):
    """A point-to-point wait failed; ``peer`` is the global rank it waited on."""

    def __init__(self, message, peer):
        super().__init__(message)
        self.peer = peer


def _is_distributed_error(err: BaseException) -> bool:
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, (dist.DistError, PeerWaitError)) or "/gloo/" in text \
        or "ProcessGroup" in text or "NCCL" in text or _PAIR_CLOSED_BY_TIMEOUT in text


def communication_failure(err: BaseException, timeout_minutes: float, rank: int,
                          world_size: int, heartbeat=None) -> Optional[str]:
    """One line for a torch.distributed wait that timed out or lost its peer, else None (any
    other error keeps its traceback).

    The peer is named where it is known: the neighbour of a failed point-to-point wait
    (``PeerWaitError``), or the other rank in a world of two; a collective does not say which
    member it waited on, so there ``heartbeat`` (a running ``Heartbeat``) names the ranks that
    stopped beating, with their hosts."""
    if not _is_distributed_error(err):
        return None
    text = str(err)
    peer = getattr(err, "peer", None)
    timed_out = any(marker in text for marker in _TIMEOUT_MARKERS)
    lost = any(marker in text for marker in _LOST_PEER_MARKERS)
    if not (timed_out or lost):
        return None
    return _failure_line("timeout" if timed_out else "lost", rank, peer, world_size,
                         timeout_minutes, heartbeat)


def _failure_line(kind: str, rank: int, peer: Optional[int], world_size: int,
                  timeout_minutes: float, heartbeat=None) -> str:
    """The one line for a failed wait: ``kind`` is "timeout", "lost" (the peer's process or
    node went away), "nccl" (an NCCL error) or "remote" (another rank reported a failure).
    An unknown peer is found by ``heartbeat`` where one runs (``Heartbeat.silent_ranks``)."""
    if peer is None and world_size == 2:
        peer = 1 - rank
    # the rank a point-to-point wait waited on may itself be waiting on the one that stopped:
    # among more than two, the heartbeat's answer comes first
    silent = heartbeat.silent_ranks() if heartbeat is not None and world_size > 2 else None
    if silent:
        who = name_ranks(silent)
    elif peer is not None:
        who = name_ranks([(peer, heartbeat.host_of(peer) if heartbeat is not None else None)])
    else:
        who = "a peer rank"
    reason = {
        "timeout": f"no answer from {who} within --distributed-timeout-minutes "
                   f"{timeout_minutes:g} (a frozen or stuck process or node)",
        # a collective's closed connection may come from a rank that gave up on a frozen one:
        # the heartbeat names the rank that stopped, whichever way it stopped
        "lost": f"lost a connection: {who} stopped answering (its process ended or froze, or "
                f"its node went away)" if silent else
                f"lost the connection to {who} (its process ended or its node went away)",
        "nccl": f"NCCL reported a communication error with {who} (a process ended, or a GPU "
                f"or network link failed)",
        "remote": "another rank reported an NCCL failure"
                  + (f" ({who} stopped answering)" if silent else ""),
    }[kind]
    return f"rank {rank}: {reason}; stopped"


# torch's ProcessGroupNCCL finds a collective that outlived the timeout (or an NCCL error) on
# its own watchdog thread while the Python thread sits in a CUDA synchronisation and never sees
# an exception. With TORCH_NCCL_ASYNC_ERROR_HANDLING unset (3) or 1 the watchdog then logs,
# sleeps for the flight recorder's dump (4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC, a minute by
# default) and aborts the process from C++: SIGABRT and a C++ stack, no line of ours. The backend
# records the failure (``get_error()``) before that sleep, so a Python thread that polls it ends
# the process first, with the one line. Values 0 and 2 leave the process alive (the caller
# handles errors); the watch then stays off, and a later call on the aborted communicator raises
# in Python, which ``communication_failure`` reads.
_ERROR_KINDS = {"TIMEOUT": "timeout", "COMM_ERROR": "nccl", "REMOTE_ERROR": "remote"}


class BackendFailureWatch:
    """While open, a daemon thread asks every watched process group's NCCL backend for its
    error state each ``interval`` seconds; at the first failure it prints our one line
    (``error: rank R: no answer from rank P within --distributed-timeout-minutes T ...``) on
    stderr and ends the process with status 2 (``exit``, ``os._exit`` by default: the main
    thread may be blocked in C++ and cannot be interrupted).

    Groups without such a backend (gloo, whose waits raise in the calling thread, or a torch
    without ``get_error``) are not watched; with none to watch no thread starts."""

    def __init__(self, timeout_minutes: float, rank: int, world_size: int,
                 interval: float = 1.0, exit=os._exit, heartbeat=None):
        import threading

        self.timeout_minutes, self.rank, self.world_size = timeout_minutes, rank, world_size
        self.heartbeat = heartbeat  # names the silent ranks (``Heartbeat``), where one runs
        self.interval, self._exit = interval, exit
        self._backends = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def enabled() -> bool:
        """False where TORCH_NCCL_ASYNC_ERROR_HANDLING asks NCCL to leave the process alive."""
        return os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3").strip() not in ("0", "2")

    def add(self, groups) -> int:
        """Watch the NCCL backends of ``groups`` (process groups; None entries are skipped);
        returns how many backends are watched in all."""
        import threading

        import torch

        found = []
        for group in groups:
            if group is None:
                continue
            try:
                backend = group._get_backend(torch.device("cuda"))
            except (RuntimeError, AttributeError, ValueError):
                continue
            if callable(getattr(backend, "get_error", None)):
                found.append(backend)
        with self._lock:
            for backend in found:
                if all(backend is not watched for watched in self._backends):
                    self._backends.append(backend)
            if self._backends and self._thread is None and self.enabled():
                self._thread = threading.Thread(target=self._run, name="megatron-nccl-watch",
                                                daemon=True)
                self._thread.start()
            return len(self._backends)

    def _failure(self) -> Optional[str]:
        with self._lock:
            backends = list(self._backends)
        for backend in backends:
            try:
                error = backend.get_error()
            except RuntimeError:  # a backend being shut down has nothing more to say
                continue
            kind = _ERROR_KINDS.get(getattr(error, "name", "SUCCESS"))
            if kind is not None:
                line = _failure_line(kind, self.rank, None, self.world_size,
                                     self.timeout_minutes, self.heartbeat)
                if self.heartbeat is not None:
                    self.heartbeat.stopping()
                return line
        return None

    def _run(self):
        import sys

        while not self._stop.wait(self.interval):
            line = self._failure()
            if line is not None:
                sys.stdout.flush()
                print_error(line)
                self._exit(USER_ERROR_STATUS)
                return

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def known_process_groups():
    """Every process group of this process that torch has on record: ours and those a library
    made on its own (DeepSpeed's engine makes several), each once; () where this torch keeps no
    such record (a private table, read defensively) or no process group is started."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return ()
    try:
        from torch.distributed.distributed_c10d import _world

        return tuple(_world.pg_map)
    except (ImportError, AttributeError, TypeError):
        return ()


def comm_device():
    """Device for small bookkeeping collectives: CUDA under NCCL (which only moves GPU
    tensors), else CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
