"""The GLUE dataset (Megatron-LM's GLUEAbstractDataset): the rows of one or more TSV files of a
task, tokenized into BERT pair inputs when read (``__getitem__``), as Megatron does."""

import torch

from megatron.errors import UserError
from megatron.utils import print_rank_0
from tasks.data_utils import build_sample, build_tokens_types_paddings_from_text


class GLUEDataset(torch.utils.data.Dataset):
    """Samples ``{'text_a', 'text_b', 'label', 'uid'}`` read from ``datapaths`` by
    ``read_file(path, log)``; items are Megatron's sample dicts (``build_sample``) of
    ``max_seq_length`` tokens."""

    def __init__(self, task_name, dataset_name, datapaths, tokenizer, max_seq_length, read_file,
                 log=print_rank_0):
        self.task_name = task_name
        self.dataset_name = dataset_name
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        log(f" > building {task_name} dataset for {dataset_name}:")
        log("  > paths: " + " ".join(datapaths))
        self.samples = []
        for path in datapaths:
            self.samples.extend(read_file(path, log))
        if not self.samples:
            raise UserError(f"{task_name} {dataset_name} data {' '.join(datapaths)}: no "
                            "samples")
        log(f"  >> total number of samples: {len(self.samples)}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        raw = self.samples[idx]
        ids, types, paddings = build_tokens_types_paddings_from_text(
            raw["text_a"], raw["text_b"], self.tokenizer, self.max_seq_length)
        return build_sample(ids, types, paddings, raw["label"], raw["uid"])
