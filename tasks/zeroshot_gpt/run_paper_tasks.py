"""The random-LTD paper's 19 zero-shot tasks (Tab. 1 / Tab. I.1, GPT-3's evaluation set) with
lm-evaluation-harness, for several checkpoints side by side.

    python -m tasks.zeroshot_gpt.run_paper_tasks \\
        --checkpoint baseline=checkpoints/gpt-1.3b --checkpoint random-ltd=checkpoints/gpt-1.3b-ltd \\
        --output-dir results/zero-shot --device cuda --batch-size 16 --dtype bfloat16

Each paper task maps to an lm-eval 0.4 task and the metric the paper reports (``PAPER_TASKS``).
The runner works offline by default (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1): it evaluates the
tasks whose data is in the Hugging Face datasets cache (download them once on a connected
machine, e.g. ``python -m tasks.lm_eval_adapter --model megatron-ltd ... --tasks hellaswag
--limit 1``, or ``datasets.load_dataset``), and names every task it lacks data for and why.
Tasks kept elsewhere are given as local YAML tasks: ``--include-path DIR --task-map
PIQA=my_local_piqa`` (see tests/assets/lm_eval for the format: ``dataset_path: json`` with
local ``data_files``). ``--online`` lets lm-eval download what is missing.

Writes ``zero_shot.md`` (one column per checkpoint: value ± stderr, in percent, and the average
over the tasks evaluated) and ``zero_shot.csv`` (one row per task and checkpoint), plus lm-eval's
full results per checkpoint (``lm_eval_<name>.json``).
"""

import argparse
import collections
import csv
import json
import math
import os
import sys

if __name__ == "__main__":
    # Run as a file: its directory holds datasets.py, which must not hide Hugging Face's.
    HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from megatron.errors import UserError, run_main  # noqa: E402

PaperTask = collections.namedtuple("PaperTask", "name lm_eval_task metric")

# The paper's table order; metrics as GPT-3 reports them (accuracy; exact match for the
# closed-book QA tasks; F1 for ReCoRD). lm-eval's 'race' is RACE-h, 'rte' GLUE's RTE, 'wsc',
# 'boolq', 'copa', 'multirc' and 'record' SuperGLUE's, 'lambada_openai' GPT-3's LAMBADA.
PAPER_TASKS = (
    PaperTask("HellaSwag", "hellaswag", "acc"),
    PaperTask("LAMBADA", "lambada_openai", "acc"),
    PaperTask("TriviaQA", "triviaqa", "exact_match"),
    PaperTask("WebQs", "webqs", "exact_match"),
    PaperTask("Winogrande", "winogrande", "acc"),
    PaperTask("PIQA", "piqa", "acc"),
    PaperTask("ARC-Challenge", "arc_challenge", "acc"),
    PaperTask("ARC-Easy", "arc_easy", "acc"),
    PaperTask("OpenBookQA", "openbookqa", "acc"),
    PaperTask("RACE-h", "race", "acc"),
    PaperTask("BoolQ", "boolq", "acc"),
    PaperTask("COPA", "copa", "acc"),
    PaperTask("RTE", "rte", "acc"),
    PaperTask("WSC", "wsc", "acc"),
    PaperTask("MultiRC", "multirc", "acc"),
    PaperTask("ReCoRD", "record", "f1"),
    PaperTask("ANLI-R1", "anli_r1", "acc"),
    PaperTask("ANLI-R2", "anli_r2", "acc"),
    PaperTask("ANLI-R3", "anli_r3", "acc"),
)


def parse_pairs(values, flag):
    """['NAME=VALUE', ...] -> {NAME: VALUE} in order (one clear error for a malformed one)."""
    out = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UserError(f"{flag} {value}: expected NAME=VALUE")
        if name in out:
            raise UserError(f"{flag} {name}: given twice")
        out[name] = rest
    return out


def select_tasks(names=None, task_map=None):
    """The paper tasks to run (``names``: a subset by paper name), each with its lm-eval task
    replaced where ``task_map`` {paper name: 'task' or 'task:metric'} says so."""
    by_name = {t.name: t for t in PAPER_TASKS}
    for name in list(task_map or {}) + list(names or []):
        if name not in by_name:
            raise UserError(f"{name}: not one of the paper's tasks ({', '.join(by_name)})")
    chosen = [by_name[n] for n in names] if names else list(PAPER_TASKS)
    out = []
    for task in chosen:
        if task.name in (task_map or {}):
            lm_task, _, metric = task_map[task.name].partition(":")
            task = task._replace(lm_eval_task=lm_task, metric=metric or task.metric)
        out.append(task)
    return out


def _is_missing_data(err):
    """A load failure that means the data is not here (offline, not cached, no such file)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"ConnectionError", "FileNotFoundError", "DatasetNotFoundError",
                         "OfflineModeIsEnabled", "EmptyDatasetError"})


def find_local_tasks(task_manager, tasks):
    """({paper name: PaperTask} loadable here, {paper name: why not}). Loading a task reads its
    data (from the cache or local files when offline)."""
    available, missing = {}, {}
    for task in tasks:
        try:
            task_manager.load([task.lm_eval_task])
        except Exception as err:  # noqa: BLE001 - any failure is reported per task
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            kind = "no local data" if _is_missing_data(err) else "cannot load"
            missing[task.name] = f"{kind} ({task.lm_eval_task}: {type(err).__name__}: {first})"
        else:
            available[task.name] = task
    return available, missing


def evaluate_checkpoint(load, tasks, task_manager, opts):
    """lm-eval's results for ``tasks`` (PaperTask) on the checkpoint ``load``, zero-shot."""
    import lm_eval

    from tasks.lm_eval_adapter import MegatronLM

    model = MegatronLM(load=load, device=opts.device, batch_size=opts.batch_size,
                       dtype=opts.dtype)
    return lm_eval.simple_evaluate(model=model, tasks=[t.lm_eval_task for t in tasks],
                                   task_manager=task_manager, num_fewshot=0, limit=opts.limit,
                                   log_samples=False)


def metric_of(results, task):
    """(value, stderr) in percent of ``task``'s metric in lm-eval's results (stderr None when
    lm-eval has none)."""
    entry = results["results"].get(task.lm_eval_task, {})
    key = f"{task.metric},none"
    if key not in entry:
        raise UserError(f"lm-eval reported no {task.metric!r} for {task.lm_eval_task} (has "
                        f"{', '.join(k for k in entry if ',' in k)}); give the metric with "
                        f"--task-map {task.name}={task.lm_eval_task}:METRIC")
    stderr = entry.get(f"{task.metric}_stderr,none")
    stderr = float(stderr) * 100 if isinstance(stderr, (int, float)) else None
    return float(entry[key]) * 100, stderr


def _cell(value, stderr):
    if value is None:
        return "n/a"
    return f"{value:.2f}" if stderr is None or math.isnan(stderr) else \
        f"{value:.2f} ± {stderr:.2f}"


def write_tables(scores, tasks, missing, out_dir):
    """zero_shot.md and zero_shot.csv from ``scores`` {checkpoint: {paper name: (value,
    stderr)}} over ``tasks``; ``missing`` {paper name: reason}. Returns the Markdown text."""
    names = list(scores)
    done = [t for t in tasks if t.name not in missing]
    lines = ["| Task | lm-eval task | Metric | " + " | ".join(names) + " |",
             "|---|---|---|" + "---:|" * len(names)]
    for task in tasks:
        if task.name in missing:
            cells = ["no data"] * len(names)
        else:
            cells = [_cell(*scores[n][task.name]) for n in names]
        lines.append(f"| {task.name} | {task.lm_eval_task} | {task.metric} | "
                     + " | ".join(cells) + " |")
    averages = {n: sum(scores[n][t.name][0] for t in done) / len(done) if done else None
                for n in names}
    lines.append(f"| **Average ({len(done)} of {len(tasks)} tasks)** | | | "
                 + " | ".join(_cell(averages[n], None) for n in names) + " |")
    if missing:
        lines += ["", f"Not evaluated ({len(missing)} of {len(tasks)}):"]
        lines += [f"- {name}: {why}" for name, why in missing.items()]
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "zero_shot.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "zero_shot.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "lm_eval_task", "metric", "checkpoint", "value", "stderr",
                         "status"])
        for task in tasks:
            for n in names:
                if task.name in missing:
                    writer.writerow([task.name, task.lm_eval_task, task.metric, n, "", "",
                                     missing[task.name]])
                else:
                    value, stderr = scores[n][task.name]
                    writer.writerow([task.name, task.lm_eval_task, task.metric, n,
                                     f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                                     "ok"])
        for n in names:
            writer.writerow(["Average", "", f"{len(done)} tasks", n,
                             "" if averages[n] is None else f"{averages[n]:.4f}", "", ""])
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR",
                   help="a checkpoint to evaluate, named for the table's column (repeat)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tasks", default=None,
                   help="comma-separated paper task names (default: all 19)")
    p.add_argument("--task-map", action="append", default=None, metavar="NAME=TASK[:METRIC]",
                   help="use another lm-eval task (e.g. a local YAML task) for a paper task")
    p.add_argument("--include-path", action="append", default=None,
                   help="a directory of extra lm-eval YAML tasks (repeat for several)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (lm-eval's --limit; for smoke tests)")
    p.add_argument("--online", action="store_true",
                   help="let lm-eval download missing datasets (default: offline)")
    opts = p.parse_args(argv)
    opts.checkpoints = parse_pairs(opts.checkpoint, "--checkpoint")
    for name, path in opts.checkpoints.items():
        if not os.path.isdir(path):
            raise UserError(f"--checkpoint {name}={path}: not a directory")
    opts.task_names = [t.strip() for t in opts.tasks.split(",") if t.strip()] \
        if opts.tasks else None
    return opts


def main(argv=None, log=print):
    """Evaluate every checkpoint on the paper's tasks that have data here; returns
    ({checkpoint: {task: (value, stderr)}}, {task: why it was not evaluated})."""
    opts = parse_args(argv)
    if not opts.online:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    tasks = select_tasks(opts.task_names, parse_pairs(opts.task_map, "--task-map"))
    task_manager = TaskManager(include_path=opts.include_path)
    available, missing = find_local_tasks(task_manager, tasks)
    log(f"zero-shot tasks with data here: {len(available)} of {len(tasks)}")
    for name, why in missing.items():
        log(f"  lacking {name}: {why}")
    os.makedirs(opts.output_dir, exist_ok=True)
    scores = {}
    for name, load in opts.checkpoints.items():
        scores[name] = {}
        if available:
            results = evaluate_checkpoint(load, list(available.values()), task_manager, opts)
            with open(os.path.join(opts.output_dir, f"lm_eval_{name}.json"), "w") as f:
                json.dump(results["results"], f, indent=1, default=str)
            scores[name] = {t: metric_of(results, task) for t, task in available.items()}
    log(write_tables(scores, tasks, missing, opts.output_dir))
    return scores, missing


if __name__ == "__main__":
    run_main(main)
