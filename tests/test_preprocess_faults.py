"""tools/preprocess_data.py as a user breaks it (issue 14, point 6): dead workers, errors with
several workers, lone surrogates, empty texts, stale temporaries of killed runs."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset
from megatron.errors import UserError
from tests.test_preprocess_data import GPT2, ROOT, _fails, make_records, run, write_jsonl
from tools import preprocess_data
from tools.preprocess_workers import OrderedWorkers, WorkerDied

BACKENDS = ["hf", "fast"] if importlib.util.find_spec("gigatoken") else ["hf"]


# ---------------------------------------------------------------------------------------------
# The worker processes
# ---------------------------------------------------------------------------------------------

def _noop():
    pass


def _work(item):
    kind, value = item
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "user":
        raise UserError(f"bad item {value}")
    if kind == "bug":
        raise ValueError(f"bug on {value}")
    if kind == "sleep":
        time.sleep(value)
    return value * 10


def _children_of(pid):
    """The child pids of process ``pid`` (/proc); [] once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _all_children():
    return set(_children_of(os.getpid()))


_BEFORE = set()


@pytest.fixture(autouse=True)
def _children_before_the_test():
    """Children this pytest process already had (other tests' long-lived helpers in a full
    run) are not the test's: ``_children`` reports only the ones started since."""
    _BEFORE.clear()
    _BEFORE.update(_all_children())


def _children():
    """Child processes started during this test and still there (alive or unreaped)."""
    return sorted(_all_children() - _BEFORE)


def test_workers_keep_input_order_with_uneven_items():
    pool = OrderedWorkers(3, _noop, (), _work)
    rng = np.random.default_rng(0)
    items = [("sleep", float(s)) for s in rng.uniform(0, 0.02, 40)]
    got = [result for _, result in pool.imap(iter(items), ahead=5)]
    pool.close()
    assert got == [value * 10 for _, value in items]
    assert not _children()


@pytest.mark.parametrize("position", [0, 3, 7])
def test_killed_worker_is_an_error_not_a_hang(position):
    pool = OrderedWorkers(2, _noop, (), _work)
    items = [("sleep", 0.01)] * 10
    items[position] = ("kill", 0)
    got = []
    with pytest.raises(WorkerDied, match=r"was killed by SIGKILL \(the out-of-memory killer "
                                         r"sends this\) while encoding the killer") as info:
        for _, result in pool.imap(iter(items), ahead=4,
                                   describe=lambda it: f"the {it[0]}er"):
            got.append(result)
    pool.kill()
    assert got == [0.1] * len(got) and len(got) <= position  # in order, none after it
    assert "nothing was written" in str(info.value)
    assert not _children()


def test_idle_worker_death_is_noticed():
    pool = OrderedWorkers(2, _noop, (), _work)
    os.kill(pool._procs[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerDied):
        list(pool.imap(iter([("sleep", 0.2)] * 4), ahead=4))
    pool.kill()
    assert not _children()


def test_worker_exceptions_reach_the_parent():
    for kind, expected, match in (("user", UserError, "bad item 5"),
                                  ("bug", RuntimeError, "ValueError: bug on 5")):
        pool = OrderedWorkers(2, _noop, (), _work)
        with pytest.raises(expected, match=match):
            list(pool.imap(iter([("sleep", 0.0)] * 3 + [(kind, 5)] + [("sleep", 0.0)] * 3),
                           ahead=4))
        pool.kill()
    assert not _children()


def test_stopping_early_never_hangs():
    """The consumer stops mid-stream (a bad line, Ctrl-C) twenty times: kill() always returns."""
    for _ in range(20):
        pool = OrderedWorkers(2, _noop, (), _work)
        for i, _ in enumerate(pool.imap(iter([("sleep", 0.001)] * 50), ahead=8)):
            if i == 3:
                break
        pool.kill()
    assert not _children()


# ---------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------

def test_bad_line_with_two_workers_repeatedly_cleans_up(tmp_path, capsys):
    """Megatron's Pool.terminate() deadlocked now and then here and left the .bin.tmp."""
    good = [f'{{"text": "document {i} with some words"}}' for i in range(40)]
    for bad_at in (0, 5, 17, 39):
        lines = list(good)
        lines[bad_at] = '{"text": "broken'
        src = write_jsonl(tmp_path / "bad.jsonl", lines)
        for _ in range(2):
            _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                             "--workers", "2", "--chunk-bytes", "50", *GPT2],
                   f"bad.jsonl:{bad_at + 1}", "malformed JSON")
            assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    assert not _children()


@pytest.mark.slow
def test_killing_a_worker_of_the_command_line_ends_the_run(tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", make_records(4000, seed=3) * 40)  # 14 MB
    proc = subprocess.Popen(
        [sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
         str(tmp_path / "o"), "--workers", "2", "--chunk-bytes", "20000",
         "--tokenizer-backend", "hf", *GPT2], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        workers = []
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            workers = _children_of(proc.pid)
            time.sleep(0.05)
        assert len(workers) == 2, "the workers did not start"
        os.kill(workers[0], signal.SIGKILL)  # what the out-of-memory killer does
        _, err = proc.communicate(timeout=60)  # before the fix: waited forever
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: worker process") and "killed by SIGKILL" in last, err
    assert "big.jsonl from line" in last
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"]  # no outputs, no temporaries
    for pid in workers:  # the other worker was stopped too
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_lone_surrogates_are_bad_lines(tmp_path, capsys, tok, backend, workers):
    escaped = b'{"text": "fine \\ud800 not"}'  # a JSON escape of a lone surrogate
    raw = b'{"text": "raw \xed\xa0\x80 bytes"}'  # its CESU-8 bytes (json decodes them)
    pair = b'{"text": "a pair \\ud83d\\ude00 is an emoji"}'
    good = b'{"text": "good"}'
    src = tmp_path / "s.jsonl"
    base = ["--input", src, "--output-prefix", tmp_path / "o", "--workers", workers,
            "--chunk-bytes", "40", "--tokenizer-backend", backend, "--append-eod", *GPT2]
    for lines, where in (([good, escaped], "s.jsonl:2"), ([raw, good], "s.jsonl:1")):
        src.write_bytes(b"\n".join(lines) + b"\n")
        _fails(capsys, preprocess_data, base, where, "lone surrogate U+D800")
        assert sorted(os.listdir(tmp_path)) == ["s.jsonl"]
    src.write_bytes(b"\n".join([good, escaped, pair, raw, good]) + b"\n")
    summary = run([*base, "--skip-bad-lines"])
    assert summary["bad_lines"] == 2 and summary["documents"] == 3
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds[i].tolist() for i in range(3)] == [
        tok.tokenize(t) + [tok.eod] for t in ("good", "a pair \U0001F600 is an emoji", "good")]


@pytest.fixture(scope="module")
def tok():
    from megatron.tokenizer import build_tokenizer
    from tests.test_preprocess_data import MERGES, VOCAB

    return build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)


def test_input_with_only_empty_text_is_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "e.jsonl", [{"text": "", "title": "T"}] * 3 + [{"text": [],
                                                                                 "title": "U"}])
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                     "--append-eod", *GPT2],
           "the 4 documents have no tokens under key 'text'", "nothing written")
    _fails(capsys, preprocess_data, ["--input", src, "--output-prefix", tmp_path / "o",
                                     "--json-keys", "title", "text", *GPT2], "key 'text'")
    assert sorted(os.listdir(tmp_path)) == ["e.jsonl"]
    # Some empty documents among others are fine (they are kept, with no sequence).
    write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "words"}])
    assert run(["--input", src, "--output-prefix", tmp_path / "o", *GPT2])["documents"] == 2


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        prefix = tmp_path / "o_text_document"
        stale = [f"{prefix}.bin.tmp.{dead.pid}", f"{prefix}.idx.tmp.{dead.pid}"]
        kept = [f"{prefix}.bin.tmp.{alive.pid}", f"{tmp_path}/other.bin.tmp.{dead.pid}"]
        for path in stale + kept:
            open(path, "wb").write(b"partial")
        src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
        run(["--input", src, "--output-prefix", tmp_path / "o", *GPT2])
        err = capsys.readouterr().err
        assert "Removed 2 stale temporary file(s)" in err
        assert not any(os.path.exists(p) for p in stale)
        assert all(os.path.exists(p) for p in kept)  # a live writer's, another prefix's
    finally:
        alive.kill()
        alive.wait()


def _start_and_wait_for_workers(cmd, tmp_path):
    """Start the tool; return it and its two workers' pids once its temporary .bin exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and proc.poll() is None and (
            len(workers) < 2 or not [n for n in os.listdir(tmp_path) if ".tmp." in n]):
        workers = _children_of(proc.pid)
        time.sleep(0.05)
    assert proc.poll() is None and len(workers) == 2
    return proc, workers


def _gone(pids, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}")
                and open(f"/proc/{p}/stat").read().split()[2] != "Z"]:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_workers_and_leave_nothing(tmp_path, signum):
    src = write_jsonl(tmp_path / "big.jsonl", make_records(4000, seed=5) * 40)
    proc, workers = _start_and_wait_for_workers(
        [sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
         str(tmp_path / "o"), "--workers", "2", "--tokenizer-backend", "hf", *GPT2], tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"]
    assert _gone(workers)


@pytest.mark.slow
def test_kill_9_of_the_main_process_leaves_nothing_after_the_next_run(tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", make_records(4000, seed=4) * 40)
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
           str(tmp_path / "o"), "--tokenizer-backend", "hf", "--workers", "2", *GPT2]
    proc, workers = _start_and_wait_for_workers(cmd, tmp_path)
    proc.kill()
    proc.wait()
    try:
        assert _gone(workers)  # orphaned workers see their pipe close and exit
    finally:
        for pid in workers:  # never leave them behind, even when the assertion fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdout.close()
        proc.stderr.close()
    left = [n for n in os.listdir(tmp_path) if ".tmp." in n]
    assert left == [f"o_text_document.bin.tmp.{proc.pid}"]
    cmd[cmd.index("hf")] = "auto"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Removed 1 stale temporary file(s)" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl", "o_text_document.bin",
                                            "o_text_document.idx"]


def test_long_documents_are_encoded_in_bounded_batches(tok):
    """One 50 MB document peaked at 6.5 GB: the HF library's per-token objects for the whole
    text at once. The reference backend hands the library at most ~max_piece_chars at a time
    and gives the same ids."""
    from tools.preprocess_backends import ReferenceBackend

    seen = []

    class Counting:
        tokenizer_type = tok.tokenizer_type

        def tokenize(self, text):
            seen.append(len(text))
            return tok.tokenize(text)

        def tokenize_batch(self, texts):
            seen.append(sum(map(len, texts)))
            return tok.tokenize_batch(texts)

    words = make_records(300, seed=6)
    long_text = " ".join(r["text"] for r in words)  # ~13,000 characters
    texts = ["short", long_text, "", "another short one", long_text[:900]]
    backend = ReferenceBackend(Counting(), max_piece_chars=1000)
    flat, lengths = backend.encode(texts)
    assert max(seen) <= 1000 + 20  # a piece ends at the first cut place past the limit
    assert len(seen) > len(long_text) // 1020
    assert np.split(flat, np.cumsum(lengths)[:-1])[1].tolist() == tok.tokenize(long_text)
    assert [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])] == \
        [tok.tokenize(t) for t in texts]


def test_merge_removes_stale_temporaries_of_its_output(tmp_path, capsys):
    from tools import merge_datasets

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    (tmp_path / "shards").mkdir()
    run(["--input", src, "--output-prefix", tmp_path / "shards" / "a", *GPT2])
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"merged.bin.tmp.{dead.pid}"
    stale.write_bytes(b"partial")
    merge_datasets.main(["--input", str(tmp_path / "shards"), "--output-prefix",
                         str(tmp_path / "merged")])
    assert not stale.exists() and "Removed 1 stale temporary file(s)" in capsys.readouterr().err
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("merged")) == \
        ["merged.bin", "merged.idx"]
