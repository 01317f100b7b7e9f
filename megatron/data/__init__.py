"""Data pipeline: indexed (MMIDIDX) files, GPT/BERT datasets, blending, samplers.

Names are imported lazily so that light users (e.g. preprocessing tools reading only
``indexed_dataset``) do not pay for torch.
"""

import importlib

_EXPORTS = {
    "GPTDataset": "megatron.data.gpt_dataset",
    "BlendableDataset": "megatron.data.blendable_dataset",
    "build_train_valid_test_datasets": "megatron.data.dataset_utils",
    "get_train_valid_test_split_": "megatron.data.dataset_utils",
    "get_datasets_weights_and_num_samples": "megatron.data.dataset_utils",
    "parse_data_path": "megatron.data.dataset_utils",
    "MegatronPretrainingSampler": "megatron.data.samplers",
    "MegatronPretrainingRandomSampler": "megatron.data.samplers",
    "build_pretraining_data_loader": "megatron.data.samplers",
    "cyclic_iter": "megatron.data.samplers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron.data' has no attribute {name!r}")
