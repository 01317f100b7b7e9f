"""Finetune and evaluate on downstream tasks, as Megatron-LM's tasks/main.py.

    python tasks/main.py --task MNLI --train-data $MNLI/train.tsv \
        --valid-data $MNLI/dev_matched.tsv $MNLI/dev_mismatched.tsv \
        --pretrained-checkpoint checkpoints/bert-large --epochs 10 ... (model/optimizer flags)

Tasks: MNLI and QQP (tasks/glue), RACE (tasks/race), LAMBADA and WIKITEXT103 (zero-shot GPT,
tasks/zeroshot_gpt). Every task runs through the pretraining loop (``megatron.training``), so
tensor, pipeline and data parallelism, checkpoints (``--save``/``--load`` resume) and logging
are the same as pretraining's; ``--pretrained-checkpoint`` supplies the starting weights (any
TP/PP layout, weights only) when the run does not resume from its own ``--load``.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # before torch's import: a SLURM signal during start-up is kept
    from megatron.dist_signal_handler import hold_exit_signals_until_ready

    hold_exit_signals_until_ready(sys.argv[1:])

from megatron.arguments import parse_args  # noqa: E402
from megatron.errors import UserError, run_main  # noqa: E402

GLUE_TASKS = ("MNLI", "QQP")
ZEROSHOT_TASKS = ("LAMBADA", "WIKITEXT103")
TASKS = GLUE_TASKS + ("RACE",) + ZEROSHOT_TASKS


def get_tasks_args(parser):
    """Megatron-LM's 'tasks' flags (same names and defaults)."""
    group = parser.add_argument_group(title="tasks")
    group.add_argument("--task", type=str, required=True, help=f"one of {', '.join(TASKS)}")
    group.add_argument("--epochs", type=int, default=None,
                       help="Number of finetuning epochs. Zero results in evaluation only.")
    group.add_argument("--pretrained-checkpoint", type=str, default=None,
                       help="Pretrained checkpoint used for finetuning (weights only, any "
                            "TP/PP layout).")
    group.add_argument("--keep-last", action="store_true",
                       help="Keep the last batch (maybe incomplete) in the data loader.")
    group.add_argument("--train-data", nargs="+", default=None,
                       help="Whitespace separated paths or corpora names for training.")
    group.add_argument("--valid-data", nargs="*", default=None, help="path(s) to the "
                       "validation data.")
    group.add_argument("--overlapping-eval", type=int, default=32,
                       help="Sliding window for overlapping evaluation.")
    group.add_argument("--strict-lambada", action="store_true",
                       help="Use more difficult formulation of lambada.")
    group.add_argument("--eval-micro-batch-size", type=int, default=None,
                       help="Micro-batch size of evaluation (default: --micro-batch-size).")
    return parser


def parse_task_args(argv=None, world_size=None):
    """Megatron's flags plus the task flags. The training length comes from --epochs (the
    task sets --train-iters from it, so it is not required here); zero-shot tasks and
    --epochs 0 only evaluate (--skip-train: no --lr needed). ``world_size``: check the layout
    for that many processes (a dry run), else the launcher's."""
    import argparse

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", type=str, default=None)
    first.add_argument("--epochs", type=int, default=None)
    known = first.parse_known_args(argv)[0]
    task = known.task
    if task is not None and task not in TASKS:
        raise UserError(f"--task {task}: not supported; expected one of {', '.join(TASKS)}")
    defaults = {"train_iters": 0}
    if task in ZEROSHOT_TASKS or known.epochs == 0:
        defaults["skip_train"] = True
    args = parse_args(argv, extra_args_provider=get_tasks_args, defaults=defaults,
                      world_size=world_size)
    if args.eval_micro_batch_size is None:
        args.eval_micro_batch_size = args.micro_batch_size
    if args.eval_micro_batch_size < 1:
        raise UserError("--eval-micro-batch-size must be positive")
    if args.overlapping_eval is not None and args.overlapping_eval < 1:
        raise UserError("--overlapping-eval must be >= 1")
    return args


def main(argv=None, log=None):
    """Parse the flags and run the task; returns what the task's ``main`` returns."""
    args = parse_task_args(argv)
    if args.task in GLUE_TASKS:
        from tasks.glue.finetune import main as task_main
    elif args.task == "RACE":
        from tasks.race.finetune import main as task_main
    else:
        from tasks.zeroshot_gpt.evaluate import main as task_main
    return task_main(args) if log is None else task_main(args, log=log)


if __name__ == "__main__":
    run_main(main)
