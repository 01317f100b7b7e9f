"""The heartbeat that names the rank a failed wait was waiting on (megatron/parallel/heartbeat.py):
ranks that stopped beating are named with their hosts, ranks that ended on their own are not,
a store that does not answer names its host (rank 0) within the deadline, and a process whose
thread is left waiting on such a store still exits with its status, not a C++ abort."""

import datetime
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from distributed_harness import free_port
from megatron.parallel.heartbeat import Heartbeat, name_ranks
from megatron.parallel.initialize import communication_failure
from training_helpers import ROOT

HOST = socket.gethostname()
INTERVAL = 0.2


@pytest.fixture
def store_port():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    yield port
    del server


def beats(port, world_size):
    return [Heartbeat("127.0.0.1", port, rank, world_size, interval=INTERVAL).start()
            for rank in range(world_size)]


def freeze(beat):
    """Stop ``beat``'s thread without saying so: a frozen process."""
    beat._stop.set()
    beat._beat.join()


def test_a_rank_that_stopped_beating_is_named_with_its_host(store_port):
    world = beats(store_port, 4)
    try:
        assert all(beat.running for beat in world)
        freeze(world[2])
        world[3].close()  # ended on its own (its one-line stop): not named
        assert world[0].silent_ranks() == [(2, HOST)]
        assert world[1].host_of(2) == HOST
        line = communication_failure(RuntimeError("[/gloo/transport/tcp/pair.cc:534] Timed out "
                                                  "waiting 30000ms for recv operation"),
                                     0.5, 1, 4, heartbeat=world[1])
        assert line == (f"rank 1: no answer from rank 2 on {HOST} within "
                        f"--distributed-timeout-minutes 0.5 (a frozen or stuck process or node); "
                        f"stopped")
    finally:
        for beat in world:
            beat.close()


def test_a_rank_that_ended_and_runs_again_is_named_again(store_port):
    """tasks/run_finetune_seeds.py runs one training after another in the same processes."""
    world = beats(store_port, 2)
    world[1].close()
    world[1] = Heartbeat("127.0.0.1", store_port, 1, 2, interval=INTERVAL).start()
    try:
        freeze(world[1])
        assert world[0].silent_ranks() == [(1, HOST)]
    finally:
        for beat in world:
            beat.close()


def test_every_rank_beating_names_nobody(store_port):
    world = beats(store_port, 3)
    try:
        assert world[0].silent_ranks() == []
        line = communication_failure(RuntimeError("Connection closed by peer [/gloo/x]"), 10, 0,
                                     3, heartbeat=world[0])
        assert "lost the connection to a peer rank" in line
    finally:
        for beat in world:
            beat.close()


def refused(host, port, timeout_s):
    raise RuntimeError(f"The client socket has failed to connect to {host}:{port}")


def test_no_store_to_reach_leaves_it_off():
    beat = Heartbeat("127.0.0.1", 1, 1, 2, interval=INTERVAL, connect=refused).start()
    assert not beat.running and beat.silent_ranks() is None and beat.host_of(0) is None
    beat.close()
    assert not Heartbeat("127.0.0.1", free_port(), 0, 1).start().running  # one process


@pytest.mark.parametrize("ranks, expected", [
    ([(3, "gpu-03")], "rank 3 on gpu-03"),
    ([(0, None)], "rank 0"),
    ([(0, "a"), (5, "b"), (6, "b")], "ranks 0, 5, 6 on a, b"),
    ([(r, "n") for r in range(10)], "ranks 0, 1, 2, 3, 4, 5, 6, 7 and 2 more on n"),
])
def test_names(ranks, expected):
    assert name_ranks(ranks) == expected


FROZEN_STORE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    sys.path.insert(0, {root!r})
    from megatron.parallel.heartbeat import Heartbeat
    server = subprocess.Popen([sys.executable, "-c", "import datetime, time, torch.distributed "
                               "as d; s = d.TCPStore('127.0.0.1', {port}, is_master=True, "
                               "wait_for_workers=False); print('up', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE)
    server.stdout.readline()
    beat = Heartbeat("127.0.0.1", {port}, 1, 4, interval=0.2).start()
    assert beat.running
    server.send_signal(signal.SIGSTOP)  # rank 0, which holds the store, freezes
    start = time.time()
    print(beat.silent_ranks(), round(time.time() - start), beat.stuck(), flush=True)
    beat.exit_quietly(2)
    beat.close()
    server.kill()  # the frozen store's connections break while this process ends
    sys.exit(2)
""")


@pytest.mark.slow
def test_a_frozen_store_names_its_host_and_the_process_still_exits_with_its_status(tmp_path):
    script = tmp_path / "frozen_store.py"
    script.write_text(FROZEN_STORE.format(root=ROOT, port=free_port()))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    *silent, seconds, stuck = proc.stdout.split()
    assert " ".join(silent) == "[(0, None)]" and int(seconds) <= 10 and stuck == "True", \
        proc.stdout + proc.stderr
    assert proc.returncode == 2 and "terminate" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("error, line", [
    ("TIMEOUT", f"rank 1: no answer from rank 2 on {HOST} within --distributed-timeout-minutes "
                f"10 (a frozen or stuck process or node); stopped"),
    ("REMOTE_ERROR", f"rank 1: another rank reported an NCCL failure (rank 2 on {HOST} stopped "
                     f"answering); stopped"),
])
def test_the_nccl_watch_names_the_silent_rank_and_ends_this_one_first(store_port, capsys, error,
                                                                      line):
    """NCCL's watchdog names no rank; the watch asks the heartbeat, and marks this rank ended
    before it exits, so the other waiting ranks do not name it."""
    import threading

    from torch._C._distributed_c10d import ErrorType

    from megatron.parallel.initialize import BackendFailureWatch
    from test_faults_training import _FakeGroup, _FakeNcclBackend

    world = beats(store_port, 3)
    exited = threading.Event()
    try:
        freeze(world[2])
        backend = _FakeNcclBackend()
        with BackendFailureWatch(10, rank=1, world_size=3, interval=0.01, heartbeat=world[1],
                                 exit=lambda code: exited.set()) as watch:
            watch.add([_FakeGroup(backend)])
            backend.error = getattr(ErrorType, error)
            assert exited.wait(10)
        assert capsys.readouterr().err == f"error: {line}\n"
        assert world[0].silent_ranks() == [(2, HOST)]  # rank 1 ended on its own
    finally:
        for beat in world:
            beat.close()


def test_the_store_host_keeps_the_store_until_the_others_have_read_it(store_port):
    """Rank 0 holds the store: stopping after a failed wait, it waits for every rank that is
    still beating to end on its own (a frozen one is not waited for), within a deadline."""
    import threading

    world = beats(store_port, 4)
    try:
        freeze(world[3])
        assert world[0].silent_ranks() == [(3, HOST)]
        stopped = threading.Event()
        threading.Thread(target=lambda: (world[0].stopping(), stopped.set()), daemon=True).start()
        assert not stopped.wait(1.0)  # ranks 1 and 2 still read
        world[1].stopping()  # not the store's host: returns at once
        assert not stopped.wait(0.5)
        world[2].stopping()
        assert stopped.wait(5.0)
        start = time.time()
        world[1].let_the_others_read(deadline=0.5)  # only the store's host waits
        assert time.time() - start < 0.2
    finally:
        for beat in world:
            beat.close()
