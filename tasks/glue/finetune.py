"""GLUE finetuning (Megatron-LM's tasks/glue/finetune.py): a classifier (pooler + dropout +
linear head) on a BERT checkpoint, MNLI 3 classes (contradiction, entailment, neutral), QQP 2
(with F1).

    python tasks/main.py --task MNLI --train-data MNLI/train.tsv \\
        --valid-data MNLI/dev_matched.tsv MNLI/dev_mismatched.tsv \\
        --pretrained-checkpoint CKPT --epochs 10 ...  (see tasks/finetune_presets.py)

Each --valid-data file is one evaluation set named after its path (``MNLI/dev_matched.tsv`` ->
``dev-matched``); see tasks/finetune_utils.py for the run itself.
"""

from megatron.errors import UserError
from megatron.model.classification import Classification
from megatron.utils import print_rank_0
from tasks.data_utils import dataset_name_from_path
from tasks.finetune_utils import TaskSpec, finetune
from tasks.glue.mnli import MNLIDataset
from tasks.glue.qqp import QQPDataset

NUM_CLASSES = {"MNLI": 3, "QQP": 2}
DATASETS = {"MNLI": MNLIDataset, "QQP": QQPDataset}


def glue_task_spec(task: str) -> TaskSpec:
    """The ``TaskSpec`` of a GLUE task (MNLI, QQP)."""
    if task not in DATASETS:
        raise UserError(f"--task {task}: GLUE tasks here are {', '.join(DATASETS)}")
    dataset_class = DATASETS[task]

    def train_dataset(args, tokenizer, paths, log):
        return dataset_class("training", list(paths), tokenizer, args.seq_length, log=log)

    def eval_datasets(args, tokenizer, path, log):
        return [dataset_class(dataset_name_from_path(path, task), [path], tokenizer,
                              args.seq_length, log=log)]

    return TaskSpec(name=task, model_class=Classification,
                    model_kwargs={"num_classes": NUM_CLASSES[task]},
                    train_dataset=train_dataset, eval_datasets=eval_datasets,
                    f1=task == "QQP")


def main(args, log=print_rank_0):
    """Finetune (or evaluate, --epochs 0) on args.task; returns a ``FinetuneResult``."""
    return finetune(args, glue_task_spec(args.task), log)
