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


class MockBertDataset:
    """``num_samples`` BERT samples (Megatron's keys) of random tokens, a pure function of
    (seed, index): [CLS] A [SEP] B [SEP], then padding, 15% of the real tokens masked
    (labels elsewhere -1), a random sentence-order label. Lengths vary between half and all of
    ``seq_length`` so padding is exercised."""

    def __init__(self, num_samples, seq_length, vocab_size, *, cls_id, sep_id, pad_id, mask_id,
                 seed=1234, mask_prob=0.15):
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.ids = (cls_id, sep_id, pad_id, mask_id)
        self.seed = seed
        self.mask_prob = mask_prob

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        cls_id, sep_id, pad_id, mask_id = self.ids
        rng = np.random.default_rng([self.seed, int(idx)])
        s = self.seq_length
        length = int(rng.integers(max(s // 2, 5), s + 1))  # real tokens, specials included
        split = int(rng.integers(2, length - 2))  # the [SEP] between A and B
        text = np.full(s, pad_id, dtype=np.int64)
        text[:length] = rng.integers(0, self.vocab_size, size=length)
        text[0], text[split], text[length - 1] = cls_id, sep_id, sep_id
        types = np.zeros(s, dtype=np.int64)
        types[split + 1:length] = 1
        padding_mask = (np.arange(s) < length).astype(np.int64)
        special = np.isin(np.arange(s), [0, split, length - 1]) | (padding_mask == 0)
        masked = (rng.random(s) < self.mask_prob) & ~special
        labels = np.where(masked, text, -1)
        text = np.where(masked, mask_id, text)
        return {"text": text, "types": types, "labels": labels,
                "is_random": int(rng.integers(0, 2)), "loss_mask": masked.astype(np.int64),
                "padding_mask": padding_mask, "truncated": 0}
