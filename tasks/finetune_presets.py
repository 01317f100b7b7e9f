"""The paper's finetuning settings (random-LTD, Yao et al. 2022, Tab. 2 / E.1, BERT-large on
GLUE MNLI / QQP and RACE) as tasks/main.py flags, and the data layout and result columns of each
task (used by tasks/run_finetune_seeds.py and examples/finetune_*.sh).

Per task (the paper): MNLI 10 epochs, global batch 128, lr 1e-5; QQP 12, 128, 5e-5; RACE 3, 32,
2e-5. Shared, as Megatron-LM's finetune examples (examples/finetune_{mnli,race}_distributed.sh):
linear LR decay after a warmup of 6.5% of the run, weight decay 0.1, gradient clipping 1.0,
hidden and attention dropout 0.1, Adam with Megatron's defaults (beta1 0.9, beta2 0.999,
eps 1e-8); five seeds 1234-1238.

Data (not shipped; tests use invented fixtures in tests/assets/tasks): GLUE's MNLI and QQP
from https://gluebenchmark.com/tasks (the MNLI.zip / QQP-clean.zip archives, unpacked to
<data-root>/MNLI and <data-root>/QQP), RACE from https://www.cs.cmu.edu/~glai1/data/race/
(RACE.tar.gz, unpacked to <data-root>/RACE with train/dev/test x middle/high).

    from tasks.finetune_presets import task_flags
    task_flags("MNLI", "/data")  # -> ["--task", "MNLI", "--train-data", ..., "--lr", "1e-05", ...]
"""

import dataclasses
import os
from typing import Tuple

SEEDS = (1234, 1235, 1236, 1237, 1238)

#: Megatron-LM's finetuning settings shared by every task (flag, value).
COMMON_FLAGS = (
    ("--lr-decay-style", "linear"),
    ("--lr-warmup-fraction", "0.065"),
    ("--weight-decay", "0.1"),
    ("--clip-grad", "1.0"),
    ("--hidden-dropout", "0.1"),
    ("--attention-dropout", "0.1"),
    ("--adam-beta1", "0.9"),
    ("--adam-beta2", "0.999"),
    ("--adam-eps", "1e-08"),
)

#: The paper's BERT-large (Megatron's 336M BERT), for --model bert-large.
BERT_LARGE_FLAGS = ("--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16",
                    "--seq-length", "512", "--max-position-embeddings", "512")


@dataclasses.dataclass(frozen=True)
class Column:
    """One result column of the paper's table: ``metric`` ('accuracy' or 'f1') of the
    evaluation set ``dataset`` ('overall' for the overall line)."""

    name: str
    dataset: str
    metric: str = "accuracy"
    in_average: bool = True


@dataclasses.dataclass(frozen=True)
class FinetunePreset:
    """One task's paper settings, data layout (relative to the task's directory) and columns."""

    task: str
    epochs: int
    global_batch_size: int
    lr: float
    micro_batch_size: int
    """Per-GPU micro-batch of Megatron's examples (MNLI/QQP 8, RACE 4); any divisor works."""
    train: Tuple[str, ...]
    valid: Tuple[str, ...]
    columns: Tuple[Column, ...]


PRESETS = {
    "MNLI": FinetunePreset(
        "MNLI", epochs=10, global_batch_size=128, lr=1e-5, micro_batch_size=8,
        train=("train.tsv",), valid=("dev_matched.tsv", "dev_mismatched.tsv"),
        columns=(Column("MNLI-m", "dev-matched"), Column("MNLI-mm", "dev-mismatched"))),
    "QQP": FinetunePreset(
        "QQP", epochs=12, global_batch_size=128, lr=5e-5, micro_batch_size=8,
        train=("train.tsv",), valid=("dev.tsv",),
        columns=(Column("QQP-acc", "dev"), Column("QQP-F1", "dev", "f1"))),
    "RACE": FinetunePreset(
        "RACE", epochs=3, global_batch_size=32, lr=2e-5, micro_batch_size=4,
        train=("train/middle", "train/high"), valid=("dev/middle", "dev/high"),
        columns=(Column("RACE-m", "dev-middle"), Column("RACE-h", "dev-high"),
                 Column("RACE", "overall", in_average=False))),
}


def preset(task: str) -> FinetunePreset:
    """The preset of ``task`` (MNLI, QQP, RACE); a one-line error for another name."""
    from megatron.errors import UserError

    if task not in PRESETS:
        raise UserError(f"task {task}: presets exist for {', '.join(PRESETS)}")
    return PRESETS[task]


def task_data_dir(task: str, data_root: str) -> str:
    """Where the task's files live under ``data_root``: <data_root>/<TASK> (GLUE's and RACE's
    directory names: MNLI/, QQP/, RACE/)."""
    return os.path.join(data_root, task)


def task_flags(task: str, data_root: str, micro_batch_size: int = None) -> list:
    """tasks/main.py flags of the paper's run of ``task`` on the data under ``data_root``
    (without the checkpoint, the model shape, the seed and the parallel layout)."""
    p = preset(task)
    directory = task_data_dir(task, data_root)
    flags = ["--task", task, "--train-data", *[os.path.join(directory, t) for t in p.train],
             "--valid-data", *[os.path.join(directory, v) for v in p.valid],
             "--epochs", str(p.epochs), "--global-batch-size", str(p.global_batch_size),
             "--micro-batch-size", str(micro_batch_size or p.micro_batch_size),
             "--lr", repr(p.lr)]
    for flag, value in COMMON_FLAGS:
        flags += [flag, value]
    return flags
