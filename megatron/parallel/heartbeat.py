"""Which rank stopped: a heartbeat in the rendezvous store, read after a failed wait.

A timed-out collective does not say which member it waited on (gloo names no rank when there
are more than two, NCCL's watchdog names none), yet on a 64-GPU job the frozen rank and its node
are what the user needs. So every rank counts a key of its own up in the job's TCPStore once
every ``interval`` seconds, from a daemon thread on a store connection of its own (it beats
while the main thread waits in a collective: store calls release the GIL). After a failed wait,
``silent_ranks`` reads every rank's count twice, ``2.5 * interval`` apart: the ranks whose count
did not move are frozen (SIGSTOP, a swapped-out node) or gone. A rank that ends on its own (our
one-line stop, once its own reading is done, or the end of the run) says so and is not named; a
rank that never reached the store is not named either. The rank whose process holds the store
keeps it, a bounded while, until the others have read it (``stopping``).

torch's store calls have no deadline of their own once connected (an ``add`` on a frozen server
waits for good), so every read here runs on a helper thread with one. When the store does not
answer within it, its host is named: rank 0's process (torch's tcp:// rendezvous), or nobody
where torchrun's agent holds the store (TORCHELASTIC_USE_AGENT_STORE). A store that refuses or
drops the connection names nobody: its host may have stopped on its own. A thread left waiting
on a silent store would abort the process from C++ if the connection broke while Python shuts
down, so a stop with such a thread alive leaves by ``os._exit`` after flushing
(``exit_quietly``).

Keys live under ``megatron-ltd/heartbeat/``; torch's own keys are untouched. Everything is best
effort: without a store to reach at start the heartbeat stays off and the failure lines say
"a peer rank".
"""

import atexit
import datetime
import os
import socket
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

PREFIX = "megatron-ltd/heartbeat/"
STORE_DEADLINE_S = 5.0  # the longest a store read may take before the store counts as silent


def _connect(host: str, port: int, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


class _NoAnswer(Exception):
    """The store did not answer within the deadline (``silent``), or failed (its host's
    process ended: refused or reset connections)."""

    def __init__(self, message, silent):
        super().__init__(message)
        self.silent = silent


class Heartbeat:
    """``Heartbeat(addr, port, rank, world_size).start()`` once the process group is up;
    ``close()`` when the run ends (``run_pretraining``)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, interval: float = 2.0,
                 store_host_rank: Optional[int] = None,
                 connect: Callable[[str, int, float], object] = _connect):
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.interval = interval
        if store_host_rank is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            store_host_rank = 0
        self.store_host_rank = store_host_rank
        self._connect = connect
        self._store = None
        self._store_silent = False  # a read found the store not answering: ask it no more
        self._ended = False  # this rank told the store it stops on its own
        self._silent = set()  # the ranks the last ``silent_ranks`` found
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self._reads: List[threading.Thread] = []  # every store read's helper thread

    @property
    def running(self) -> bool:
        return self._store is not None

    def start(self) -> "Heartbeat":
        if self.world_size < 2 or self._store is not None:
            return self
        try:
            store = self._connect(self.host, self.port, STORE_DEADLINE_S)
            self._store = store
            self._call(lambda: (store.set(f"{PREFIX}host/{self.rank}", socket.gethostname()),
                                store.delete_key(f"{PREFIX}ended/{self.rank}"),  # a run before
                                store.add(f"{PREFIX}beat/{self.rank}", 1)))
        except (RuntimeError, OSError, ValueError, _NoAnswer):
            self._store = None  # no store to beat in: the failure lines say "a peer rank"
            return self
        self._beat = threading.Thread(target=self._run, name="megatron-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _run(self):
        key = f"{PREFIX}beat/{self.rank}"
        while not self._stop.wait(self.interval):
            try:
                self._store.add(key, 1)
            except (RuntimeError, OSError):
                pass  # the store is slow or gone; the next beat tries again

    def _call(self, read, deadline: float = STORE_DEADLINE_S):
        """``read()`` on a helper thread, its result within ``deadline`` seconds, else
        ``_NoAnswer``."""
        if self._store_silent:
            raise _NoAnswer("the store did not answer before", silent=True)
        result, failure = [], []

        def target():
            try:
                result.append(read())
            except (RuntimeError, OSError) as err:
                failure.append(err)

        thread = threading.Thread(target=target, name="megatron-heartbeat-read", daemon=True)
        self._reads = [t for t in self._reads if t.is_alive()] + [thread]
        thread.start()
        thread.join(deadline)
        if not result:
            self._store_silent = True
            raise _NoAnswer(failure[0] if failure else "no answer", silent=not failure)
        return result[0]

    def silent_ranks(self) -> Optional[List[Tuple[int, Optional[str]]]]:
        """The other ranks whose heartbeat stopped, with their hosts where known, in rank
        order; None where nothing can be said (no heartbeat, or a store nobody can name)."""
        if self._store is None:
            return None
        others = self._others()
        try:
            before = self._call(lambda: self._counts(others))
            time.sleep(2.5 * self.interval)
            after = self._call(lambda: self._counts(others))
            stopped = [r for r in others if before[r] == after[r]]
            named = self._call(lambda: [(r, self._host(r)) for r in stopped
                                        if not self._ended_on_its_own(r)])
        except _NoAnswer as no_answer:
            # a frozen store names its host; a closed one may be a host that stopped on its own
            if not no_answer.silent or self.store_host_rank in (None, self.rank):
                return None
            return [(self.store_host_rank, None)]
        # a rank that never told the store its host never beat: nothing to say about it
        self._silent = {r for r, host in named if host is not None}
        return [(r, host) for r, host in named if host is not None]

    def let_the_others_read(self, deadline: float = 4 * STORE_DEADLINE_S):
        """On the rank whose process holds the store, before it stops: wait (at most
        ``deadline`` seconds) until every other rank has ended on its own or is one this rank
        found silent, so that the store outlives their own reading of it."""
        if self._store is None or self.rank != self.store_host_rank:
            return
        waiting = [r for r in self._others() if r not in self._silent]
        end = time.time() + deadline
        while waiting and time.time() < end:
            try:
                waiting = self._call(lambda: [r for r in waiting
                                              if not self._ended_on_its_own(r)])
            except _NoAnswer:
                return
            time.sleep(0.2)

    def _others(self):
        return [r for r in range(self.world_size) if r != self.rank]

    def _ended_on_its_own(self, rank):
        return self._store.check([f"{PREFIX}ended/{rank}"])

    def host_of(self, rank: int) -> Optional[str]:
        """The host ``rank`` runs on, where it told the store."""
        if self._store is None:
            return None
        try:
            return self._call(lambda: self._host(rank))
        except _NoAnswer:
            return None

    def _host(self, rank):
        key = f"{PREFIX}host/{rank}"
        return self._store.get(key).decode(errors="replace") if self._store.check([key]) \
            else None

    def _counts(self, ranks):
        return {r: self._store.add(f"{PREFIX}beat/{r}", 0) for r in ranks}

    def mark_ended(self):
        """Tell the others that this rank stops on its own (it is not to be named), once its
        own reading is done: it beats until then."""
        if self._store is None or self._ended:
            return
        self._ended = True
        try:
            self._call(lambda: self._store.set(f"{PREFIX}ended/{self.rank}", "1"))
        except _NoAnswer:
            pass

    def stopping(self):
        """This rank stops on its own after a failed wait, its line found: tell the others,
        and where it holds the store, keep it for their reading."""
        self.mark_ended()
        self.let_the_others_read()

    def stuck(self) -> bool:
        """Whether a thread of ours still waits on the store (one that does not answer)."""
        return any(thread.is_alive() for thread in self._reads) \
            or (self._stop.is_set() and self._beat is not None and self._beat.is_alive())

    def exit_quietly(self, status: int):
        """For a rank about to stop with ``status``: if at interpreter exit a thread of ours
        still waits on a store that does not answer, end the process there with ``status``,
        before Python's shutdown (the thread would abort the process from C++ if its
        connection broke during it)."""
        def exit_if_stuck():
            if self.stuck():
                _exit_now(status)

        atexit.register(exit_if_stuck)

    def close(self):
        self._stop.set()
        if self._beat is not None and not self._store_silent:  # it ends at its next wake-up
            self._beat.join(timeout=2 * self.interval)
        self.mark_ended()


def _exit_now(status: int):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def name_ranks(ranks: List[Tuple[int, Optional[str]]], most: int = 8) -> str:
    """``rank 3 on gpu-03``, ``ranks 0, 5 on gpu-00, gpu-01``, at most ``most`` ranks listed."""
    shown = ranks[:most]
    more = f" and {len(ranks) - most} more" if len(ranks) > most else ""
    numbers = ", ".join(str(r) for r, _ in shown)
    hosts = dict.fromkeys(host for _, host in shown if host)  # in order, each once
    where = f" on {', '.join(hosts)}" if hosts else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {numbers}{more}{where}"
