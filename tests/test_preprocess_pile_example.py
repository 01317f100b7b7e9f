"""examples/preprocess_pile.sh: shards in parallel (SLURM array or local), then one merge whose
result is the bytes of a single run over all shards."""

import os
import subprocess

import pytest
import zstandard

from tests.test_preprocess_data import GPT2, MERGES, ROOT, VOCAB, files, make_records, run, \
    write_jsonl

SCRIPT = os.path.join(ROOT, "examples", "preprocess_pile.sh")


def _shards(tmp_path, n=3, bad=None):
    pile = tmp_path / "pile"
    pile.mkdir()
    for i in range(n):
        plain = write_jsonl(tmp_path / f"{i:02d}.jsonl", make_records(60, seed=i))
        data = open(plain, "rb").read()
        if i == bad:
            data += b'{"text": "broken\n'
        (pile / f"{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        os.remove(plain)
    return pile


def _script(tmp_path, env_extra, *args, check=True):
    env = {**os.environ, "PILE_DIR": str(tmp_path / "pile"), "OUT_DIR": str(tmp_path / "out"),
           "VOCAB_FILE": VOCAB, "MERGE_FILE": MERGES, **env_extra}
    proc = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_dry_run_prints_one_command_per_shard_then_the_merge(tmp_path):
    _shards(tmp_path)
    out = _script(tmp_path, {"DRY_RUN": "1", "LAUNCHER": "local", "WORKERS": "4"},
                  "--", "--skip-bad-lines").stdout.splitlines()
    commands = [line for line in out if "preprocess_data.py" in line]
    assert len(commands) == 3
    for i, line in enumerate(commands):
        assert f"--input {tmp_path}/pile/{i:02d}.jsonl.zst" in line
        assert f"--output-prefix {tmp_path}/out/shards/pile_{i:02d}" in line
        assert line.endswith("--workers 4 --skip-bad-lines") and "--append-eod" in line
    assert out[-1].endswith(f"merge_datasets.py --input {tmp_path}/out/shards "
                            f"--output-prefix {tmp_path}/out/pile_text_document")


def test_slurm_submits_an_array_and_a_dependent_merge(tmp_path):
    _shards(tmp_path, n=4)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"  # records its arguments, answers as --parsable does
    fake.write_text(f'#!/bin/bash\necho "$* PILE_DIR=$PILE_DIR" >> {log}\necho 4242\n')
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    out = _script(tmp_path, {"PATH": path, "MAX_PARALLEL": "2"}, "--", "--skip-bad-lines").stdout
    calls = log.read_text().splitlines()
    assert calls[0] == f"--parsable --array=0-3%2 {SCRIPT} shard -- --skip-bad-lines " \
                       f"PILE_DIR={tmp_path}/pile"
    assert calls[1].startswith(f"--parsable --dependency=afterok:4242 --cpus-per-task=2 {SCRIPT} "
                               f"merge")
    assert "job 4242 (4 array tasks)" in out


@pytest.mark.slow
def test_local_run_equals_one_run_over_all_shards(tmp_path):
    pile = _shards(tmp_path)
    _script(tmp_path, {"LAUNCHER": "local", "PARALLEL": "2"})
    inputs = ",".join(str(pile / f"{i:02d}.jsonl.zst") for i in range(3))
    run(["--input", inputs, "--output-prefix", tmp_path / "single", "--append-eod", *GPT2])
    assert files(str(tmp_path / "out" / "pile_text_document")) == \
        files(str(tmp_path / "single_text_document"))
    # Rerun: the shards exist and are skipped; the merge is redone, the same.
    again = _script(tmp_path, {"LAUNCHER": "local"})
    assert again.stderr.count("exists, skipped") == 3
    assert files(str(tmp_path / "out" / "pile_text_document")) == \
        files(str(tmp_path / "single_text_document"))


@pytest.mark.slow
def test_a_failing_shard_stops_before_the_merge(tmp_path):
    _shards(tmp_path, bad=1)
    proc = _script(tmp_path, {"LAUNCHER": "local", "PARALLEL": "3"}, check=False)
    assert proc.returncode == 1
    assert "01.jsonl.zst:61: malformed JSON" in proc.stderr and "not merging" in proc.stderr
    assert sorted(os.listdir(tmp_path / "out" / "shards")) == [
        f"pile_{i}_text_document.{ext}" for i in ("00", "02") for ext in ("bin", "idx")]
    assert not os.path.exists(tmp_path / "out" / "pile_text_document.idx")
