"""Checkpoint files under fault injection (issue 12): a crafted pickle never runs, a flipped
byte or a truncated file is one line naming it, writers killed mid-save leave nothing behind
and lose nothing, a resume with another shape flag names the flag."""

import glob
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from megatron.checkpoint_files import (ReadOptions, read_checkpoint_file,
                                       remove_stale_temporaries, stale_temporaries,
                                       temporary_name, verify_checkpoint_file)
from megatron.checkpointing import TRACKER_FILENAME, checkpoint_file, read_tracker
from megatron.errors import UserError
from test_bad_input import assert_user_error, cli
from training_helpers import MERGES, ROOT, VOCAB, gpt_argv, run

GENERATE = ["--prompt", "hello", "--max-new-tokens", "2"]


class _RunsCode:
    """Unpickles as ``os.system(command)``: what a crafted checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def checkpoint(data_prefix, tmp_path_factory):
    """A 2-iteration GPT checkpoint saved by pretraining."""
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, "--eval-iters", "0", iters=2))
    return ckpt


def _copy(checkpoint, out):
    shutil.copytree(checkpoint, out)
    return str(out), checkpoint_file(str(out), 2)


def _malicious_copy(checkpoint, out, marker):
    """A copy whose file, unpickled without the allowlist, runs ``touch marker``."""
    root, path = _copy(checkpoint, out)
    ckpt = read_checkpoint_file(path)
    ckpt["args"].payload = _RunsCode(f"touch {marker}")
    torch.save(ckpt, path)
    return root, path


def _leaves(obj):
    """The values inside nested dicts, lists and tuples (a checkpoint's tensors and numbers)."""
    if isinstance(obj, dict):
        return [leaf for value in obj.values() for leaf in _leaves(value)]
    if isinstance(obj, (list, tuple)):
        return [leaf for value in obj for leaf in _leaves(value)]
    return [obj]


def _flip_tensor_byte(path):
    """Flip one byte in the middle of the largest tensor record of ``path``."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(name_length + extra_length + info.file_size // 2, os.SEEK_CUR)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    return info.filename


# -- files from disk never run code ----------------------------------------------------------------

def test_crafted_pickle_is_refused_by_every_reader_and_runs_only_when_trusted(
        data_prefix, checkpoint, tmp_path):
    marker = tmp_path / "ran"
    root, path = _malicious_copy(checkpoint, tmp_path / "evil", marker)
    needles = (f"cannot read checkpoint {path}: it holds a posix.system object",
               "--unsafe-load-checkpoint")
    from megatron.arguments import parse_args
    from tools import checkpoint_util, convert_hf, generate_text

    readers = [lambda: read_checkpoint_file(path),
               lambda: run(gpt_argv(data_prefix, "--load", root, iters=4)),
               lambda: run(gpt_argv(data_prefix, "--load", root, "--finetune", iters=4)),
               lambda: parse_args(gpt_argv(data_prefix, "--load", root,
                                           "--use-checkpoint-args")),
               lambda: generate_text.main(["--load", root, *GENERATE]),
               lambda: checkpoint_util.main(["--load", root, "--save", str(tmp_path / "out"),
                                             "--target-tensor-parallel-size", "1",
                                             "--target-pipeline-parallel-size", "1"]),
               lambda: convert_hf.main(["export", "--load", root,
                                        "--output", str(tmp_path / "hf")])]
    for read in readers:
        with pytest.raises(UserError) as info:
            read()
        assert all(n in str(info.value) for n in needles) and "\n" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The payload is live: trusting the file (--unsafe-load-checkpoint) runs it.
    read_checkpoint_file(path, ReadOptions(unsafe=True))
    assert marker.exists()


def test_crafted_pytorch_model_bin_is_refused_by_the_hf_import(tmp_path):
    from tools import convert_hf

    hf, marker = tmp_path / "hf", tmp_path / "ran"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", "architectures": '
                                    '["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8, '
                                    '"n_head": 2, "n_positions": 8, "vocab_size": 16}')
    torch.save({"wte.weight": torch.zeros(16, 8), "x": _RunsCode(f"touch {marker}")},
               hf / "pytorch_model.bin")
    with pytest.raises(UserError, match="it holds a posix.system object.*"
                                        "--unsafe-load-checkpoint"):
        convert_hf.main(["import", "--input", str(hf), "--save", str(tmp_path / "out")])
    assert not marker.exists()


def test_genuine_pytorch_model_bin_reads_as_its_safetensors_twin(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tools.convert_hf import read_hf_weights

    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1,
                                     n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # HF's legacy file
    st, legacy = read_hf_weights(str(tmp_path / "st")), read_hf_weights(str(tmp_path / "bin"))
    assert st and all(torch.equal(st[k], legacy[k]) for k in st)


def test_unlisted_types_are_named_and_load_only_when_trusted_with_one_warning(
        checkpoint, tmp_path, capsys):
    import fractions

    from megatron import checkpoint_files

    _, path = _copy(checkpoint, tmp_path / "strings")
    # Refused deep inside torch's unpickler (not by the global scan): the type is named too.
    torch.save({"args": np.array(["text"])}, path)
    with pytest.raises(UserError, match="holds a numpy.dtypes.StrDType object"):
        read_checkpoint_file(path)
    _, path = _copy(checkpoint, tmp_path / "fraction")
    ckpt = read_checkpoint_file(path)
    ckpt["args"].ratio = fractions.Fraction(1, 3)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="holds a fractions.Fraction object.*"
                                        "pass --unsafe-load-checkpoint only if you trust"):
        read_checkpoint_file(path)
    checkpoint_files._warned_unsafe.clear()
    capsys.readouterr()
    for _ in range(2):
        assert read_checkpoint_file(path, ReadOptions(unsafe=True))["args"].ratio == \
            fractions.Fraction(1, 3)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "--unsafe-load-checkpoint" in warnings[0]


@pytest.mark.slow
def test_crafted_checkpoint_through_the_command_lines(data_prefix, checkpoint, tmp_path):
    """pretrain_gpt.py --load and the tools, as a user runs them: one line, exit 2, no code."""
    marker = tmp_path / "ran"
    root, path = _malicious_copy(checkpoint, tmp_path / "evil", marker)
    needles = (path, "posix.system", "--unsafe-load-checkpoint")
    assert_user_error(cli("pretrain_gpt.py", *gpt_argv(data_prefix, "--load", root, iters=4)),
                      *needles)
    assert_user_error(cli("tools/generate_text.py", "--load", root, *GENERATE), *needles)
    assert_user_error(cli("tools/checkpoint_util.py", "--load", root, "--save", tmp_path / "o",
                          "--target-tensor-parallel-size", "1",
                          "--target-pipeline-parallel-size", "1"), *needles)
    assert not marker.exists()


# -- integrity ---------------------------------------------------------------------------------

def test_flipped_byte_in_tensor_data_is_one_line_naming_the_file(data_prefix, checkpoint,
                                                                 tmp_path):
    root, path = _copy(checkpoint, tmp_path / "flipped")
    original = read_checkpoint_file(path)
    record = _flip_tensor_byte(path)
    with pytest.raises(UserError) as info:
        run(gpt_argv(data_prefix, "--load", root, iters=4))
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: it does not match the sizes "
                              "and CRC-32s recorded when it was written") and "\n" not in message
    assert record in message and "--no-verify-checkpoint" in message
    _, logs = run(gpt_argv(data_prefix, "--load", root, "--no-verify-checkpoint", iters=2))
    assert f"  successfully loaded checkpoint from {root} at iteration 2" in logs  # as asked
    # torch itself does not notice: without the check the damaged tensor loads.
    damaged = read_checkpoint_file(path, ReadOptions(verify=False))
    flat = [(a, b) for a, b in zip(_leaves(original), _leaves(damaged)) if torch.is_tensor(a)]
    assert sum(not torch.equal(a, b) for a, b in flat) == 1


def test_truncated_file_is_one_line_and_rewritten_or_legacy_files_load(checkpoint, tmp_path):
    root, path = _copy(checkpoint, tmp_path / "cut")
    data = open(path, "rb").read()
    ckpt = read_checkpoint_file(path)
    open(path, "wb").write(data[:-1000])
    with pytest.raises(UserError, match=f"cannot read checkpoint {path}: .*truncated"):
        read_checkpoint_file(path)
    torch.save(ckpt, path)  # edited by hand with torch.save: its own records, verified
    verify_checkpoint_file(path)
    assert read_checkpoint_file(path)["iteration"] == 2
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)  # pre-1.6 format: no records
    assert read_checkpoint_file(path)["iteration"] == 2


def test_a_file_written_without_crcs_loads_unverified(checkpoint, tmp_path):
    serialization = pytest.importorskip("torch.utils.serialization",
                                        reason="this torch has no option to leave the CRCs out")
    root, path = _copy(checkpoint, tmp_path / "no-crc")
    ckpt = read_checkpoint_file(path)
    serialization.config.save.compute_crc32 = False  # its records are all zero
    try:
        torch.save(ckpt, path)
    finally:
        serialization.config.save.compute_crc32 = True
    _flip_tensor_byte(path)
    assert read_checkpoint_file(path)["iteration"] == 2  # nothing to verify against


# -- stale temporary files -----------------------------------------------------------------------

def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _holder(path):
    """A live process of another pid holding the writer's flock on ``path``."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'ab'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_only_dead_writers_files_of_this_host_in_the_checkpoint_tree_are_removed(tmp_path):
    root = tmp_path / "save"
    rank_dir = root / "iter_0000004" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    (root / "other").mkdir()
    target = str(rank_dir / "model_optim_rng.pt")
    host = temporary_name(target).rsplit(".", 1)[0].split(".tmp.", 1)[1]
    dead = _dead_pid()
    files = {
        "dead": f"{target}.tmp.{host}.{dead}",
        "tracker-dead": str(root / f"{TRACKER_FILENAME}.tmp.{host}.{dead}"),
        "alive": temporary_name(target),  # this process: a writer at work
        "other-host": f"{target}.tmp.not-{host}.{dead}",
        "outside": str(root / "other" / f"x.tmp.{host}.{dead}"),
        "no-pid": f"{target}.tmp.{dead}",
        "locked": str(rank_dir / f"optim.pt.tmp.{host}.{_dead_pid()}"),
    }
    for path in files.values():
        open(path, "wb").write(b"x" * 1000)
    holder = _holder(files["locked"])
    try:
        assert sorted(stale_temporaries(str(root))) == sorted([files["dead"],
                                                               files["tracker-dead"]])
        logs = []
        assert remove_stale_temporaries(str(root), logs.append) == 2
        assert len(logs) == 1 and "removed 2 temporary file(s)" in logs[0]
    finally:
        holder.kill()
        holder.wait()
    assert {k for k, p in files.items() if os.path.exists(p)} == \
        {"alive", "other-host", "outside", "no-pid", "locked"}
    assert stale_temporaries(str(root)) == [files["locked"]]  # its holder is gone now


def _train_rank(rank, world_size, argv, events):
    """One rank of a forked training run: reports each log line, returns its losses."""
    torch.set_num_threads(1)
    import pretrain_gpt

    result = pretrain_gpt.pretrain(pretrain_gpt.datasets_provider, pretrain_gpt.model_provider,
                                   pretrain_gpt.forward_step_provider, argv=argv,
                                   log=lambda line: events.put(("log", str(line))))
    return [(i, dict(loss)) for i, loss in result.train_losses]


def _single_process(body, rank, world_size, port, args, results):
    """``distributed_harness._worker`` without torch.distributed: one process, as users run."""
    try:
        results.put((rank, "ok", body(rank, world_size, *args)))
    except BaseException:  # noqa: B902 - report everything to the parent
        import traceback

        results.put((rank, "error", traceback.format_exc()))


def _start(argv, world_size):
    """Fork ``world_size`` ranks of ``_train_rank`` (gloo when several); one queue carries
    ("log", line) events and each rank's (rank, "ok", losses) or (rank, "error", traceback)."""
    from distributed_harness import _worker, free_port

    ctx = multiprocessing.get_context("fork")
    events, port = ctx.Queue(), free_port()
    target = _worker if world_size > 1 else _single_process
    ranks = [ctx.Process(target=target, daemon=True,
                         args=(_train_rank, r, world_size, port, (argv, events), events))
             for r in range(world_size)]
    for rank in ranks:
        rank.start()
    return ranks, events


def _next_event(events, ranks, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            event = events.get(timeout=1)
        except Exception:  # queue.Empty
            if not all(r.is_alive() for r in ranks):
                raise AssertionError(f"a rank died: exit codes {[r.exitcode for r in ranks]}")
            continue
        if event[1] == "error":
            raise AssertionError(f"rank {event[0]} failed:\n{event[2]}")
        return event
    raise AssertionError("the training run made no progress")


def _run_to_end(argv, world_size):
    """Rank 0's losses of a run that finishes."""
    ranks, events = _start(argv, world_size)
    losses = {}
    while len(losses) < world_size:
        event = _next_event(events, ranks)
        if event[1] == "ok":
            losses[event[0]] = event[2]
    for rank in ranks:
        rank.join(timeout=60)
    return losses[0]


def _temporaries(root):
    return glob.glob(os.path.join(root, "**", "*.tmp.*"), recursive=True)


def _kill_during_save(argv, world_size, save, rng, wait_for_file):
    """Start a run, SIGKILL all its ranks at a random moment of its first or second save
    (while a file is being written, or up to 0.3 s after the save began); whether it left a
    temporary file."""
    ranks, events = _start(argv, world_size)
    saves, started = rng.randint(1, 2), set()  # every rank logs the start of a save
    while len(started) < saves:
        event = _next_event(events, ranks)
        assert event[0] == "log", "the run ended before it was killed"
        if event[1].startswith("saving checkpoint at iteration"):
            started.add(event[1].split()[4])
    deadline = time.time() + 5
    while wait_for_file and not _temporaries(save) and time.time() < deadline:
        time.sleep(0.0005)
    time.sleep(rng.uniform(0, 0.04 if wait_for_file else 0.3))
    for rank in ranks:
        os.kill(rank.pid, signal.SIGKILL)
    for rank in ranks:
        rank.join(timeout=60)
    pids = {f".{rank.pid}" for rank in ranks}
    return any(p.endswith(tuple(pids)) for p in _temporaries(save))


def _same(a, b):
    if torch.is_tensor(b):
        return torch.equal(a, b)
    if isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _rank_files(root):
    """Every rank's file of the iteration ``latest`` names (their contents must verify)."""
    iteration, _ = read_tracker(root)
    paths = sorted(glob.glob(os.path.join(root, f"iter_{iteration:07d}", "mp_rank_*",
                                          "model_optim_rng.pt")))
    return iteration, [read_checkpoint_file(path) for path in paths]


def _kill_and_resume(data_prefix, tmp_path, world_size, kills, iters, *flags):
    """Kill a run ``kills`` times during saves, resume it each time, and compare its end with
    an uninterrupted run's: losses, weights, optimizer and RNG states, bitwise."""
    argv = gpt_argv(data_prefix, "--save-interval", "1", "--eval-iters", "0",
                    "--log-interval", "1", *flags, iters=iters)
    reference = str(tmp_path / "reference")
    expected_losses = _run_to_end(argv + ["--save", reference], world_size)
    save = str(tmp_path / "killed")
    resume = argv + ["--save", save, "--load", save]
    rng, left_files = random.Random(12), 0
    for k in range(kills):
        left_files += _kill_during_save(resume, world_size, save, rng, wait_for_file=k % 2 == 0)
        if read_tracker(save) is not None:  # latest names a complete checkpoint that verifies
            _rank_files(save)
    assert left_files >= 1, "no kill landed while a checkpoint file was being written"
    assert read_tracker(save) is not None, "no save completed between the kills"
    losses = _run_to_end(resume, world_size)
    assert _temporaries(save) == []  # the dead writers' files went at the next save
    assert losses[0][0] > 1 and losses[-1][0] == iters  # it resumed
    assert losses == expected_losses[-len(losses):]
    (done, files), (expected, want_files) = _rank_files(save), _rank_files(reference)
    assert done == expected == iters and len(files) == len(want_files)
    for got, want in zip(files, want_files):
        for key in ("model", "optimizer", "rng_state"):
            leaves, expected_leaves = _leaves(got[key]), _leaves(want[key])
            assert len(leaves) == len(expected_leaves) > 0, key
            assert all(_same(a, b) for a, b in zip(leaves, expected_leaves)), key
    return len(files)


@pytest.mark.slow
def test_kill_9_during_save_20_times_resumes_to_the_uninterrupted_final_state(data_prefix,
                                                                            tmp_path):
    # Each launch completes at most two saves before it is killed: 44 iterations outlast 20.
    assert _kill_and_resume(data_prefix, tmp_path, 1, 20, 44, "--hidden-size", "256") == 1


@pytest.mark.slow
def test_kill_9_of_a_tensor_parallel_run_during_save_resumes_exactly(data_prefix, tmp_path):
    """Two ranks write two files per checkpoint: a kill between them never moves latest."""
    assert _kill_and_resume(data_prefix, tmp_path, 2, 8, 20, "--hidden-size", "256",
                            "--tensor-model-parallel-size", "2") == 2


# -- shape flags on resume -------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--seq-length", "16"], "saved with --seq-length 32 but --seq-length 16 was given"),
    (["--seq-length", "16", "--max-position-embeddings", "32"],
     "saved with --seq-length 32 but --seq-length 16 was given"),
    (["--hidden-size", "64"], "saved with --hidden-size 32 but --hidden-size 64 was given"),
    (["--num-layers", "3"], "saved with --num-layers 2 but --num-layers 3 was given"),
    (["--num-attention-heads", "8"], "--num-attention-heads 4 but --num-attention-heads 8"),
    (["--ffn-hidden-size", "64"], "--ffn-hidden-size 128 but --ffn-hidden-size 64 was given"),
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
     "padded vocabulary of 1536 but the tokenizer gives 128"),
])
def test_resume_with_another_shape_flag_names_it(data_prefix, checkpoint, extra, needle):
    with pytest.raises(UserError) as info:
        run(gpt_argv(data_prefix, "--load", checkpoint, "--eval-iters", "0", iters=4) + extra)
    message = str(info.value)
    assert needle in message and checkpoint_file(checkpoint, 2) in message
    assert "random-LTD" not in message and "\n" not in message


def test_finetune_at_another_seq_length_names_the_position_embeddings(data_prefix, checkpoint):
    with pytest.raises(UserError, match="--max-position-embeddings 32 but "
                                        "--max-position-embeddings 16 was given \\(it "
                                        "defaults to --seq-length\\)"):
        run(gpt_argv(data_prefix, "--load", checkpoint, "--finetune", "--seq-length", "16",
                     iters=2))


def test_the_first_save_of_a_run_sweeps_what_killed_writers_left(data_prefix, checkpoint,
                                                                  tmp_path):
    root, path = _copy(checkpoint, tmp_path / "resumed")
    dead = _dead_pid()
    stale = temporary_name(checkpoint_file(root, 4)).rsplit(".", 1)[0] + f".{dead}"
    os.makedirs(os.path.dirname(stale))
    open(stale, "wb").write(b"x" * 4096)
    _, logs = run(gpt_argv(data_prefix, "--load", root, "--save", root, "--eval-iters", "0",
                           "--override-opt_param-scheduler", iters=4))
    assert not os.path.exists(stale) and _temporaries(root) == []
    assert [line for line in logs if "removed 1 temporary file(s)" in line]


def _sweeper_body(rank, world_size):
    from megatron.checkpointing import _first_rank_on_this_host

    return _first_rank_on_this_host()


def test_one_rank_per_host_sweeps():
    from distributed_harness import run_distributed

    assert run_distributed(_sweeper_body, world_size=2) == [True, False]


def test_checkpoint_util_removes_what_a_killed_conversion_left(checkpoint, tmp_path):
    from tools import checkpoint_util

    out = str(tmp_path / "converted")
    stale = temporary_name(checkpoint_file(out, 2)).rsplit(".", 1)[0] + f".{_dead_pid()}"
    os.makedirs(os.path.dirname(stale))
    open(stale, "wb").write(b"x" * 4096)
    checkpoint_util.convert(checkpoint, out, 1, 1, log=lambda *_: None)
    assert _temporaries(out) == [] and read_checkpoint_file(checkpoint_file(out, 2))


def test_pretrained_checkpoint_honours_the_read_flags(checkpoint, tmp_path):
    """tasks/ --pretrained-checkpoint reads through the same options as --load: a flipped byte
    is one line naming the file, and --no-verify-checkpoint lets the user take it anyway."""
    from tasks.main import main as tasks_main

    root, path = _copy(checkpoint, tmp_path / "flipped")
    _flip_tensor_byte(path)
    lambada = os.path.join(ROOT, "tests", "assets", "zeroshot", "lambada.jsonl")
    argv = ["--task", "LAMBADA", "--valid-data", lambada, "--pretrained-checkpoint", root,
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--tokenizer-type",
            "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES,
            "--make-vocab-size-divisible-by", "64", "--device", "cpu"]
    with pytest.raises(UserError) as info:
        tasks_main(argv, log=lambda *_: None)
    assert path in str(info.value) and "--no-verify-checkpoint" in str(info.value)
    metrics = tasks_main(argv + ["--no-verify-checkpoint"], log=lambda *_: None)
    assert metrics is not None
