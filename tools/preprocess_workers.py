"""Worker processes for tools/preprocess_data.py: results in input order, no hangs.

``OrderedWorkers(n, init, initargs, work).imap(items, ahead)`` yields ``(item, work(item))``
for every item, in input order, computed in ``n`` forked processes. Unlike ``multiprocessing.Pool``:

* each worker has its own pipe and the parent waits on the pipes *and* the process sentinels
  together, so a worker that dies (killed, out of memory) is reported as an error naming it,
  never waited for forever;
* there is no shared task queue whose lock a killed process could hold: stopping kills the
  workers outright and cannot deadlock;
* an idle worker gets the next item as soon as it returns a result (one item per worker at a
  time, so neither side ever blocks sending while the other does), and at most ``ahead`` items
  are handed out beyond the oldest unfinished one, which bounds memory when one item is slow.
"""

import multiprocessing
import os
import signal
import traceback
from multiprocessing.connection import wait

from megatron.errors import UserError


class WorkerDied(UserError):
    """A worker process ended without returning its result (killed, out of memory)."""


class _Failure:
    """An exception raised in a worker, carried back to the parent."""

    def __init__(self, exc):
        self.user_error = exc if isinstance(exc, UserError) else None
        self.trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _worker_main(conn, others, init, initargs, work):
    for other in others:  # the parent's ends of the pipes: not ours to hold
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init(*initargs)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if item is None:
            return
        try:
            result = work(item)
        except Exception as exc:  # noqa: BLE001 -- reported by the parent
            result = _Failure(exc)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


def _describe_exit(exitcode):
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the out-of-memory killer sends this)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


class OrderedWorkers:
    """``n`` forked worker processes, each running ``init(*initargs)`` once, then ``work(item)``
    for the items ``imap`` hands it (``work`` must not return None)."""

    def __init__(self, n, init, initargs, work):
        ctx = multiprocessing.get_context("fork")
        self._conns, self._procs = [], []
        try:
            for _ in range(n):
                parent_end, child_end = ctx.Pipe(duplex=True)
                # The child closes the parent's ends it inherits (its own included): else a
                # worker would keep its pipe open itself and never see the parent die.
                proc = ctx.Process(target=_worker_main, daemon=True,
                                   args=(child_end, [*self._conns, parent_end], init,
                                         initargs, work))
                proc.start()
                child_end.close()
                self._conns.append(parent_end)
                self._procs.append(proc)
        except BaseException:
            self.kill()
            raise

    def imap(self, items, ahead, describe=repr):
        """``(item, result)`` for each of ``items``, in order; ``describe(item)`` names an
        item in error messages.

        A worker's UserError is raised again here as is; any other exception as a RuntimeError
        carrying the worker's traceback; a dead worker as ``WorkerDied``.
        """
        items = iter(items)
        ahead = max(ahead, len(self._procs))
        sent = {}  # item number -> item, handed out and not yet yielded
        done = {}  # item number -> result, waiting for the earlier ones
        busy = {}  # worker index -> item number it works on
        next_send = next_yield = 0
        exhausted = False
        while True:
            # Hand out work to idle workers, at most ``ahead`` items past the oldest pending.
            for w in range(len(self._procs)):
                if w in busy or exhausted or next_send - next_yield >= ahead:
                    continue
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                self._send(w, item, describe)
                sent[next_send], busy[w] = item, next_send
                next_send += 1
            while next_yield in done:
                result = done.pop(next_yield)
                item = sent.pop(next_yield)
                next_yield += 1
                yield item, result
            if exhausted and not busy:
                return
            if not busy:
                continue
            ready = wait([self._conns[w] for w in busy] +
                         [self._procs[w].sentinel for w in busy])
            for w in list(busy):
                conn, proc = self._conns[w], self._procs[w]
                if conn not in ready and proc.sentinel not in ready:
                    continue
                try:  # a dead worker's last result may still be in the pipe
                    result = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    result = None
                if result is None:
                    raise self._died(w, describe(sent[busy[w]]))
                if isinstance(result, _Failure):
                    if result.user_error is not None:
                        raise result.user_error
                    raise RuntimeError(f"worker {w} failed on {describe(sent[busy[w]])}:\n"
                                       f"{result.trace}")
                done[busy.pop(w)] = result

    def _send(self, w, item, describe):
        try:
            self._conns[w].send(item)
        except OSError:  # the worker died while idle
            raise self._died(w, describe(item)) from None

    def _died(self, w, what):
        proc = self._procs[w]
        proc.join()
        return WorkerDied(f"worker process {w} (pid {proc.pid}) {_describe_exit(proc.exitcode)} "
                          f"while encoding {what}; nothing was written")

    def close(self):
        """Stop the workers after their current item (normal end)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn in zip(self._procs, self._conns):
            proc.join()
            conn.close()
        self._procs, self._conns = [], []

    def kill(self):
        """Kill the workers now (error or interrupt); never blocks on them."""
        for proc in self._procs:
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc, conn in zip(self._procs, self._conns):
            proc.join()
            conn.close()
        self._procs, self._conns = [], []
