"""--exit-signal-handler: turn SIGTERM, --exit-signal and Ctrl-C into "save and exit 0".

SLURM sends SIGTERM before preemption and at the time limit (then SIGKILL after its
``KillWait``), and ``sbatch --signal=USR1@120`` sends another signal ahead of time. Killing the
run at once would lose everything since the last checkpoint, so the handler only *records* the
signal; the training loop asks at the end of each iteration whether any rank got one (one tiny
all-reduce, ``training.agree_on_exit``), and if so every rank saves a checkpoint and the program
exits 0. A signal that arrives during data loading, evaluation or a save is therefore handled at
the next iteration's end, never in the middle of a collective.

Ctrl-C (SIGINT) is graceful the same way the first time; a second Ctrl-C raises
``KeyboardInterrupt`` at once (the entry points print "interrupted" and exit 130) for a user who
does not want to wait for the iteration and the save.
"""

import contextlib
import gc
import multiprocessing
import signal
import time
from typing import Optional

from megatron.errors import UserError

_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def parse_exit_signal(name) -> signal.Signals:
    """``--exit-signal`` as a signal: ``SIGUSR1``, ``USR1`` (as ``sbatch --signal`` spells it)
    or a number."""
    text = str(name).strip()
    try:
        sig = signal.Signals(int(text)) if text.isdigit() else \
            signal.Signals[text.upper() if text.upper().startswith("SIG") else
                           "SIG" + text.upper()]
    except (KeyError, ValueError):
        raise UserError(f"--exit-signal {name}: not a signal name or number (e.g. SIGTERM, "
                        f"SIGUSR1, USR1, 10)") from None
    if sig in _UNCATCHABLE:
        raise UserError(f"--exit-signal {sig.name}: this signal cannot be caught; use SIGTERM "
                        f"or SIGUSR1 (sbatch --signal=USR1@120)")
    return sig


def exit_signals(args):
    """The signals --exit-signal-handler catches: SIGTERM, --exit-signal and SIGINT (None
    without the flag). Refuses the flag without --save: the point is the checkpoint."""
    if not getattr(args, "exit_signal_handler", False):
        return None
    if args.save is None:
        raise UserError("--exit-signal-handler: needs --save (the handler saves a checkpoint "
                        "before exiting)")
    chosen = parse_exit_signal(getattr(args, "exit_signal", "SIGTERM"))
    return tuple(dict.fromkeys((signal.SIGTERM, chosen, signal.SIGINT)))


_early = []  # the first signal ``hold_exit_signals_until_ready`` caught, if any


def hold_exit_signals_until_ready(argv):
    """Catch the --exit-signal-handler signals from the first line of an entry point, before
    torch's import and the set-up (seconds to minutes): a SLURM preemption signal that arrives
    then would otherwise kill the task with nothing saved and the job not requeued. The signal
    is kept and handed to ``DistributedSignalHandler`` when training starts (its first
    iteration's end then saves and exits). Does nothing without the flag; a bad --exit-signal
    is left to the real parse to report."""
    if "--exit-signal-handler" not in argv:
        return
    names = ["SIGTERM", "SIGINT"]
    for i, arg in enumerate(argv):
        if arg == "--exit-signal" and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("--exit-signal="):
            names.append(arg.split("=", 1)[1])
    for name in names:
        try:
            signal.signal(parse_exit_signal(name), _hold)
        except UserError:
            continue


def _hold(signum, frame):
    if not _early:
        _early.append(signal.Signals(signum))


class DistributedSignalHandler:
    """Context manager recording the first of ``signals`` this process receives.

    Megatron-LM's name. ``received`` is the recorded signal (None until one arrives); the
    training loop shares it across ranks. Previous handlers are restored on exit, so a test or
    a tool that calls ``pretrain`` twice in one process is left as it was.
    """

    def __init__(self, signals):
        self.signals = tuple(signals)
        self.received: Optional[signal.Signals] = None
        self._previous = {}

    def _handle(self, signum, frame):
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.received is None:
            self.received = sig

    @property
    def worker_init_fn(self):
        """For the DataLoader's workers (None without signals): a ``QuietWorkers``."""
        return QuietWorkers(self.signals) if self.signals else None

    def __enter__(self):
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            if _early and self.received is None and _early[0] in self.signals:
                self.received = _early[0]  # it came during start-up
            _early.clear()
        except ValueError:  # signal.signal outside the main thread
            self._restore()
            raise UserError("--exit-signal-handler: signal handlers can only be installed by "
                            "the main thread; call pretrain from it") from None
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class QuietWorkers:
    """``worker_init_fn`` for data loader workers that ignore ``signals``, which SLURM sends to
    every process of the step, so that the main process alone decides; torch's own SIGTERM
    handler in a worker would otherwise end it and fail the main process with "DataLoader
    worker ... is killed by signal".

    A worker only gets here once it runs, and a signal can come before (seen in CI: SIGTERM a
    few iterations in, to workers still starting on a loaded machine). So the loader starts its
    workers inside ``starting()``, with the signals blocked in the main thread: a forked (or
    spawned: exec keeps the mask) worker begins with them blocked and pending, and ``__call__``
    ignores them, which discards a pending one, before it unblocks them. The main process gets
    a signal that came meanwhile when ``starting()`` ends."""

    def __init__(self, signals):
        self.signals = tuple(signals)

    def __call__(self, worker_id=None):
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    @contextlib.contextmanager
    def starting(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end_data_workers(iterators, timeout=10.0):
    """Stop the data loader workers behind ``iterators`` (generators over DataLoaders) before
    the process exits.

    The workers ignore SIGTERM (``worker_init_fn``), and multiprocessing's exit handler ends
    daemonic children with SIGTERM and then joins them, so a worker still running at exit would
    keep the finished process alive (seen once under heavy load: the checkpoint was saved, the
    process never ended, and SLURM's requeue waits for its exit status). Closing the
    generators drops the DataLoader iterators, whose shutdown sends each worker its stop
    sentinel, joins it and takes its pid off torch's SIGCHLD watch; a worker still alive
    ``timeout`` seconds later is killed (nothing in it needs saving)."""
    for it in iterators:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    gc.collect()
    deadline = time.monotonic() + timeout
    for proc in multiprocessing.active_children():
        if proc.daemon:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
