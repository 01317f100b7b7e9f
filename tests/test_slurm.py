"""Preemption under SLURM (issue 12): nothing lost, the requeued job ends where an
uninterrupted one does.

The protocol of ``examples/run_slurm.sbatch`` with srun and scontrol stubbed (fast): SIGUSR1 to
the batch shell reaches srun and is followed by ``scontrol requeue`` only after an exit 0 with
``--load`` = ``--save``; a finish, a failure, SIGTERM, ``REQUEUE=0``, another ``--load`` or no
``--save`` never requeue; SIGINT reaches the tasks as SIGUSR1; the flags it adds; the recipe
scripts, which exec it, take the signal the same way.

Then a real SLURM (slow): ``tests/slurm/setup_local_slurm.sh`` brings up a one-node cluster on
this machine (Debian's slurm-wlm daemons and a private munged, with their own configuration,
ports and state; the packages are installed with apt-get when missing). Each test submits
``examples/run_slurm.sbatch pretrain_gpt.py ...`` with sbatch as 2 tasks on one node (gloo on
CPU, DP 2), exactly as a user submits it; the script adds ``--exit-signal-handler --exit-signal
SIGUSR1``.

- SIGUSR1 to the batch shell mid-run (``scancel --signal=USR1 --batch``: what
  ``#SBATCH --signal=B:USR1@300`` sends before the time limit): every rank saves at the end of
  its iteration and exits 0, the script requeues the job, the same job id runs again from the
  checkpoint, and its losses at every iteration and its final checkpoint (weights, optimizer,
  RNG, counters) equal those of an uninterrupted job.
- SIGTERM to the whole job (``scancel``; SLURM does the same at the time limit and at a
  preemption): the tasks save before SLURM's KillWait ends, the batch shell waits for them, and
  the cancelled job is not requeued.

Where the daemons cannot start (not root and SLURM not installed, no apt-get, a container that
forbids them) these skip with the setup script's one-line reason, which pytest's ``-ra``
summary prints.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from distributed_harness import free_port
from megatron.checkpointing import TRACKER_FILENAME, checkpoint_file, read_checkpoint_file
from test_examples import _clean_env, _fake_bert_pile, _fake_pile, _stub
from training_helpers import ROOT, gpt_argv

SCRIPT = os.path.join(ROOT, "examples", "run_slurm.sbatch")
SETUP = os.path.join(ROOT, "tests", "slurm", "setup_local_slurm.sh")
ITERS = 500        # ~15 ms each here: the signal lands well inside the run
SIGNAL_AFTER = 20  # iterations logged before the signal is sent
ITERATION = re.compile(r"^ iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: (\S+) \|", re.M)


# -- the script's side, srun and scontrol stubbed ---------------------------------------------

# srun: records its argv, "started", and then "USR1" (exit STUB_SIGNAL_STATUS) when signalled,
# or "finished" (exit 0) after STUB_SECONDS.
SRUN_STUB = """printf '%s\\0' "$@" > "$ARGV_FILE"
trap 'echo USR1 >> "$EVENTS"; exit "${STUB_SIGNAL_STATUS:-0}"' USR1
echo started >> "$EVENTS"
for _ in $(seq $((STUB_SECONDS * 10))); do sleep 0.1; done
echo finished >> "$EVENTS"
"""
SCONTROL_STUB = 'echo "scontrol $*" >> "$EVENTS"\n'


def _run_stubbed(tmp_path, flags, signum=None, seconds=30, command=(SCRIPT, "pretrain_gpt.py"),
                 **env):
    """``bash COMMAND FLAGS`` inside a fake job 77, ``signum`` sent to the shell once srun runs
    -> (process, events, srun's argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(str(bin_dir), "srun", SRUN_STUB)
    _stub(str(bin_dir), "scontrol", SCONTROL_STUB)
    events, argv = tmp_path / "events", tmp_path / "argv"
    run_env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", EVENTS=events,
                         ARGV_FILE=argv, STUB_SECONDS=seconds, SLURM_JOB_ID=77,
                         SLURM_NTASKS=2, SLURM_JOB_NODELIST="localhost", MASTER_ADDR="localhost",
                         **env)
    proc = subprocess.Popen(["bash", *command, *flags], env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signum is not None:
        deadline = time.monotonic() + 30
        while "started" not in _read(events) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=60)
    return proc, _read(events).splitlines(), _read(argv).split("\0")[:-1]


@pytest.mark.parametrize("restart", [False, True], ids=["first-start", "restart"])
def test_usr1_reaches_srun_and_the_job_is_requeued(tmp_path, restart):
    """Only --save given: --load = --save is added once --save holds a checkpoint (a requeued
    job), not before (the flags stay as given, e.g. for --use-checkpoint-args)."""
    ckpt = tmp_path / "ckpt"
    if restart:
        ckpt.mkdir()
        (ckpt / TRACKER_FILENAME).write_text("33")
    proc, events, argv = _run_stubbed(tmp_path, ["--save", str(ckpt)], signal.SIGUSR1,
                                      SLURM_RESTART_COUNT=int(restart))
    assert proc.returncode == 0, proc.stderr_text
    assert events == ["started", "USR1", "scontrol requeue 77"]
    assert f"job 77 saved a checkpoint in {ckpt} after SIGUSR1; requeueing it " \
           f"(restart {int(restart) + 1})" in proc.stdout_text
    entry = next(i for i, arg in enumerate(argv) if arg.endswith("pretrain_gpt.py"))
    assert argv[entry + 1:] == ["--exit-signal-handler", "--exit-signal", "SIGUSR1"] \
        + (["--load", str(ckpt)] if restart else []) + ["--save", str(ckpt)]


@pytest.mark.parametrize("flags,signum,env,status,expected", [
    (["--save", "/c", "--load", "/c"], None, {}, 0, ["started", "finished"]),
    (["--save", "/c"], signal.SIGUSR1, {"STUB_SIGNAL_STATUS": 1}, 1, ["started", "USR1"]),
    (["--save", "/c"], signal.SIGUSR1, {"REQUEUE": 0}, 0, ["started", "USR1"]),
    (["--save", "/c", "--load", "/base"], signal.SIGUSR1, {}, 0, ["started", "USR1"]),
    (["--save=/c/", "--load", "/c"], signal.SIGTERM, {}, 0, ["started", "finished"]),
    (["--save", "/c"], signal.SIGINT, {}, 0, ["started", "USR1"]),
    ([], signal.SIGUSR1, {}, 0, ["started", "finished"]),
], ids=["finished", "failed-after-usr1", "REQUEUE=0", "load-is-not-save", "sigterm-waited-out",
        "sigint-as-usr1", "no-save"])
def test_no_requeue(tmp_path, flags, signum, env, status, expected):
    """Requeued only after a SIGUSR1 that ended in exit 0 with --load = --save. SIGTERM is not
    passed on (SLURM signals the tasks itself) but waited out; SIGINT reaches srun as SIGUSR1
    (a save, not a requeue); without --save nothing catches SIGUSR1, so it is not passed on
    either and the run goes on."""
    proc, events, argv = _run_stubbed(tmp_path, flags, signum, seconds=1, **env)
    assert proc.returncode == status, proc.stderr_text
    assert events == expected
    assert ("--exit-signal-handler" in argv) == bool(flags)
    if not flags:
        assert "SIGUSR1: pretrain_gpt.py has no --exit-signal-handler here (no --save?); " \
               "running on" in proc.stderr_text


def _recipe_inputs(directory, script):
    """Empty stand-ins for the inputs ``script`` checks before it launches -> its variables."""
    if script == "pretrain_bert_large.sh":
        return {"DATA_PATH": _fake_bert_pile(str(directory))}
    if script == "finetune_gpt_causal_lm.sh":
        directory.mkdir()
        for name in ("ptb.train.txt", "ptb.valid.txt", TRACKER_FILENAME):
            (directory / name).touch()
        return {"TEXT_DIR": directory, "PRETRAINED": directory}
    return {"DATA_PATH": _fake_pile(str(directory), "pile_all")[0]}


@pytest.mark.parametrize("script", ["pretrain_gpt3_350M.sh", "pretrain_bert_large.sh",
                                    "finetune_gpt_causal_lm.sh"])
def test_recipe_scripts_take_the_signal_through_exec(tmp_path, script):
    """The recipe scripts (sbatch'ed themselves) end in run_slurm.sbatch by exec: the batch
    shell that SLURM signals is the one that forwards the signal and requeues. finetune.py
    gets the handler among pretrain_gpt.py's flags (after its '--') and resumes from --save
    by itself."""
    proc, events, argv = _run_stubbed(tmp_path, [], signal.SIGUSR1,
                                      command=[os.path.join(ROOT, "examples", script)],
                                      LAUNCHER="slurm", PYTHON=sys.executable,
                                      CHECKPOINT_DIR=tmp_path / "ckpt",
                                      CHECKPOINT_PATH=tmp_path / "ckpt", SAVE=tmp_path / "ckpt",
                                      **_recipe_inputs(tmp_path / "inputs", script))
    assert proc.returncode == 0, proc.stderr_text
    assert events == ["started", "USR1", "scontrol requeue 77"]
    assert argv.count("--exit-signal-handler") == 1
    if script == "finetune_gpt_causal_lm.sh":
        assert argv[argv.index("--") + 1:][-3:] == ["--exit-signal-handler", "--exit-signal",
                                                    "SIGUSR1"]
        assert "--load" not in argv


@pytest.mark.parametrize("flags", [["--save", "/c"], ["--save", "/c", "--", "--fp16"]],
                         ids=["no-separator", "separator"])
def test_causal_lm_finetune_gets_the_handler_after_its_separator(tmp_path, flags):
    proc, events, argv = _run_stubbed(tmp_path, flags, signal.SIGUSR1,
                                      command=[SCRIPT, "tasks/causal_lm/finetune.py"])
    assert proc.returncode == 0, proc.stderr_text
    assert events == ["started", "USR1", "scontrol requeue 77"]
    entry = next(i for i, arg in enumerate(argv) if arg.endswith("finetune.py"))
    assert argv[entry + 1:] == [*flags, *([] if "--" in flags else ["--"]),
                                "--exit-signal-handler", "--exit-signal", "SIGUSR1"]


def test_another_exit_signal_is_refused_in_one_line(tmp_path):
    proc, events, _ = _run_stubbed(tmp_path, ["--save", "/c", "--exit-signal", "SIGUSR2"])
    assert proc.returncode == 2 and events == []
    assert proc.stderr_text.splitlines() == [
        "run_slurm.sbatch: --exit-signal SIGUSR2: this script forwards SIGUSR1 "
        "(#SBATCH --signal=B:USR1@300) to the tasks; drop --exit-signal"]


# -- a real SLURM ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """The environment that reaches a cluster of this test session's own (SLURM_CONF: its
    directory and ports); its daemons are stopped afterwards."""
    env = _clean_env(MEGATRON_LTD_SLURM_DIR=tmp_path_factory.getbasetemp() / "slurm",
                     MEGATRON_LTD_SLURM_PORT=free_port(), MEGATRON_LTD_SLURMD_PORT=free_port())
    done = subprocess.run(["bash", SETUP, "start"], env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        subprocess.run(["bash", SETUP, "stop"], env=env, capture_output=True, timeout=120)
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        print(f"tests/test_slurm.py skipped: {reason}", file=sys.stderr)
        pytest.skip(f"no local SLURM: {reason}")
    env.update(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    yield env
    subprocess.run(["scancel", "--user", str(os.getuid())], env=env, capture_output=True)
    subprocess.run(["bash", SETUP, "stop"], env=env, capture_output=True, timeout=120)


def _submit(env, tmp_path, name, *flags):
    """sbatch examples/run_slurm.sbatch pretrain_gpt.py FLAGS as 2 tasks on one node
    -> (job id, its output file)."""
    out = tmp_path / f"{name}.out"
    job_env = dict(env, PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    done = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks=2",
         "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--overcommit",
         "--time=10", f"--output={out}", f"--chdir={ROOT}",
         SCRIPT, "pretrain_gpt.py", *flags],
        env=job_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], out


def _job(env, job):
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)


def _read(path):
    return path.read_text() if path.exists() else ""


def _wait_until(what, predicate, timeout, out):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout} s; job output:\n{_read(out)[-4000:]}")


def _wait_for_end(env, job, out, timeout=300):
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    _wait_until(f"job {job} did not end", lambda: _job(env, job)["JobState"] in ended, timeout,
                out)
    return _job(env, job)


def _losses(text):
    """{iteration: the logged lm loss, as printed}; an iteration logged twice fails."""
    found = ITERATION.findall(text)
    iterations = [int(i) for i, _ in found]
    assert len(set(iterations)) == len(iterations), f"iterations logged twice: {iterations}"
    return {int(i): loss for i, loss in found}


def _assert_equal(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


def _assert_same_checkpoint(root_a, root_b, iteration):
    """Everything a resume reads (weights, optimizer, scheduler, RNG, counters) is identical;
    only ``args`` differs (the directories)."""
    a = read_checkpoint_file(checkpoint_file(root_a, iteration))
    b = read_checkpoint_file(checkpoint_file(root_b, iteration))
    assert sorted(a) == sorted(b)
    for key in sorted(set(a) - {"args"}):
        _assert_equal(a[key], b[key], key)


def _flags(data_prefix, save):
    return gpt_argv(data_prefix, "--distributed-backend", "gloo", "--hidden-size", "64",
                    "--seq-length", "64", "--log-interval", "1", "--eval-interval", str(ITERS),
                    "--save", save, "--save-interval", str(10 * ITERS), iters=ITERS)


def _wait_for_iteration(out, what):
    _wait_until(f"{what} did not log iteration {SIGNAL_AFTER}",
                lambda: SIGNAL_AFTER in _losses(_read(out)), 300, out)


def _signal_mid_run(env, job, out, *scancel_flags):
    """Once SIGNAL_AFTER iterations are logged: scancel SCANCEL_FLAGS JOB."""
    _wait_for_iteration(out, f"job {job}")
    subprocess.run(["scancel", *scancel_flags, job], env=env, check=True, timeout=30)


def _stopped_at(text, signal_name):
    """The iteration where the first run saved and exited on ``signal_name``."""
    stops = re.findall(rf"^exiting at iteration (\d+): received {signal_name} "
                       r"\(--exit-signal-handler\); saving a checkpoint$", text, re.M)
    assert len(stops) == 1, text[-4000:]
    stop = int(stops[0])
    assert SIGNAL_AFTER <= stop < ITERS, "the signal did not land mid-run"
    assert f"successfully saved checkpoint at iteration {stop:7d}" in text
    return stop


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes_as_an_uninterrupted_job(slurm_env, data_prefix,
                                                                 tmp_path):
    ref_ckpt, ckpt = str(tmp_path / "reference"), str(tmp_path / "preempted")
    ref_job, ref_out = _submit(slurm_env, tmp_path, "reference", *_flags(data_prefix, ref_ckpt))
    job, out = _submit(slurm_env, tmp_path, "preempted", *_flags(data_prefix, ckpt))
    try:
        ref = _wait_for_end(slurm_env, ref_job, ref_out)
        assert (ref["JobState"], ref["ExitCode"], ref["Restarts"]) == ("COMPLETED", "0:0", "0"), \
            _read(ref_out)[-4000:]  # a finished job is not requeued
        _signal_mid_run(slurm_env, job, out, "--signal=USR1", "--batch")
        state = _wait_for_end(slurm_env, job, out)
    finally:
        subprocess.run(["scancel", ref_job, job], env=slurm_env, capture_output=True)
    text = _read(out)  # both runs of the job: --open-mode=append
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        text[-4000:]
    stop = _stopped_at(text, "SIGUSR1")
    assert f"run_slurm.sbatch: job {job} saved a checkpoint in {ckpt} after SIGUSR1; " \
           f"requeueing it (restart 1)" in text
    assert f"successfully loaded checkpoint from {ckpt} at iteration {stop}\n" in text
    reference = _losses(_read(ref_out))
    assert sorted(reference) == list(range(1, ITERS + 1))
    assert _losses(text) == reference
    with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
        assert f.read().strip() == str(ITERS)
    _assert_same_checkpoint(ref_ckpt, ckpt, ITERS)


@pytest.mark.slow
def test_sigterm_saves_before_the_kill_and_is_not_requeued(slurm_env, data_prefix, tmp_path):
    """scancel (SIGTERM to every process of the job, as at the time limit): the tasks save and
    exit 0 within KillWait; the batch shell does not end the job before them."""
    ckpt = str(tmp_path / "cancelled")
    job, out = _submit(slurm_env, tmp_path, "cancelled", *_flags(data_prefix, ckpt))
    try:
        _signal_mid_run(slurm_env, job, out)
        state = _wait_for_end(slurm_env, job, out)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    text = _read(out)
    assert (state["JobState"], state["Restarts"]) == ("CANCELLED", "0"), text[-4000:]
    stop = _stopped_at(text, "SIGTERM")
    assert "requeueing" not in text
    with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
        assert f.read().strip() == str(stop)
    read_checkpoint_file(checkpoint_file(ckpt, stop))  # complete and verified


@pytest.mark.slow
def test_ctrl_c_inside_an_allocation_saves_and_exits_0(slurm_env, data_prefix, tmp_path):
    """``bash examples/run_slurm.sbatch ...`` typed inside an allocation, then one Ctrl-C
    (SIGINT to the terminal's foreground process group: the script and srun). srun alone takes
    one Ctrl-C as a request for its tasks' status (two abort them); the script turns it into
    SIGUSR1 for the tasks: every rank saves, exit 0, nothing requeued."""
    alloc = subprocess.run(["salloc", "--no-shell", "--ntasks=2", "--overcommit", "--time=10"],
                           env=slurm_env, capture_output=True, text=True, timeout=120)
    granted = re.search(r"Granted job allocation (\d+)", alloc.stderr)
    assert granted, alloc.stderr
    job, ckpt, out = granted.group(1), str(tmp_path / "interrupted"), tmp_path / "run.out"
    env = dict(slurm_env, SLURM_JOB_ID=job, SLURM_NTASKS="2", SRUN_ARGS="--overcommit",
               PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    with open(out, "w") as log:
        proc = subprocess.Popen(["bash", SCRIPT, "pretrain_gpt.py", *_flags(data_prefix, ckpt)],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_iteration(out, "the run")
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    text = _read(out)
    assert status == 0, text[-4000:]
    stop = _stopped_at(text, "SIGUSR1")
    assert "requeueing" not in text
    with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
        assert f.read().strip() == str(stop)
