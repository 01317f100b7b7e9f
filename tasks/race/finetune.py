"""RACE finetuning (Megatron-LM's tasks/race/finetune.py): a multiple-choice model on a BERT
checkpoint, the 4 choices of a question scored jointly.

    python tasks/main.py --task RACE --train-data RACE/train/middle RACE/train/high \\
        --valid-data RACE/dev/middle RACE/dev/high \\
        --pretrained-checkpoint CKPT --epochs 3 ...  (see tasks/finetune_presets.py)

A data path is a directory of RACE files or a split directory with middle/ and high/ (each
level its own evaluation set: dev-middle, dev-high, and the overall line for both); see
tasks/race/data.py for the inputs and tasks/finetune_utils.py for the run.
"""

from megatron.model.multiple_choice import MultipleChoice
from megatron.utils import print_rank_0
from tasks.finetune_utils import TaskSpec, finetune
from tasks.race.data import NUM_CHOICES, RaceDataset, race_eval_datasets


def race_task_spec() -> TaskSpec:
    """The ``TaskSpec`` of RACE."""

    def train_dataset(args, tokenizer, paths, log):
        return RaceDataset("training", list(paths), tokenizer, args.seq_length, log=log)

    def eval_datasets(args, tokenizer, path, log):
        return race_eval_datasets(path, tokenizer, args.seq_length, log=log)

    return TaskSpec(name="RACE", model_class=MultipleChoice, model_kwargs={},
                    train_dataset=train_dataset, eval_datasets=eval_datasets,
                    rows_per_sample=NUM_CHOICES)


def main(args, log=print_rank_0):
    """Finetune (or evaluate, --epochs 0) on RACE; returns a ``FinetuneResult``."""
    return finetune(args, race_task_spec(), log)
