"""Run a test function in N gloo processes on CPU.

    def body(rank, world_size, out_dir):
        ...                     # torch.distributed is initialised (gloo)
        return {"loss": 1.0}    # picklable; collected per rank

    results = run_distributed(body, world_size=4, args=(str(tmp_path),))

Each rank runs ``body(rank, world_size, *args)`` in its own process with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set as torchrun would. An exception on any rank, or a
rank that does not finish within ``timeout`` seconds, ends every process and fails the caller
with the rank's traceback: a broken collective never hangs the test suite.
"""

import multiprocessing
import os
import queue
import socket
import time
import traceback


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(body, rank, world_size, port, args, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        try:
            out = body(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:  # noqa: B902 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


class DistributedTestError(RuntimeError):
    pass


def _all_failures(rank, payload, results, grace=3.0):
    """The first failure plus any other rank's within ``grace`` seconds: when one rank raises,
    its peers fail too (connection reset), and the root cause may not arrive first."""
    failures = [(rank, payload)]
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            other, status, text = results.get(timeout=max(deadline - time.time(), 0.01))
        except queue.Empty:
            break
        if status == "error":
            failures.append((other, text))
    return "\n".join(f"rank {r} failed:\n{text}" for r, text in sorted(failures))


def run_distributed(body, world_size, args=(), timeout=120.0):
    """Run ``body`` on ``world_size`` ranks; returns the list of per-rank results."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(body, r, world_size, port, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    collected, deadline = {}, time.time() + timeout
    try:
        while len(collected) < world_size:
            remaining = deadline - time.time()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise DistributedTestError(f"ranks {missing} did not finish within {timeout} s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in collected]
                if dead:
                    raise DistributedTestError(f"rank {dead[0]} died with exit code "
                                               f"{procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise DistributedTestError(_all_failures(rank, payload, results))
            collected[rank] = payload
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return [collected[r] for r in range(world_size)]
