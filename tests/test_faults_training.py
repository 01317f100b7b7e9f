"""Fault injection in the training loop (issue 12): exit signals save and exit 0 and resume
bitwise, a frozen peer ends every rank within --distributed-timeout-minutes, a non-finite loss
stops the run without saving it, bad data ends in one line, crafted index caches never run."""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.checkpointing import TRACKER_FILENAME, checkpoint_file, read_checkpoint_file
from megatron.dist_signal_handler import QuietWorkers
from megatron.errors import UserError
from megatron.training import pretrain
from training_helpers import ROOT, gpt_argv, launch_ranks, nccl_rank_env, run


def run_with_signal(argv, signum, when):
    """Train in this process; ``when(model)`` is asked before each micro-batch is fetched (a
    training or an evaluation one) and, where true, this process sends itself ``signum``: a
    signal arriving during data loading or evaluation."""
    def forward_step_provider(args, tokenizer):
        inner = pretrain_gpt.forward_step_provider(args, tokenizer)

        def forward_step(data_iterator, model, token_drop=None):
            if when(model):
                os.kill(os.getpid(), signum)
            return inner(data_iterator, model, token_drop)

        return forward_step

    provider = dataclasses.replace(pretrain_gpt.PROVIDER, forward_step=forward_step_provider)
    logs = []
    return pretrain(provider, argv=argv, log=logs.append), logs


def nth_call(n, training=True):
    """A ``when`` for ``run_with_signal``: true at the n-th training (or evaluation) fetch."""
    calls = []

    def when(model):
        if model.training == training:
            calls.append(1)
            return len(calls) == n
        return False

    return when


def latest(ckpt):
    with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
        return f.read()


def assert_same_run(full, first, second):
    """``first`` (stopped) then ``second`` (resumed) equal the uninterrupted ``full`` bitwise:
    every loss, the final weights."""
    resumed = list(first.train_losses) + list(second.train_losses)
    assert [i for i, _ in resumed] == [i for i, _ in full.train_losses]
    assert [d["lm loss"] for _, d in resumed] == [d["lm loss"] for _, d in full.train_losses]
    for (name, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# --exit-signal-handler


@pytest.fixture(scope="module")
def uninterrupted(data_prefix):
    return run(gpt_argv(data_prefix, iters=8))[0]


@pytest.mark.parametrize("signum,when,stops_at", [
    (signal.SIGTERM, nth_call(5), 3),                 # while fetching iteration 3's batch
    (signal.SIGUSR1, nth_call(1, training=False), 4),  # during the evaluation at iteration 4
    (signal.SIGINT, nth_call(2), 1),                  # one Ctrl-C: graceful
], ids=["sigterm-data-loading", "sigusr1-evaluation", "sigint-once"])
def test_exit_signal_saves_exits_and_resumes_bitwise(data_prefix, tmp_path, uninterrupted,
                                                     signum, when, stops_at):
    ckpt = str(tmp_path / "ckpt")
    flags = ["--exit-signal-handler", "--exit-signal", "SIGUSR1", "--save", ckpt]
    before = signal.getsignal(signum)
    first, logs = run_with_signal(gpt_argv(data_prefix, *flags, iters=8), signum, when)
    assert signal.getsignal(signum) is before  # the handler is removed again
    assert first.state.iteration == stops_at
    assert latest(ckpt) == str(stops_at)
    exits = [line for line in logs if line.startswith("exiting at iteration")]
    assert exits == [f"exiting at iteration {stops_at}: received {signal.Signals(signum).name} "
                     f"(--exit-signal-handler); saving a checkpoint"]
    second, _ = run(gpt_argv(data_prefix, "--load", ckpt, "--save", ckpt, iters=8))
    assert_same_run(uninterrupted, first, second)


def test_second_ctrl_c_stops_at_once(data_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    calls = []

    def twice(model):  # two Ctrl-C while fetching iteration 2's first batch
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return len(calls) == 3

    with pytest.raises(KeyboardInterrupt):
        run_with_signal(gpt_argv(data_prefix, "--exit-signal-handler", "--save", ckpt,
                                 iters=8), signal.SIGINT, twice)
    assert not os.path.exists(os.path.join(ckpt, TRACKER_FILENAME))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_the_flag_a_signal_keeps_its_default(data_prefix, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_with_signal(gpt_argv(data_prefix, iters=8), signal.SIGINT, nth_call(3))


@pytest.mark.parametrize("flags,needle", [
    (["--exit-signal-handler"], "--exit-signal-handler: needs --save"),
    (["--exit-signal-handler", "--save", "x", "--exit-signal", "SIGKILL"],
     "--exit-signal SIGKILL: this signal cannot be caught"),
    (["--exit-signal-handler", "--save", "x", "--exit-signal", "USR9"],
     "--exit-signal USR9: not a signal name"),
])
def test_exit_signal_flags_are_checked(data_prefix, flags, needle):
    with pytest.raises(UserError, match=needle):
        run(gpt_argv(data_prefix, *flags))


def test_exit_signal_spellings():
    from megatron.dist_signal_handler import parse_exit_signal

    assert {parse_exit_signal(s) for s in ("SIGUSR1", "USR1", "usr1",
                                           str(int(signal.SIGUSR1)))} == {signal.SIGUSR1}


def _cli(*argv, **kwargs):
    """pretrain_gpt.py in its own session (process group), as a job step runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "pretrain_gpt.py", *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kwargs)


def _wait_for_line(proc, prefix, timeout=120):
    """Read ``proc``'s stdout until a line starting with ``prefix``; the lines read."""
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r}:\n{''.join(lines)}")


@pytest.mark.slow
def test_sigterm_from_outside_saves_exits_0_and_resumes_to_the_same_weights(data_prefix,
                                                                             tmp_path):
    """As SLURM does it: SIGTERM to every process of a running pretrain_gpt.py (its data
    loader workers too) mid-run."""
    ckpt = str(tmp_path / "ckpt")
    argv = gpt_argv(data_prefix, "--log-interval", "1", "--num-workers", "2", iters=30)
    proc = _cli(*argv, "--exit-signal-handler", "--save", ckpt)
    try:
        _wait_for_line(proc, " iteration        2/")
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    exits = [line for line in out.splitlines() if line.startswith("exiting at iteration")]
    assert len(exits) == 1 and "received SIGTERM (--exit-signal-handler)" in exits[0], out
    stopped_at = int(exits[0].split()[3].rstrip(":"))
    assert 2 <= stopped_at < 30 and latest(ckpt) == str(stopped_at)
    reference = str(tmp_path / "reference")
    for extra in (["--load", ckpt, "--save", ckpt], ["--save", reference]):
        finished = _cli(*argv, *extra)  # the same environment (threads) as the stopped run
        _, err = finished.communicate(timeout=300)
        assert finished.returncode == 0, err[-3000:]
    _assert_nested_equal(read_checkpoint_file(checkpoint_file(reference, 30))["model"],
                         read_checkpoint_file(checkpoint_file(ckpt, 30))["model"])


def _catches(pid, sig):
    """Whether process ``pid`` has a handler for ``sig`` (/proc's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
def test_signal_during_start_up_is_kept_until_training_starts(data_prefix, tmp_path):
    """SLURM may preempt a job seconds after it starts, while the task still imports torch and
    builds its data: the signal is held from the entry point's first lines and acted on at the
    first iteration's end (save, exit 0), not the default action (killed, nothing saved)."""
    ckpt = str(tmp_path / "ckpt")
    proc = _cli(*gpt_argv(data_prefix, iters=30), "--exit-signal-handler", "--exit-signal",
                "SIGUSR1", "--save", ckpt)
    try:
        deadline = time.time() + 60
        while not _catches(proc.pid, signal.SIGUSR1) and time.time() < deadline:
            time.sleep(0.002)
        with open(f"/proc/{proc.pid}/maps") as f:
            before_torch = "libtorch" not in f.read()
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert before_torch  # the signal came during start-up, not once training had begun
    assert proc.returncode == 0, err[-3000:]
    assert "exiting at iteration 1: received SIGUSR1 (--exit-signal-handler)" in out, out
    assert latest(ckpt) == "1"


class _SignalledBeforeSetUp(QuietWorkers):
    """A worker that gets the job's SIGTERM before it has set itself up (what CI saw once: a
    loaded machine, workers still starting when the signal came)."""

    def __call__(self, worker_id=None):
        os.kill(os.getpid(), signal.SIGTERM)
        super().__call__(worker_id)


def _loader(worker_init_fn):
    from megatron.data.samplers import build_pretraining_data_loader

    data = [{"text": np.arange(4)} for _ in range(16)]
    return build_pretraining_data_loader(data, 0, 2, dp_rank=0, dp_size=1, num_workers=2,
                                         worker_init_fn=worker_init_fn)


@pytest.mark.parametrize("protected", [True, False])
def test_a_worker_signalled_before_its_set_up_lives_on(protected):
    from megatron.dist_signal_handler import DistributedSignalHandler

    quiet = _SignalledBeforeSetUp([signal.SIGTERM])
    if not protected:  # as before: nothing blocked while the workers start
        quiet.starting = None
    with DistributedSignalHandler([signal.SIGTERM]) as handler:
        if not protected:
            with pytest.raises(RuntimeError, match="DataLoader worker"):
                list(_loader(quiet))
            return
        batches = list(_loader(quiet))
    assert len(batches) == 8 and handler.received is None
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the main mask is restored


def test_a_signal_while_workers_start_still_reaches_the_main_process():
    """Blocked in the main thread while it forks; delivered then, or at once through another
    thread of the process (pytest's, torch's), never lost."""
    from megatron.dist_signal_handler import DistributedSignalHandler

    quiet = QuietWorkers([signal.SIGTERM])
    with DistributedSignalHandler([signal.SIGTERM]) as handler:
        with quiet.starting():
            os.kill(os.getpid(), signal.SIGTERM)
        assert handler.received == signal.SIGTERM
        assert len(list(_loader(quiet))) == 8


def _assert_nested_equal(a, b, where="model"):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for key in a:
            _assert_nested_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------
# --check-for-nan-in-loss-and-grad, --max-consecutive-skipped


def saved_iterations(ckpt):
    return sorted(int(name[len("iter_"):]) for name in os.listdir(ckpt)
                  if name.startswith("iter_"))


@pytest.mark.slow
def test_nan_loss_from_a_huge_lr_stops_before_any_save_of_it(data_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = gpt_argv(data_prefix, "--lr", "1e10", "--save", ckpt, "--save-interval", "1",
                    iters=20)
    with pytest.raises(UserError, match=r"^iteration 3: not finite: lm loss nan.*"
                                        r"--check-for-nan-in-loss-and-grad"):
        run(argv)
    assert latest(ckpt) == "2" and saved_iterations(ckpt) == [1, 2]
    good = read_checkpoint_file(checkpoint_file(ckpt, 2))["model"]
    assert all(torch.isfinite(t).all() for t in _tensors(good))
    proc = _cli(*argv, "--save", str(tmp_path / "cli"))  # as a user sees it
    status, line = one_line_error(proc, timeout=300)
    assert status == 2 and line.startswith("error: iteration 3: not finite: lm loss nan")
    assert latest(str(tmp_path / "cli")) == "2"
    # Megatron's --no-check-for-nan-in-loss-and-grad keeps the old behaviour: it trains on
    stray, _ = run(gpt_argv(data_prefix, "--lr", "1e10", "--no-check-for-nan-in-loss-and-grad",
                            iters=4))
    assert stray.state.iteration == 4 and stray.state.nan_iters >= 1


@pytest.mark.slow
def test_nan_parameters_are_never_saved(data_prefix, tmp_path):
    """fp16 with a huge LR: the scaler skips the NaN losses, but the half-precision weights
    overflow to inf; the save that would make them ``latest`` is refused."""
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"the model's parameters are not finite; not saving"):
        run(gpt_argv(data_prefix, "--fp16", "--lr", "1e10", "--save", ckpt,
                     "--save-interval", "1", iters=30))
    last = int(latest(ckpt))
    assert saved_iterations(ckpt)[-1] == last
    good = read_checkpoint_file(checkpoint_file(ckpt, last))["model"]
    assert all(torch.isfinite(t).all() for t in _tensors(good))


def test_fp16_skipping_every_step_stops_after_max_consecutive_skipped(data_prefix):
    with pytest.raises(UserError, match=r"^iteration 3: the fp16 loss scaler skipped 3 steps "
                                        r"in a row \(--max-consecutive-skipped 3\)"):
        run(gpt_argv(data_prefix, "--fp16", "--initial-loss-scale", "1e30",
                     "--max-consecutive-skipped", "3", iters=8))


def _tensors(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, torch.Tensor):
        yield tree


# ---------------------------------------------------------------------------------------------
# --distributed-timeout-minutes: a frozen or dead peer ends the other ranks in one line


def one_line_error(proc, timeout):
    """Wait for ``proc``; its exit status and its one error line, the last on stderr (torch's
    start-up warnings may come before it; no traceback)."""
    _, err = proc.communicate(timeout=timeout)
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_frozen_or_dead_peer_ends_the_other_rank_in_one_line(data_prefix, fault):
    """SIGSTOP (a frozen process, a stuck kernel, a swapped-out node) of rank 1 under
    --distributed-timeout-minutes 1: rank 0 ends within the minute and a little, naming the
    timeout and rank 1; SIGKILL (a dead process): rank 0 ends at once, naming rank 1."""
    argv = gpt_argv(data_prefix, "--log-interval", "1", "--eval-interval", "1000",
                    "--distributed-timeout-minutes", "1", iters=100000)
    procs = launch_ranks(argv)
    try:
        _wait_for_line(procs[0], " iteration        3/")
        procs[1].send_signal(getattr(signal, fault))
        start = time.time()
        status, line = one_line_error(procs[0], timeout=180)
        waited = time.time() - start
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert status == 2
    if fault == "SIGSTOP":
        assert 55 < waited < 150, waited
        assert line == (f"error: rank 0: no answer from rank 1 on {socket.gethostname()} "
                        f"within --distributed-timeout-minutes 1 (a frozen or stuck process or "
                        f"node); stopped")
    else:
        assert waited < 30, waited
        assert line == (f"error: rank 0: lost the connection to rank 1 on "
                        f"{socket.gethostname()} (its process ended or its node went away); "
                        f"stopped")


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [0, 2])
def test_a_frozen_rank_of_four_is_named_by_every_other_rank(data_prefix, frozen):
    """4 gloo ranks, 2 pipeline stages x 2 data-parallel replicas, one rank frozen: rank 0
    (which holds the rendezvous store) or rank 2 (stage 1 of replica 0). Whether a rank waited
    on the frozen one directly or on a rank that gave up on it (gloo's "Application timeout
    caused pair closure", once a traceback), each ends in one line naming the frozen rank, with
    its host where the store still answers, exit status 2, within the timeout and a little.
    gloo itself names no rank among four: the heartbeat (megatron/parallel/heartbeat.py) does."""
    argv = gpt_argv(data_prefix, "--log-interval", "1", "--eval-interval", "1000",
                    "--pipeline-model-parallel-size", "2", "--global-batch-size", "8",
                    "--distributed-timeout-minutes", "0.5", iters=100000)
    procs = launch_ranks(argv, world_size=4)
    try:
        _wait_for_line(procs[0], " iteration        3/")
        procs[frozen].send_signal(signal.SIGSTOP)
        start = time.time()
        ends = {rank: (*one_line_error(procs[rank], timeout=180), time.time() - start)
                for rank in range(4) if rank != frozen}
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    who = "rank 0" if frozen == 0 else f"rank {frozen} on {socket.gethostname()}"
    for rank, (status, line, waited) in ends.items():
        # a rank that waited on one that gave up first reads a closed connection
        assert status == 2 and line in (
            f"error: rank {rank}: no answer from {who} within --distributed-timeout-minutes 0.5 "
            f"(a frozen or stuck process or node); stopped",
            f"error: rank {rank}: lost a connection: {who} stopped answering (its process "
            f"ended or froze, or its node went away); stopped"), ends
        assert 25 < waited < 120, ends


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL)")
def test_a_frozen_peer_under_nccl_ends_the_other_rank_in_one_line(data_prefix):
    """The NCCL half: rank 1 frozen (SIGSTOP) under --distributed-timeout-minutes 0.5. torch's
    watchdog finds the timed-out collective on its own thread and would abort the process from
    C++ a minute later; the BackendFailureWatch ends rank 0 first, with exit status 2 and our
    line last on stderr (torch's own log lines come before it).

    With one GPU both ranks share it (``nccl_rank_env``)."""
    argv = gpt_argv(data_prefix, "--device", "cuda", "--log-interval", "1",
                    "--eval-interval", "1000", "--distributed-timeout-minutes", "0.5",
                    iters=100000)
    procs = launch_ranks(argv, rank_env=nccl_rank_env(2))
    try:
        try:
            _wait_for_line(procs[0], " iteration        3/", timeout=300)
        except AssertionError as no_start:  # e.g. NCCL refusing the set-up: show why
            procs[0].kill()
            raise AssertionError(f"{no_start}\nrank 0's stderr:\n"
                                 f"{procs[0].communicate()[1][-3000:]}") from None
        procs[1].send_signal(signal.SIGSTOP)
        start = time.time()
        _, err = procs[0].communicate(timeout=240)
        waited = time.time() - start
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: rank 0: no answer from rank 1 on {socket.gethostname()} within "
        f"--distributed-timeout-minutes 0.5 (a frozen or stuck process or node); stopped"), \
        err[-3000:]
    assert 25 < waited < 30 + 45, waited  # before torch's own abort, a minute after the timeout


# ---------------------------------------------------------------------------------------------
# Index caches never run code; bad data ends in one line


class _WritesMarker:
    """Unpickling this runs ``open(path, 'w')``: the marker appears if a loader unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _plant(path, payload, as_npy):
    if as_npy:  # an object-dtype .npy: numpy unpickles its body when allow_pickle=True
        array = np.empty(1, dtype=object)
        array[0] = payload
        np.save(path, array, allow_pickle=True)
    else:  # a bare pickle: np.load falls back to pickle.load when allow_pickle=True
        import pickle

        with open(path, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("as_npy", [False, True], ids=["pickle", "object-npy"])
def test_a_planted_index_cache_is_refused_and_never_run(tmp_path, as_npy):
    from training_helpers import make_corpus

    prefix = make_corpus(tmp_path)
    run(gpt_argv(prefix, iters=2))  # builds the index cache
    caches = sorted((tmp_path / "index-cache").glob("*_shuffle_idx.npy"))
    assert caches
    marker = tmp_path / "code-ran"
    probe = tmp_path / "probe.npy"
    _plant(str(probe), _WritesMarker(str(marker)), as_npy)
    np.load(str(probe), allow_pickle=True)  # the payload is live: it runs where unpickled
    assert marker.exists()
    marker.unlink()
    for cache in caches:
        _plant(str(cache), _WritesMarker(str(marker)), as_npy)
    with pytest.raises(UserError) as err:
        run(gpt_argv(prefix, iters=2))
    assert any(str(err.value).startswith(f"{cache}: ") for cache in caches), err.value
    assert "delete it to rebuild" in str(err.value)
    assert not marker.exists()


def _dataset(path, docs, dtype=np.uint16):
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(str(path) + ".idx")
    return str(path)


def test_token_ids_beyond_the_vocabulary_name_the_dataset(data_prefix, tmp_path):
    """Data preprocessed with a larger vocabulary: one line naming the dataset when the batch
    is built (also as a member of a blend), not an IndexError in the embedding."""
    foreign = _dataset(tmp_path / "foreign_text_document",
                       [np.arange(60000, 60100) for _ in range(50)])
    for data_path in ([foreign], ["1", data_prefix, "1", foreign]):
        with pytest.raises(UserError) as err:
            run(gpt_argv(data_prefix, "--data-path", *data_path, "--num-workers", "1",
                         iters=20))
        message = str(err.value)
        assert message.startswith(f"{foreign}: token id 6") and "[0, 1536)" in message, message


@pytest.mark.slow
def test_empty_training_split_and_empty_dataset_say_which(data_prefix, tmp_path):
    with pytest.raises(UserError, match=r"^--split 0,100,0: the training split of --data-path "
                                        r"gets no documents"):
        run(gpt_argv(data_prefix, "--split", "0,100,0"))
    empty = _dataset(tmp_path / "empty_text_document", [])
    with pytest.raises(UserError, match=f"^--data-path: {empty} holds no documents"):
        run(gpt_argv(empty))
    hollow = _dataset(tmp_path / "hollow_text_document", [[] for _ in range(5)])
    with pytest.raises(UserError, match=f"^{hollow}: the train split has 5 document\\(s\\) "
                                        f"with 0 tokens"):
        run(gpt_argv(hollow))
    # evaluation only needs no training split
    result, _ = run(gpt_argv(data_prefix, "--split", "0,100,0", "--skip-train"))
    assert result.state.iteration == 0


@pytest.mark.slow
def test_a_signal_to_one_rank_saves_on_every_rank_and_both_exit_0(data_prefix, tmp_path):
    """SIGUSR1 (sbatch --signal) to rank 1 only: the ranks agree at the iteration's end, both
    save that iteration and exit 0; the pair resumes from it."""
    ckpt = str(tmp_path / "ckpt")
    argv = gpt_argv(data_prefix, "--log-interval", "1", "--eval-interval", "1000",
                    "--distributed-timeout-minutes", "1", "--save", ckpt, iters=40)
    procs = launch_ranks([*argv, "--exit-signal-handler", "--exit-signal", "SIGUSR1"])
    try:
        _wait_for_line(procs[0], " iteration        2/")
        procs[1].send_signal(signal.SIGUSR1)
        outs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
    exits = [line for line in outs[0][0].splitlines() if line.startswith("exiting at")]
    assert len(exits) == 1 and "received SIGUSR1" in exits[0], outs[0][0][-2000:]
    stopped_at = int(exits[0].split()[3].rstrip(":"))
    assert 2 <= stopped_at < 40 and latest(ckpt) == str(stopped_at)
    resumed = launch_ranks([*argv, "--load", ckpt])
    try:
        outs = [proc.communicate(timeout=300) for proc in resumed]
    finally:
        for proc in resumed:
            proc.kill()
    assert [proc.returncode for proc in resumed] == [0, 0], [err[-2000:] for _, err in outs]
    assert latest(ckpt) == "40"


def test_a_failed_point_to_point_wait_names_its_peer():
    from megatron.parallel.initialize import PeerWaitError, communication_failure
    from megatron.parallel.p2p import _wait_all

    class Op:
        def __init__(self, peer):
            self.peer = peer

    class Request:
        def __init__(self, error=None):
            self.error = error

        def wait(self):
            if self.error:
                raise RuntimeError(self.error)

    gloo_timeout = ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                    "waiting 60000ms for recv operation to complete")
    with pytest.raises(PeerWaitError) as err:
        _wait_all([Op(3), Op(5)], [Request(), Request(gloo_timeout)])
    assert err.value.peer == 5
    assert communication_failure(err.value, 1, rank=4, world_size=8) == (
        "rank 4: no answer from rank 5 within --distributed-timeout-minutes 1 (a frozen or "
        "stuck process or node); stopped")
    # a collective does not say whom it waited on, unless only one other rank exists
    assert "from a peer rank" in communication_failure(RuntimeError(gloo_timeout), 10, 0, 8)
    assert communication_failure(RuntimeError("shape mismatch in timed out op"), 10, 0, 2) \
        is None  # not torch.distributed's: keeps its traceback
    # a third rank reading a connection that a timed-out rank closed (gloo's bare text)
    assert communication_failure(RuntimeError("Application timeout caused pair closure"), 1,
                                 rank=3, world_size=4) == (
        "rank 3: no answer from a peer rank within --distributed-timeout-minutes 1 (a frozen or "
        "stuck process or node); stopped")


def test_nccl_watchdog_errors_are_one_line():
    """The texts torch's ProcessGroupNCCL raises when its watchdog times a collective out (and,
    with TORCH_NCCL_ASYNC_ERROR_HANDLING=2, when a later call meets the aborted communicator)
    become our one line. Only the classification: no GPU has run the NCCL path here."""
    import torch.distributed as dist

    from megatron.parallel.initialize import communication_failure

    watchdog = ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
                "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=60000) ran for 60006 "
                "milliseconds before timing out.")
    aborted = ("NCCL communicator was aborted on rank 1. Original reason for failure was: "
               + watchdog)
    error_type = getattr(dist, "DistBackendError", RuntimeError)
    for text in (watchdog, aborted):
        assert communication_failure(error_type(text), 1, rank=1, world_size=4) == (
            "rank 1: no answer from a peer rank within --distributed-timeout-minutes 1 (a frozen "
            "or stuck process or node); stopped")
    # a collective that meets a peer's ended process (the detail line is torch 2.13's own text)
    remote = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, "
              "remote process exited or there was a network error, NCCL version 2.27.5\n"
              "ncclRemoteError: A call failed possibly due to a network error or a remote "
              "process exiting prematurely.")
    assert communication_failure(error_type(remote), 1, rank=0, world_size=2) == (
        "rank 0: lost the connection to rank 1 (its process ended or its node went away); "
        "stopped")


# ---------------------------------------------------------------------------------------------
# BackendFailureWatch: an NCCL failure found on torch's watchdog thread becomes our one line


class _FakeNcclBackend:
    """What the watch reads of a ProcessGroupNCCL: ``get_error()``."""

    def __init__(self):
        from torch._C._distributed_c10d import ErrorType

        self.error = ErrorType.SUCCESS

    def get_error(self):
        return self.error


class _FakeGroup:
    def __init__(self, backend):
        self.backend = backend

    def _get_backend(self, device):
        assert device.type == "cuda"
        return self.backend


_WATCH_SCRIPT = """
import sys, threading, time
from torch._C._distributed_c10d import ErrorType
sys.path.insert(0, sys.argv[1])
from test_faults_training import _FakeGroup, _FakeNcclBackend
from megatron.parallel.initialize import BackendFailureWatch

backend = _FakeNcclBackend()
watch = BackendFailureWatch(0.5, rank=0, world_size=2, interval=0.05)
assert watch.add([_FakeGroup(backend), None]) == 1
print("iteration 3", flush=True)
threading.Timer(0.3, setattr, (backend, "error", ErrorType.TIMEOUT)).start()
time.sleep(120)  # the main thread blocked in C++, as in a CUDA synchronisation
print("not reached", flush=True)
"""


def test_the_watch_ends_a_process_whose_main_thread_is_blocked(tmp_path):
    """The main thread never returns from its wait (as a CUDA synchronisation behind a frozen
    peer's collective); when the backend reports the timeout the process ends within moments,
    status 2, our line last on stderr, what was printed before kept."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _WATCH_SCRIPT, os.path.dirname(__file__)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert time.time() - start < 30
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "iteration 3\n"
    assert proc.stderr.strip().splitlines() == [
        "error: rank 0: no answer from rank 1 within --distributed-timeout-minutes 0.5 (a "
        "frozen or stuck process or node); stopped"]


@pytest.mark.parametrize("error,line", [
    ("TIMEOUT", "rank 2: no answer from a peer rank within --distributed-timeout-minutes 10 (a "
                "frozen or stuck process or node); stopped"),
    ("COMM_ERROR", "rank 2: NCCL reported a communication error with a peer rank (a process "
                   "ended, or a GPU or network link failed); stopped"),
    ("REMOTE_ERROR", "rank 2: another rank reported an NCCL failure; stopped"),
], ids=["timeout", "comm-error", "remote-error"])
def test_the_watch_names_each_nccl_failure(capsys, error, line):
    import threading

    from torch._C._distributed_c10d import ErrorType

    from megatron.parallel.initialize import BackendFailureWatch

    healthy, failing = _FakeNcclBackend(), _FakeNcclBackend()
    exited = threading.Event()
    codes = []

    def exit(code):
        codes.append(code)
        exited.set()

    with BackendFailureWatch(10, rank=2, world_size=4, interval=0.01, exit=exit) as watch:
        group = _FakeGroup(failing)
        assert watch.add([_FakeGroup(healthy), group, group]) == 2  # each backend once
        assert not exited.wait(0.1)  # healthy: nothing happens
        failing.error = getattr(ErrorType, error)
        assert exited.wait(10)
    assert codes == [2]
    assert capsys.readouterr().err == f"error: {line}\n"


@pytest.mark.parametrize("handling", ["0", "2"])
def test_the_watch_stays_off_where_nccl_leaves_the_process_alive(monkeypatch, handling):
    """TORCH_NCCL_ASYNC_ERROR_HANDLING 0 or 2: NCCL does not tear the process down (the caller
    handles errors, and a call on the aborted communicator raises in Python): no thread."""
    from megatron.parallel.initialize import BackendFailureWatch

    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", handling)
    backend = _FakeNcclBackend()
    with BackendFailureWatch(10, 0, 2, interval=0.01,
                             exit=lambda code: pytest.fail("exited")) as watch:
        assert watch.add([_FakeGroup(backend)]) == 1
        assert watch._thread is None


def test_gloo_groups_are_not_watched():
    """gloo's waits raise in the calling thread (communication_failure reads them); its backend
    has no error state to poll, so a gloo run starts no watch thread."""
    import datetime

    import torch.distributed as dist

    from megatron.parallel.initialize import BackendFailureWatch

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0], timeout=datetime.timedelta(seconds=30))
        with BackendFailureWatch(10, 0, 1) as watch:
            assert watch.add([dist.group.WORLD, group]) == 0
            assert watch._thread is None
    finally:
        if started_here:
            dist.destroy_process_group()


def test_a_store_key_a_frozen_peer_never_set_is_a_timeout():
    """NCCL's communicator set-up reads its unique id from the store: a peer frozen before
    setting it ends the wait with the store's "wait timeout after ...ms", the timeout line."""
    import datetime

    import torch.distributed as dist

    from distributed_harness import free_port
    from megatron.parallel.initialize import communication_failure

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True,
                          timeout=datetime.timedelta(milliseconds=200))
    with pytest.raises(dist.DistStoreError) as err:
        store.get("nccl-unique-id")
    assert communication_failure(err.value, 1, rank=0, world_size=2) == (
        "rank 0: no answer from rank 1 within --distributed-timeout-minutes 1 (a frozen or "
        "stuck process or node); stopped")


def test_the_default_backend_follows_the_device(monkeypatch):
    """--distributed-backend's default: nccl for a GPU run, gloo for --device cpu even where a
    GPU is visible (NCCL cannot move CPU tensors)."""
    from megatron.initialize import default_distributed_backend

    monkeypatch.delenv("MEGATRON_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_distributed_backend(None) == "nccl"
    assert default_distributed_backend("cuda:1") == "nccl"
    assert default_distributed_backend("cpu") == "gloo"
    monkeypatch.setenv("MEGATRON_DEVICE", "cpu")
    assert default_distributed_backend(None) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MEGATRON_DEVICE")
    assert default_distributed_backend(None) == "gloo"
