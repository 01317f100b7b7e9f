"""tasks/run_finetune_seeds.py and tasks/finetune_presets.py: the paper's settings as flags, the
log parser, the table (median and best per column over seeds, the average, Markdown and CSV)
from canned results, resuming (finished runs skipped, failures reported), --dry-run, and a tiny
real run (slow)."""

import csv
import io
import json
import os
import statistics
import sys

import pytest

from megatron.errors import UserError
from tasks import run_finetune_seeds as runner
from tasks.finetune_presets import PRESETS, task_flags
from tasks.main import parse_task_args
from training_helpers import BERT_VOCAB, ROOT

TASKS = os.path.join(ROOT, "tests", "assets", "tasks")


def test_presets_are_the_papers():
    got = {t: (p.epochs, p.global_batch_size, p.lr) for t, p in PRESETS.items()}
    assert got == {"MNLI": (10, 128, 1e-5), "QQP": (12, 128, 5e-5), "RACE": (3, 32, 2e-5)}
    flags = task_flags("RACE", "/data") + ["--tokenizer-type", "BertWordPieceLowerCase",
                                           "--vocab-file", BERT_VOCAB, "--num-layers", "2",
                                           "--hidden-size", "32", "--num-attention-heads", "4",
                                           "--seq-length", "64",
                                           "--max-position-embeddings", "64"]
    args = parse_task_args(flags, world_size=8)
    assert (args.epochs, args.global_batch_size, args.lr, args.micro_batch_size) == \
        (3, 32, 2e-5, 4)
    assert args.train_data == ["/data/RACE/train/middle", "/data/RACE/train/high"]
    assert args.valid_data == ["/data/RACE/dev/middle", "/data/RACE/dev/high"]
    assert (args.lr_decay_style, args.lr_warmup_fraction, args.weight_decay, args.clip_grad,
            args.hidden_dropout, args.attention_dropout) == ("linear", 0.065, 0.1, 1.0, 0.1, 0.1)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.999, 1e-8)
    assert args.num_micro_batches == 1  # 32 = 4 x 8 GPUs


LOG = """\
working on epoch 1 ...
 > |epoch: 0| metrics for dev: correct / total = 7 / 13 = 53.8462 %, elapsed time (sec): 0.1
 > |epoch: 0| f1 for dev: tp / fp / fn = 2 / 1 / 4, f1 = 44.4444 %
 >> |epoch: 0| overall: correct / total = 7 / 13 = 53.8462 %
 >> |epoch: 0| overall: f1 = 44.4444 %
 > |epoch: 1| metrics for dev: correct / total = 9 / 13 = 69.2308 %, elapsed time (sec): 0.1
 > |epoch: 1| f1 for dev: tp / fp / fn = 4 / 2 / 2, f1 = 66.6667 %
 >> |epoch: 1| overall: correct / total = 9 / 13 = 69.2308 %
 >> |epoch: 1| overall: f1 = 66.6667 %
"""


def test_parse_log_reads_megatrons_lines():
    epochs = runner.parse_log(LOG.splitlines())
    assert epochs[1]["sets"]["dev"] == {"correct": 9, "total": 13, "accuracy": 69.2308,
                                        "tp": 4, "fp": 2, "fn": 2, "f1": 66.6667}
    assert epochs[0]["overall"] == {"correct": 7, "total": 13, "accuracy": 53.8462,
                                    "f1": 44.4444}
    result = {"epochs": {str(e): v for e, v in epochs.items()}}
    acc, f1 = PRESETS["QQP"].columns
    assert runner.column_value(result, acc) == 69.2308
    assert runner.column_value(result, f1, "best") == 66.6667
    assert runner.parse_seeds("1234-1236,1240") == [1234, 1235, 1236, 1240]
    with pytest.raises(UserError):
        runner.parse_seeds("a-b")


def _epoch(sets, overall):
    return {"sets": sets, "overall": overall}


def _result(task, value):
    """A canned result.json whose last epoch has ``value`` in every column (an earlier epoch
    lower), RACE's overall 1 above."""
    low, v = value - 10, value
    if task == "MNLI":
        e = lambda x: _epoch({"dev-matched": {"accuracy": x},  # noqa: E731
                              "dev-mismatched": {"accuracy": x + 0.5}}, {"accuracy": x})
    elif task == "QQP":
        e = lambda x: _epoch({"dev": {"accuracy": x, "f1": x - 2}}, {"accuracy": x})  # noqa
    else:
        e = lambda x: _epoch({"dev-middle": {"accuracy": x},  # noqa: E731
                              "dev-high": {"accuracy": x - 3}}, {"accuracy": x + 1})
    return {"task": task, "epochs": {"0": e(low), "1": e(v)}}


VALUES = {("baseline", "MNLI"): [84.0, 83.0, 85.5, 84.2, 83.9],
          ("baseline", "QQP"): [91.0, 91.2, 90.8, 91.1, 91.3],
          ("baseline", "RACE"): [70.0, 71.0, 69.5, 72.0, 70.5],
          ("ltd", "MNLI"): [84.5, 84.1, 84.9, 85.0, 83.0],
          ("ltd", "QQP"): [91.4, 91.0, 91.2, 91.3, 91.1],
          ("ltd", "RACE"): [71.0, 71.5, 70.0, 72.5, 70.9]}


def _canned_runs(out):
    for (name, task), values in VALUES.items():
        for seed, value in zip(range(1234, 1239), values):
            d = os.path.join(out, name, task, f"seed{seed}")
            os.makedirs(d)
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump(_result(task, value), f)


def test_table_median_best_and_average_from_canned_results(tmp_path):
    out = str(tmp_path / "runs")
    _canned_runs(out)
    logs = []
    assert runner.main(["--table-only", "--checkpoint", "baseline=/ckpt/a", "--checkpoint",
                        "ltd=/ckpt/b", "--output-dir", out], log=logs.append) == 0
    with open(os.path.join(out, "finetune_results.csv")) as f:
        rows = {(r["checkpoint"], r["column"]): r for r in csv.DictReader(f)}
    for (name, task), values in VALUES.items():
        for column in PRESETS[task].columns:
            shift = {"MNLI-mm": 0.5, "QQP-F1": -2, "RACE-h": -3, "RACE": 1}.get(column.name, 0)
            row = rows[(name, column.name)]
            assert float(row["median"]) == pytest.approx(statistics.median(values) + shift,
                                                         abs=0.005)
            assert float(row["best"]) == pytest.approx(max(values) + shift, abs=0.005)
            assert row["seeds_finished"] == "5"
    # the average of the medians over MNLI-m, MNLI-mm, QQP-acc, QQP-F1, RACE-m, RACE-h
    medians = [statistics.median(VALUES[("ltd", t)]) for t in ("MNLI", "QQP", "RACE")]
    expected = statistics.fmean([medians[0], medians[0] + 0.5, medians[1], medians[1] - 2,
                                 medians[2], medians[2] - 3])
    assert float(rows[("ltd", "Avg")]["median"]) == pytest.approx(expected, abs=0.005)
    with open(os.path.join(out, "finetune_results.md")) as f:
        md = f.read()
    assert "| checkpoint | MNLI-m | MNLI-mm | QQP-acc | QQP-F1 | RACE-m | RACE-h | RACE | Avg |" \
        in md
    assert "| baseline | 84.00 / 85.50 | 84.50 / 86.00 | 91.10 / 91.30 |" in md
    assert md in logs  # printed too
    # the best epoch instead of the last: the same here (the last epoch is the best)
    runner.main(["--table-only", "--checkpoint", "baseline=/ckpt/a", "--output-dir", out,
                 "--epoch-select", "best", "--task", "QQP"], log=lambda *a: None)
    with open(os.path.join(out, "finetune_results.md")) as f:
        assert "| baseline | 91.10 / 91.30 | 89.10 / 89.30 | 90.10 / 90.30 |" in f.read()


def test_partial_seeds_are_marked(tmp_path):
    out = str(tmp_path / "runs")
    _canned_runs(out)
    os.remove(os.path.join(out, "ltd", "QQP", "seed1236", "result.json"))
    runner.main(["--table-only", "--checkpoint", "ltd=/ckpt/b", "--output-dir", out,
                 "--task", "QQP"], log=lambda *a: None)
    with open(os.path.join(out, "finetune_results.md")) as f:
        assert "(4/5 seeds)" in f.read()


def test_finished_runs_are_skipped_and_failures_reported(tmp_path, monkeypatch):
    """A stand-in for tasks/main.py prints Megatron's lines for seed 1234 and fails seed 1235;
    the run of seed 1236 finished before and is not started again."""
    fake = tmp_path / "fake_main.py"
    fake.write_text(
        "import sys\n"
        "seed = sys.argv[sys.argv.index('--seed') + 1]\n"
        "if seed == '1235':\n"
        "    print('error: something went wrong'); sys.exit(2)\n"
        f"print({LOG!r})\n")
    monkeypatch.setitem(runner.LAUNCHERS, "python", lambda: [sys.executable, str(fake)])
    out = str(tmp_path / "runs")
    d = os.path.join(out, "base", "QQP", "seed1236")
    os.makedirs(d)
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(_result("QQP", 90.0), f)
    logs = []
    status = runner.main(["--checkpoint", "base=/ckpt", "--task", "QQP", "--seeds",
                          "1234-1236", "--data-root", TASKS, "--output-dir", out, "--",
                          "--epochs", "2"], log=logs.append)
    assert status == 1
    text = "\n".join(logs)
    assert "[1/3] base QQP seed 1234: done in" in text and "QQP-acc 69.23, QQP-F1 66.67" in text
    assert "FAILED (exit status 2)" in text and "error: something went wrong" in text
    assert "[3/3] base QQP seed 1236: finished before, skipped" in text
    assert "1 run(s) failed: base QQP seed 1235" in text
    saved = json.load(open(os.path.join(out, "base", "QQP", "seed1234", "result.json")))
    assert saved["epochs"]["1"]["sets"]["dev"]["f1"] == 66.6667
    assert "--seed" in saved["command"] and "--pretrained-checkpoint" in saved["command"]
    with open(os.path.join(out, "finetune_results.md")) as f:
        assert "(2/3 seeds)" in f.read()


def test_dry_run_prints_and_checks_every_command(tmp_path, capsys):
    logs = []
    status = runner.main(["--dry-run", "--checkpoint", "a=/ckpt/a", "--task", "MNLI", "RACE",
                          "--seeds", "1234,1235", "--data-root", "/data", "--model",
                          "bert-large", "--", "--tokenizer-type", "BertWordPieceLowerCase",
                          "--vocab-file", BERT_VOCAB], log=logs.append)
    assert status == 0 and len(logs) == 4
    assert "tasks/main.py --task MNLI --train-data /data/MNLI/train.tsv" in logs[0]
    assert "--seed 1235" in logs[1] and "--num-layers 24" in logs[1]
    # a flag the parser refuses: reported, status 1
    status = runner.main(["--dry-run", "--checkpoint", "a=/ckpt/a", "--task", "RACE",
                          "--seeds", "1234", "--data-root", "/data", "--model", "bert-large",
                          "--micro-batch-size", "5", "--", "--tokenizer-type",
                          "BertWordPieceLowerCase", "--vocab-file", BERT_VOCAB],
                         log=lambda *a: None)
    assert status == 1
    assert "DRY_RUN: rejected: --global-batch-size 32 is not divisible by --micro-batch-size 5" \
        in capsys.readouterr().err


def test_cli_errors_are_one_line():
    for argv, message in ((["--data-root", "/d"], "--checkpoint NAME=DIR is required"),
                          (["--checkpoint", "a=/x", "--checkpoint", "a=/y", "--data-root", "/d"],
                           "names must differ"),
                          (["--checkpoint", "a=/x"], "--data-root is required")):
        with pytest.raises(UserError, match=message):
            runner.parse_cli(argv)


def _tiny_pretrained_bert(tmp_path):
    """A one-iteration pretraining checkpoint of a 2-layer BERT (hidden 32, seq 64) -> dir."""
    import pretrain_bert

    ckpt = str(tmp_path / "bert")
    model = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "64", "--max-position-embeddings", "64",
             "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", BERT_VOCAB,
             "--make-vocab-size-divisible-by", "64"]
    pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=model + [
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr",
        "1e-3", "--mock-data", "--num-workers", "0", "--device", "cpu", "--eval-iters", "0",
        "--save", ckpt], log=lambda *a: None)
    return ckpt


@pytest.mark.slow
def test_tiny_real_run_writes_the_table(tmp_path):
    """Two named checkpoints (one tiny pretrained BERT), MNLI, one seed, one short epoch each
    through the real tasks/main.py: the table holds every run's accuracy."""
    ckpt = _tiny_pretrained_bert(tmp_path)
    out = str(tmp_path / "runs")
    logs = []
    status = runner.main(["--checkpoint", f"baseline={ckpt}", "--checkpoint", f"again={ckpt}",
                          "--task", "MNLI", "--seeds", "1234", "--data-root", TASKS,
                          "--output-dir", out, "--", "--epochs", "1", "--global-batch-size", "8",
                          "--micro-batch-size", "4", "--num-workers", "0", "--device", "cpu",
                          "--log-interval", "10"], log=logs.append)
    assert status == 0, "\n".join(logs)
    with open(os.path.join(out, "finetune_results.csv")) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    assert {(r["checkpoint"], r["column"]) for r in rows} >= {
        ("baseline", "MNLI-m"), ("baseline", "MNLI-mm"), ("again", "MNLI-m")}
    assert all(r["seeds_finished"] == "1" for r in rows if r["column"] != "Avg")
    # the same checkpoint and seed give the same accuracy under both names
    assert [r["values"] for r in rows if r["checkpoint"] == "baseline"] == \
        [r["values"] for r in rows if r["checkpoint"] == "again"]
    log = open(os.path.join(out, "baseline", "MNLI", "seed1234", "log.txt")).read()
    assert "lm_head" in log and "classification_head" in log  # the pretrained load
    again = []
    assert runner.main(["--checkpoint", f"baseline={ckpt}", "--checkpoint", f"again={ckpt}",
                        "--task", "MNLI", "--seeds", "1234", "--data-root", TASKS,
                        "--output-dir", out], log=again.append) == 0
    assert sum("finished before, skipped" in line for line in again) == 2


def _main_with_sigusr1_at(argv, log_txt, marker, timeout=120):
    """runner.main(argv) while a thread sends this process SIGUSR1 (as SLURM sends the batch
    script) once ``marker`` shows in the run's ``log_txt`` -> (status, logged lines)."""
    import signal
    import threading
    import time

    def send():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(log_txt) and marker in open(log_txt).read():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send)
    sender.start()
    logs = []
    try:
        status = runner.main(argv, log=logs.append)
    finally:
        sender.join()
    return status, logs


FAKE_PREEMPTIBLE = """\
import os, signal, sys, time
args = sys.argv[1:]
assert args[args.index('--exit-signal') + 1] == 'SIGUSR1' and '--exit-signal-handler' in args
save = args[args.index('--save') + 1]
marker = os.path.join(save, 'latest_checkpointed_iteration.txt')
if os.path.exists(marker):  # resumed: the last epoch only
    print(LOG.split(' > |epoch: 1|')[0].split('\\n', 1)[0])
    print(' > |epoch: 1|' + LOG.split(' > |epoch: 1|', 1)[1], flush=True)
    sys.exit(0)
if os.environ.get('FAKE_FINISH'):  # a run that is not interrupted
    print(LOG, flush=True)
    sys.exit(0)
def save_and_exit(signum, frame):
    os.makedirs(save, exist_ok=True)
    open(marker, 'w').write('1')
    print('saved after signal', signum, flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, save_and_exit)
print(LOG.split(' > |epoch: 1|')[0], flush=True)  # epoch 0's lines
time.sleep(60)
sys.exit(3)
"""


def test_sigusr1_stops_the_series_saves_resumes_and_requeues(tmp_path, monkeypatch):
    """SIGUSR1 (sbatch --signal=B:USR1@300 to the batch script) while a run trains: the run
    gets it, saves and exits 0; no further run starts; the runner asks SLURM to requeue the job;
    started again it resumes that run, and the result keeps the epochs of both starts."""
    fake = tmp_path / "fake_main.py"
    fake.write_text(f"LOG = {LOG!r}\n" + FAKE_PREEMPTIBLE)
    monkeypatch.setitem(runner.LAUNCHERS, "python", lambda: [sys.executable, str(fake)])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = str(tmp_path / "runs")
    log_txt = os.path.join(out, "base", "QQP", "seed1234", "log.txt")
    argv = ["--checkpoint", "base=/ckpt", "--task", "QQP", "--seeds", "1234-1235",
            "--data-root", TASKS, "--output-dir", out, "--save-checkpoints", "--",
            "--epochs", "2"]

    status, logs = _main_with_sigusr1_at(argv, log_txt, "epoch: 0")
    text = "\n".join(logs)
    assert status == 0, text
    assert "stopped by SIGUSR1 (exit status 0); it resumes from its checkpoint" in text
    assert "seed 1235" not in text  # never started
    assert "stopped by SIGUSR1: 2 run(s) left" in text
    assert open(calls).read().split() == ["requeue", "4242"]
    assert "saved after signal 10" in open(log_txt).read()
    assert not os.path.exists(os.path.join(os.path.dirname(log_txt), "result.json"))

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("FAKE_FINISH", "1")
    logs = []
    assert runner.main(argv, log=logs.append) == 0, "\n".join(logs)
    assert open(calls).read().split() == ["requeue", "4242"]  # not again
    saved = json.load(open(os.path.join(os.path.dirname(log_txt), "result.json")))
    assert set(saved["epochs"]) == {"0", "1"}  # the first start's epoch survives the resume
    assert open(log_txt).read().count("==== ") == 2
    assert os.path.exists(os.path.join(out, "base", "QQP", "seed1235", "result.json"))


@pytest.mark.parametrize("launcher, expected", [("python", "SIGUSR1"), ("torchrun", "SIGTERM")])
def test_run_flags_add_the_exit_handler_for_the_launcher(launcher, expected):
    cli = runner.parse_cli(["--checkpoint", "a=/ckpt", "--data-root", "/d", "--task", "MNLI",
                            "--launcher", launcher, "--save-checkpoints"])
    flags = runner.run_flags(cli, runner.plan(cli)[0])
    assert flags[flags.index("--exit-signal") + 1] == expected
    assert "--exit-signal-handler" in flags
    cli = runner.parse_cli(["--checkpoint", "a=/ckpt", "--data-root", "/d", "--task", "MNLI",
                            "--launcher", "slurm", "--save-checkpoints"])
    assert "--exit-signal-handler" not in runner.run_flags(cli, runner.plan(cli)[0])  # its own


@pytest.mark.slow
def test_preempted_series_resumes_to_the_uninterrupted_result(tmp_path):
    """The real tasks/main.py under the runner with --save-checkpoints: SIGUSR1 during a run's
    first epoch saves it and stops the series; the runner started again resumes it, and every
    epoch's metrics equal those of an uninterrupted series."""
    ckpt = _tiny_pretrained_bert(tmp_path)

    def argv(out):
        return ["--checkpoint", f"base={ckpt}", "--task", "MNLI", "--seeds", "1234",
                "--data-root", TASKS, "--output-dir", out, "--save-checkpoints", "--",
                "--epochs", "3", "--global-batch-size", "1", "--micro-batch-size", "1",
                "--num-workers", "0", "--device", "cpu", "--log-interval", "1"]

    plain = str(tmp_path / "plain")
    assert runner.main(argv(plain), log=lambda *a: None) == 0
    stopped = str(tmp_path / "stopped")
    log_txt = os.path.join(stopped, "base", "MNLI", "seed1234", "log.txt")

    status, logs = _main_with_sigusr1_at(argv(stopped), log_txt, "iteration        5/")
    assert status == 0, "\n".join(logs)
    assert any("stopped by SIGUSR1 (exit status 0)" in line for line in logs), "\n".join(logs)
    assert not os.path.exists(os.path.join(os.path.dirname(log_txt), "result.json"))
    assert runner.main(argv(stopped), log=lambda *a: None) == 0
    text = open(log_txt).read()
    assert text.count("==== ") == 2 and "loaded checkpoint" in text.lower()

    def epochs(out):
        path = os.path.join(out, "base", "MNLI", "seed1234", "result.json")
        return json.load(open(path))["epochs"]

    assert epochs(stopped) == epochs(plain)
    assert set(epochs(plain)) >= {"0", "1", "2"}
