"""Weighted blend of several datasets (Megatron's deterministic greedy interleaving)."""

import time

import numpy as np
import torch

from megatron.data import helpers


class BlendableDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample s comes from dataset ``dataset_index[s]`` (uint8), its sample
    ``dataset_sample_index[s]`` (int64): the greedy rule gives each sample to the dataset whose
    achieved count lags ``weight * s`` the most, so every prefix of the blend has close to the
    requested ratios. Items are the child's dict plus ``'dataset_idx'``.
    """

    def __init__(self, datasets, weights, size, log=print):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("BlendableDataset: no datasets")
        if len(self.datasets) >= 255:
            raise ValueError(f"BlendableDataset: at most 254 datasets, got {len(self.datasets)}")
        if len(weights) != len(self.datasets):
            raise ValueError(f"BlendableDataset: {len(weights)} weights for "
                             f"{len(self.datasets)} datasets")
        weights = np.array(weights, dtype=np.float64)
        if not np.all(weights > 0):
            raise ValueError(f"BlendableDataset: weights must be positive, got {weights.tolist()}")
        self.weights = weights / np.sum(weights)
        self.size = int(size)

        start = time.time()
        self.dataset_index, self.dataset_sample_index = helpers.build_blending_indices(
            self.weights, self.size)
        log(f"> elapsed time for building blendable dataset indices: {time.time() - start:.2f} "
            f"(sec)")

        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        log(" > sample ratios:")
        for i, (weight, count) in enumerate(zip(self.weights, counts)):
            achieved = count / max(self.size, 1)
            log(f"   dataset {i}, input: {weight}, achieved: {achieved}")
        for i, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise ValueError(f"BlendableDataset: dataset {i} has {len(dataset)} samples but "
                                 f"the blend of {self.size} samples with weight "
                                 f"{self.weights[i]:.6g} needs {count}")

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        if idx < 0:
            idx += self.size
        dataset_idx = int(self.dataset_index[idx])
        sample_idx = int(self.dataset_sample_index[idx])
        return {"dataset_idx": dataset_idx, **self.datasets[dataset_idx][sample_idx]}
