"""Random-token dataset for smoke tests and benchmarks (``--mock-data``)."""

import numpy as np


class MockGPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` tokens, a pure function of (seed, index)."""

    def __init__(self, num_samples, seq_length, vocab_size, seed=1234):
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, int(idx)])
        text = rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)
        return {"text": text}
