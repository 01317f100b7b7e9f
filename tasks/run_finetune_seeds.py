"""Run the paper's finetuning over seeds and write its table (random-LTD, Tab. 2 / E.1): for
each pretrained checkpoint, task and seed one tasks/main.py run with the paper's settings
(tasks/finetune_presets.py); then per task the median and the best over the seeds (MNLI-m/mm
accuracy, QQP accuracy and F1, RACE-m, RACE-h and overall accuracy) and their average, as
Markdown and CSV, the checkpoints side by side.

    python tasks/run_finetune_seeds.py --data-root /data/finetune \\
        --checkpoint baseline=checkpoints/bert-large-dense \\
        --checkpoint random-ltd=checkpoints/bert-large-random-ltd-2 \\
        --task MNLI QQP RACE --output-dir finetune-runs --launcher torchrun -- --fp16

<data-root> holds GLUE's MNLI/ (train.tsv, dev_matched.tsv, dev_mismatched.tsv) and QQP/
(train.tsv, dev.tsv) and RACE/ (train|dev/middle|high/*.txt). Each run writes
<output-dir>/<checkpoint>/<task>/seed<S>/log.txt and, once it finished, result.json with the
accuracy (and F1) of every epoch parsed from Megatron's lines; a run with result.json is skipped
when the runner is started again (resumable; --save-checkpoints also resumes an interrupted run
from its own checkpoint). The tables (<output-dir>/finetune_results.{md,csv}) are rewritten
after every run from what has finished. A run's value is its last epoch's (--epoch-select best:
the epoch with the best overall accuracy). Flags after ``--`` go to every run (they win over the
presets'). --dry-run prints the commands and checks their flags (through the launcher's DRY_RUN
for torchrun/slurm); --table-only rebuilds the tables from the results on disk.

Launchers: python (one process, default), torchrun (examples/run_torchrun.sh, GPUS_PER_NODE
processes) or slurm (examples/run_slurm.sbatch inside an allocation: srun over its tasks).

Preemption: SIGUSR1 (what ``#SBATCH --signal=B:USR1@300`` sends to the batch script, i.e. this
process in examples/finetune_*.sh), SIGTERM or Ctrl-C stop the series. The signal goes on to
the running finetune (SIGUSR1 through the slurm launcher to every task, SIGTERM to torchrun,
which passes it to its workers); with --save-checkpoints it runs with --exit-signal-handler, so
it saves at the end of its current iteration and exits 0. No further run starts, and the next
start of the runner resumes the stopped run from its checkpoint (without --save-checkpoints it
starts over). Inside a SLURM job, after SIGUSR1 the runner requeues the job (``scontrol
requeue``; REQUEUE=0 in the environment: no requeue), so a preempted series finishes by itself.
"""

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

from megatron.dist_signal_handler import DistributedSignalHandler  # noqa: E402
from megatron.errors import UserError, run_main  # noqa: E402
from tasks.finetune_presets import BERT_LARGE_FLAGS, PRESETS, SEEDS, task_flags  # noqa: E402

LAUNCHERS = {
    "python": lambda: [sys.executable, os.path.join(ROOT, "tasks", "main.py")],
    "torchrun": lambda: ["bash", os.path.join(ROOT, "examples", "run_torchrun.sh"),
                         os.path.join(ROOT, "tasks", "main.py")],
    "slurm": lambda: ["bash", os.path.join(ROOT, "examples", "run_slurm.sbatch"),
                      os.path.join(ROOT, "tasks", "main.py")],
}
METRIC = re.compile(r"^ > \|epoch: (-?\d+)\| metrics for (\S+): correct / total = (\d+) / (\d+) "
                    r"= ([\d.]+) %")
F1 = re.compile(r"^ > \|epoch: (-?\d+)\| f1 for (\S+): tp / fp / fn = (\d+) / (\d+) / (\d+), "
                r"f1 = ([\d.]+) %")
OVERALL = re.compile(r"^ >> \|epoch: (-?\d+)\| overall: correct / total = (\d+) / (\d+) = "
                     r"([\d.]+) %")
OVERALL_F1 = re.compile(r"^ >> \|epoch: (-?\d+)\| overall: f1 = ([\d.]+) %")
RESULT = "result.json"
TABLE = "finetune_results"


# -- command line -------------------------------------------------------------------------------

def parse_seeds(text: str) -> List[int]:
    """'1234-1238' or '1234,1236' (or a mix) -> seeds."""
    seeds = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                seeds += list(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"--seeds {text}: expected e.g. 1234-1238 or 1234,1235") from None
    if not seeds:
        raise UserError(f"--seeds {text}: no seed")
    return seeds


def parse_checkpoint(text: str):
    """'name=dir' (or a bare dir, named after it) -> (name, dir)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(text)), text
    if not name or not path or "/" in name:
        raise UserError(f"--checkpoint {text}: expected NAME=DIR (e.g. baseline=checkpoints/"
                        "bert-large)")
    return name, path


def parse_cli(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                   help="a pretrained checkpoint (repeat to compare several)")
    p.add_argument("--task", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--data-root", default=None,
                   help="directory holding MNLI/, QQP/ and RACE/")
    p.add_argument("--seeds", default=f"{SEEDS[0]}-{SEEDS[-1]}")
    p.add_argument("--output-dir", default="finetune-runs")
    p.add_argument("--launcher", choices=list(LAUNCHERS), default="python")
    p.add_argument("--model", choices=["checkpoint", "bert-large"], default="checkpoint",
                   help="the model flags: from the checkpoint (--use-checkpoint-args) or the "
                        "paper's BERT-large")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="per-GPU micro-batch (default: the preset's)")
    p.add_argument("--epoch-select", choices=["last", "best"], default="last")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="each run saves to and resumes from <run dir>/checkpoints")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--table-only", action="store_true")
    cli = p.parse_args(argv)
    cli.extra = extra
    cli.seed_list = parse_seeds(cli.seeds)
    cli.checkpoints = [parse_checkpoint(c) for c in cli.checkpoint]
    if not cli.checkpoints:
        raise UserError("--checkpoint NAME=DIR is required (repeat it to compare checkpoints)")
    names = [n for n, _ in cli.checkpoints]
    if len(set(names)) != len(names):
        raise UserError(f"--checkpoint: names must differ, got {', '.join(names)}")
    if cli.data_root is None and not cli.table_only:
        raise UserError("--data-root is required (the directory holding MNLI/, QQP/, RACE/)")
    return cli


# -- runs ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    checkpoint: str
    path: str
    task: str
    seed: int

    def directory(self, output_dir):
        return os.path.join(output_dir, self.checkpoint, self.task, f"seed{self.seed}")


def plan(cli) -> List[Run]:
    return [Run(name, path, task, seed) for name, path in cli.checkpoints for task in cli.task
            for seed in cli.seed_list]


def run_flags(cli, run: Run) -> List[str]:
    """tasks/main.py flags of one run: the preset, the model, the checkpoint, the seed, the
    user's extra flags last (they win)."""
    flags = task_flags(run.task, cli.data_root, cli.micro_batch_size)
    flags += ["--use-checkpoint-args"] if cli.model == "checkpoint" else list(BERT_LARGE_FLAGS)
    flags += ["--pretrained-checkpoint", run.path, "--seed", str(run.seed)]
    if cli.save_checkpoints:
        ckpt = os.path.join(run.directory(cli.output_dir), "checkpoints")
        flags += ["--save", ckpt, "--load", ckpt]
        if cli.launcher != "slurm":  # run_slurm.sbatch adds these itself, for SIGUSR1
            flags += ["--exit-signal-handler", "--exit-signal", FORWARD[cli.launcher][
                signal.SIGUSR1].name]
    return flags + cli.extra


def final_epoch(flags) -> int:
    """The last epoch's number in Megatron's lines (from 0) for the run's --epochs (the last
    one given wins, as the parser's)."""
    at = len(flags) - 1 - flags[::-1].index("--epochs")
    return int(flags[at + 1]) - 1


def run_command(cli, run: Run) -> List[str]:
    return LAUNCHERS[cli.launcher]() + run_flags(cli, run)


def parse_log(lines) -> Dict[int, dict]:
    """Megatron's metric lines -> {epoch: {'sets': {name: {...}}, 'overall': {...}}}."""
    epochs: Dict[int, dict] = {}

    def entry(epoch):
        return epochs.setdefault(int(epoch), {"sets": {}, "overall": {}})

    for line in lines:
        if m := METRIC.match(line):
            entry(m[1])["sets"].setdefault(m[2], {}).update(
                correct=int(m[3]), total=int(m[4]), accuracy=float(m[5]))
        elif m := F1.match(line):
            entry(m[1])["sets"].setdefault(m[2], {}).update(
                tp=int(m[3]), fp=int(m[4]), fn=int(m[5]), f1=float(m[6]))
        elif m := OVERALL.match(line):
            entry(m[1])["overall"].update(correct=int(m[2]), total=int(m[3]),
                                          accuracy=float(m[4]))
        elif m := OVERALL_F1.match(line):
            entry(m[1])["overall"]["f1"] = float(m[2])
    return epochs


def atomic_write(path, text):
    """Write ``text`` to ``path`` through a temporary name (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_result(directory) -> Optional[dict]:
    path = os.path.join(directory, RESULT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


#: The signal each launcher's process gets when the runner gets SIGUSR1 or SIGTERM. SIGINT
#: is not passed on: a terminal's Ctrl-C reaches the whole foreground process group already.
#: torchrun passes SIGTERM to its workers (and kills them 30 s later); SIGUSR1 would kill it.
FORWARD = {
    "python": {signal.SIGUSR1: signal.SIGUSR1, signal.SIGTERM: signal.SIGTERM},
    "torchrun": {signal.SIGUSR1: signal.SIGTERM, signal.SIGTERM: signal.SIGTERM},
    "slurm": {signal.SIGUSR1: signal.SIGUSR1, signal.SIGTERM: signal.SIGTERM},
}


class StopSignals(DistributedSignalHandler):
    """Records the first of SIGUSR1, SIGTERM and SIGINT (a second Ctrl-C stops at once) and
    passes it on to the running finetune's process (``child``) as ``FORWARD`` says."""

    def __init__(self, launcher: str):
        super().__init__((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))
        self.forward = FORWARD[launcher]
        self.child: Optional[subprocess.Popen] = None

    def _handle(self, signum, frame):
        super()._handle(signum, frame)
        self.pass_on(signal.Signals(signum))

    def pass_on(self, sig: signal.Signals) -> None:
        """Send the running finetune what ``sig`` maps to (nothing when none is running)."""
        target, child = self.forward.get(sig), self.child
        if target is not None and child is not None and child.poll() is None:
            child.send_signal(target)


def execute(cli, run: Run, log=print, stop: Optional[StopSignals] = None) -> Optional[dict]:
    """Run one finetuning (its output appended to log.txt, so a resumed run keeps the metrics
    of its earlier epochs); -> the result written to result.json, or None if it failed (the end
    of its log is printed) or was stopped by a signal (``stop.received``)."""
    directory = run.directory(cli.output_dir)
    os.makedirs(directory, exist_ok=True)
    log_path = os.path.join(directory, "log.txt")
    start = time.time()
    command = run_command(cli, run)
    with open(log_path, "a") as out:
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} started: "
                  f"{' '.join(shlex.quote(a) for a in command)}\n")
        out.flush()
        # run_slurm.sbatch would requeue the job itself after SIGUSR1: the runner does it,
        # once, after the series has stopped (requeue_slurm_job)
        env = {**os.environ, "REQUEUE": "0"} if cli.launcher == "slurm" else None
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if stop is not None:
            stop.child = child
            if stop.received is not None:  # it came while the process was being started
                stop.pass_on(stop.received)
        try:
            returncode = child.wait()
        finally:
            if stop is not None:
                stop.child = None
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    epochs = parse_log(lines)
    last = final_epoch(run_flags(cli, run))
    if stop is not None and stop.received is not None and (returncode != 0 or
                                                            last not in epochs):
        resume = "resumes from its checkpoint" if cli.save_checkpoints else "starts over"
        log(f"    stopped by {stop.received.name} (exit status {returncode}); it {resume} "
            f"when the runner is started again")
        return None
    if returncode != 0 or last not in epochs:
        why = f"exit status {returncode}" if returncode else \
            f"no metrics of epoch {last} in the log"
        log(f"    FAILED ({why}); the end of {log_path}:")
        for line in lines[-5:]:
            log(f"      {line}")
        return None
    result = {"checkpoint": run.checkpoint, "pretrained_checkpoint": run.path,
              "task": run.task, "seed": run.seed, "seconds": round(time.time() - start, 1),
              "command": command, "epochs": {str(e): v for e, v in epochs.items()}}
    atomic_write(os.path.join(directory, RESULT), json.dumps(result, indent=1))
    return result


# -- the table ----------------------------------------------------------------------------------

def column_value(result: dict, column, select="last") -> Optional[float]:
    """The run's value of ``column`` at its last epoch, or at the epoch with the best overall
    accuracy (``select`` 'best')."""
    epochs = {int(e): v for e, v in result["epochs"].items() if int(e) >= 0}
    if not epochs:
        return None
    if select == "best":
        epoch = max(epochs, key=lambda e: (epochs[e]["overall"].get("accuracy", -1.0), -e))
    else:
        epoch = max(epochs)
    found = epochs[epoch]["overall"] if column.dataset == "overall" \
        else epochs[epoch]["sets"].get(column.dataset, {})
    return found.get(column.metric)


@dataclasses.dataclass
class Cell:
    """Median and best of one column over the finished seeds."""

    values: List[float]
    seeds: int

    @property
    def median(self):
        return statistics.median(self.values) if self.values else None

    @property
    def best(self):
        return max(self.values) if self.values else None


def summarize(cli, results: Dict[Run, dict]):
    """-> ([column names], {checkpoint: {column name: Cell}}) with 'Avg' (the mean of the
    medians and of the bests of the averaged columns, once each has a value)."""
    columns = [c for task in cli.task for c in PRESETS[task].columns]
    table = {}
    for name, _ in cli.checkpoints:
        row = {}
        for task in cli.task:
            for column in PRESETS[task].columns:
                values = [column_value(r, column, cli.epoch_select)
                          for run, r in results.items()
                          if run.checkpoint == name and run.task == task]
                row[column.name] = Cell([v for v in values if v is not None],
                                        len(cli.seed_list))
        averaged = [row[c.name] for c in columns if c.in_average]
        if averaged and all(cell.values for cell in averaged):
            row["Avg"] = Cell([statistics.fmean(c.median for c in averaged),
                               statistics.fmean(c.best for c in averaged)], 0)
        table[name] = row
    return [c.name for c in columns] + ["Avg"], table


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def markdown_table(cli, names, table) -> str:
    seeds = f"{cli.seed_list[0]}-{cli.seed_list[-1]}" if cli.seed_list == list(
        range(cli.seed_list[0], cli.seed_list[-1] + 1)) else ",".join(map(str, cli.seed_list))
    lines = [f"Finetuning on the dev sets: median / best over seeds {seeds} "
             f"({cli.epoch_select} epoch); Avg = mean of the medians / of the bests of "
             f"{', '.join(n for n in names if n not in ('Avg', 'RACE'))}.", "",
             "| checkpoint | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for checkpoint, row in table.items():
        cells = []
        for name in names:
            cell = row.get(name)
            if cell is None or not cell.values:
                cells.append("-")
            elif name == "Avg":
                cells.append(f"{_fmt(cell.values[0])} / {_fmt(cell.values[1])}")
            else:
                partial = f" ({len(cell.values)}/{cell.seeds} seeds)" \
                    if len(cell.values) < cell.seeds else ""
                cells.append(f"{_fmt(cell.median)} / {_fmt(cell.best)}{partial}")
        lines.append(f"| {checkpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(names, table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["checkpoint", "column", "median", "best", "seeds_finished", "values"])
    for checkpoint, row in table.items():
        for name in names:
            cell = row.get(name)
            if cell is None:
                continue
            if name == "Avg":
                writer.writerow([checkpoint, name, _fmt(cell.values[0]), _fmt(cell.values[1]),
                                 "", ""])
            else:
                writer.writerow([checkpoint, name, _fmt(cell.median), _fmt(cell.best),
                                 len(cell.values), " ".join(f"{v:.4f}" for v in cell.values)])
    return out.getvalue()


def write_tables(cli, results) -> str:
    """Write <output-dir>/finetune_results.{md,csv}; returns the Markdown."""
    names, table = summarize(cli, results)
    os.makedirs(cli.output_dir, exist_ok=True)
    md = markdown_table(cli, names, table)
    atomic_write(os.path.join(cli.output_dir, TABLE + ".md"), md)
    atomic_write(os.path.join(cli.output_dir, TABLE + ".csv"), csv_table(names, table))
    return md


# -- main -----------------------------------------------------------------------------------------

def dry_run(cli, runs, log=print) -> int:
    """Print each command; check its flags (the python launcher here, the others through
    their DRY_RUN). Returns 0 when every command is accepted, else 1."""
    from tasks.main import parse_task_args

    status = 0
    for run in runs:
        command = run_command(cli, run)
        if cli.launcher != "python":
            done = subprocess.run(command, env={**os.environ, "DRY_RUN": "1"})
            status |= int(done.returncode != 0)
            continue
        log(" ".join(shlex.quote(a) for a in command))
        try:
            parse_task_args(run_flags(cli, run), world_size=1)
        except UserError as err:
            print(f"DRY_RUN: rejected: {err}", file=sys.stderr)
            status = 1
    return status


def main(argv=None, log=print):
    cli = parse_cli(argv)
    runs = plan(cli)
    if cli.dry_run:
        return dry_run(cli, runs, log)
    results = {r: res for r in runs if (res := read_result(r.directory(cli.output_dir)))}
    failed = []
    stop = StopSignals(cli.launcher)
    if not cli.table_only:
        with stop:
            _run_all(cli, runs, results, failed, stop, log)
    md = write_tables(cli, results)
    log(md)
    if stop.received is not None:
        left = sum(run not in results for run in runs)
        log(f"stopped by {stop.received.name}: {left} run(s) left; start the runner again to "
            f"finish them")
        requeue_slurm_job(stop.received, log)
    if failed:
        log(f"{len(failed)} run(s) failed: " + "; ".join(
            f"{r.checkpoint} {r.task} seed {r.seed}" for r in failed))
        return 1
    return 0


def requeue_slurm_job(received, log=print) -> None:
    """After SIGUSR1 inside a SLURM batch job (and unless REQUEUE=0): ``scontrol requeue`` the
    job, which runs this script again from the start; its finished runs are skipped."""
    job = os.environ.get("SLURM_JOB_ID")
    if received != signal.SIGUSR1 or not job or os.environ.get("REQUEUE", "1") != "1":
        return
    log(f"requeueing SLURM job {job} (restart {int(os.environ.get('SLURM_RESTART_COUNT', 0)) + 1})")
    try:
        done = subprocess.run(["scontrol", "requeue", job])
        ok = done.returncode == 0
    except OSError:
        ok = False
    if not ok:
        log(f"scontrol requeue {job} failed; submit the same command again to resume")


def _run_all(cli, runs, results, failed, stop, log):
    for i, run in enumerate(runs, start=1):
        head = f"[{i}/{len(runs)}] {run.checkpoint} {run.task} seed {run.seed}"
        if stop.received is not None:
            return
        if run in results:
            log(f"{head}: finished before, skipped")
            continue
        log(f"{head}: running ({run.directory(cli.output_dir)}/log.txt)")
        result = execute(cli, run, log, stop)
        if result is None:
            if stop.received is None:
                failed.append(run)
            continue
        results[run] = result
        values = ", ".join(f"{c.name} {_fmt(column_value(result, c, cli.epoch_select))}"
                           for c in PRESETS[run.task].columns)
        log(f"{head}: done in {result['seconds']:.0f} s: {values}")
        write_tables(cli, results)


if __name__ == "__main__":
    sys.exit(run_main(main))
