"""Batch samplers that resume from a consumed-sample count, and the pretraining DataLoader.

Both samplers yield one micro-batch of sample indices per step for one data-parallel rank.
A global batch step covers ``micro_batch_size * data_parallel_size`` samples; rank r takes its
contiguous slice of each such chunk, so all ranks together see exactly what one rank with a
``micro_batch_size * data_parallel_size`` micro-batch would see.
"""

import numpy as np
import torch

from megatron.errors import UserError


def _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
           data_parallel_size):
    if total_samples <= 0:
        raise ValueError(f"no sample to consume: total_samples={total_samples}")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if data_parallel_size <= 0:
        raise ValueError(f"data_parallel_size must be positive, got {data_parallel_size}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank should be in [0, {data_parallel_size}), got "
                         f"{data_parallel_rank}")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")


class MegatronPretrainingSampler:
    """Sequential samples ``consumed_samples .. total_samples - 1``, sliced per DP rank."""

    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                 data_parallel_size, drop_last=True):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
               data_parallel_size)
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left to consume: {consumed_samples}, {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self):
        return self.total_samples

    def _slice(self, batch):
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    def __iter__(self):
        chunk = self.micro_batch_times_data_parallel_size
        batch = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == chunk:
                yield self._slice(batch)
                batch = []
        # A partial last chunk: each rank takes what is left of its slice (if anything).
        if batch and not self.drop_last and self._slice(batch):
            yield self._slice(batch)


class MegatronPretrainingRandomSampler:
    """Epoch-wise random order, seeded by the epoch number, resumable mid-epoch.

    An epoch holds ``total_samples`` rounded down to whole ``micro_batch * dp`` chunks. Each
    ``iter()`` continues from ``consumed_samples`` to the end of the current epoch (updating
    ``consumed_samples`` as it goes), so iterating again starts the next epoch: wrap the loader in
    ``cyclic_iter`` for endless training.

    With ``data_sharding`` (Megatron's default) rank r owns the contiguous bucket
    ``[r * B, (r + 1) * B)`` and walks a permutation of it; without, one global permutation is
    dealt round-robin to the ranks.
    """

    def __init__(self, dataset, total_samples, consumed_samples, micro_batch_size,
                 data_parallel_rank, data_parallel_size, data_sharding=True):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
               data_parallel_size)
        self.dataset = dataset
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.data_sharding = data_sharding
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.last_batch_size = total_samples % self.micro_batch_times_data_parallel_size
        if total_samples < self.micro_batch_times_data_parallel_size:
            raise ValueError(f"dataset of {total_samples} samples is smaller than one global "
                             f"micro-batch step ({self.micro_batch_times_data_parallel_size})")

    def __len__(self):
        return self.total_samples

    def __iter__(self):
        chunk = self.micro_batch_times_data_parallel_size
        active_total_samples = self.total_samples - self.last_batch_size
        epoch = self.consumed_samples // active_total_samples
        current_epoch_samples = self.consumed_samples % active_total_samples
        if current_epoch_samples % chunk != 0:
            raise ValueError(f"consumed_samples {self.consumed_samples} is not a multiple of "
                             f"micro_batch_size * data_parallel_size ({chunk})")
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

        g = torch.Generator()
        g.manual_seed(epoch)
        if self.data_sharding:
            bucket_size = (self.total_samples // chunk) * self.micro_batch_size
            bucket_offset = current_epoch_samples // self.data_parallel_size
            start_idx = self.data_parallel_rank * bucket_size
            random_idx = torch.randperm(bucket_size, generator=g).tolist()
            idx_range = [start_idx + x for x in random_idx[bucket_offset:]]
        else:
            full_bucket_size = (self.total_samples // self.micro_batch_size) \
                * self.micro_batch_size
            idx_range_total = torch.randperm(full_bucket_size, generator=g).tolist()
            idx_range_active = idx_range_total[current_epoch_samples:]
            idx_range = idx_range_active[self.data_parallel_rank::self.data_parallel_size]

        batch = []
        for idx in idx_range:
            batch.append(idx)
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += chunk
                yield batch
                batch = []


def cyclic_iter(iterable):
    """Iterate ``iterable`` forever (re-iterating a random-sampler loader starts a new epoch)."""
    while True:
        for item in iterable:
            yield item


def collate_samples(samples):
    """Stack a list of sample dicts: 'text' (and any array field) into int64 tensors."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], np.ndarray):
            array = np.stack(values)
            if key == "text" or np.issubdtype(array.dtype, np.integer):
                array = array.astype(np.int64, copy=False)
            out[key] = torch.from_numpy(array)
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = torch.tensor(values)
    return out


class WithSampleIndex(torch.utils.data.Dataset):
    """Adds ``'index'``: the sample's index in the dataset, a unique id within a global batch.

    random-LTD draws each sample's kept tokens from (seed, iteration, layer, this id), so the
    draw is the same whatever the micro-batch size or data-parallel layout.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return {**self.dataset[idx], "index": int(idx)}


def checked_token_ids(batches, dataset, vocab_size, key="text"):
    """``batches`` (dicts of tensors), each checked for token ids outside ``[0, vocab_size)``
    (the padded vocabulary: the embedding's rows) as it is built: data preprocessed with
    another tokenizer ends in one line naming its dataset, not deep in the embedding (a
    device-side assert on GPU). Cost: one min/max over the micro-batch's ``key`` tensor, on
    the CPU before it moves to the device."""
    for batch in batches:
        tokens = batch.get(key) if isinstance(batch, dict) else None
        if isinstance(tokens, torch.Tensor) and tokens.numel() and not tokens.is_floating_point():
            low, high = (int(v) for v in torch.aminmax(tokens))
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                row = int((tokens == bad).flatten(1).any(1).nonzero()[0])
                raise UserError(f"{_source_of(dataset, batch, row)}: token id {bad} is outside "
                                f"the model's vocabulary [0, {vocab_size}) (padded); was the "
                                f"data preprocessed with this --tokenizer-type / --vocab-file?")
        yield batch


def _source_of(dataset, batch, row):
    """The path prefix of the dataset that gave row ``row`` of ``batch`` (a blend's member
    through the batch's ``dataset_idx``)."""
    if "dataset_idx" in batch and hasattr(dataset, "datasets"):
        dataset = dataset.datasets[int(batch["dataset_idx"][row])]
    return getattr(dataset, "data_prefix", None) or type(dataset).__name__


def build_pretraining_data_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size,
                                  num_workers=0, dataloader_type="single", drop_last=True,
                                  data_sharding=True, seed=0, worker_init_fn=None):
    """DataLoader over ``dataset`` for one DP rank, resuming after ``consumed_samples``.

    ``dataloader_type``: 'single' (sequential, Megatron's default) or 'cyclic' (random order per
    epoch). Returns None for a None dataset. The loader gets its own generator (seeded by
    ``seed``) so that starting an iterator never draws from the global torch RNG: a resumed run
    then keeps the dropout stream of an uninterrupted one.
    """
    if dataset is None:
        return None
    if dataloader_type == "single":
        batch_sampler = MegatronPretrainingSampler(
            total_samples=len(dataset), consumed_samples=consumed_samples,
            micro_batch_size=micro_batch_size, data_parallel_rank=dp_rank,
            data_parallel_size=dp_size, drop_last=drop_last)
    elif dataloader_type == "cyclic":
        batch_sampler = MegatronPretrainingRandomSampler(
            dataset, total_samples=len(dataset), consumed_samples=consumed_samples,
            micro_batch_size=micro_batch_size, data_parallel_rank=dp_rank,
            data_parallel_size=dp_size, data_sharding=data_sharding)
    else:
        raise UserError(f"--dataloader-type: expected 'single' or 'cyclic', got "
                        f"{dataloader_type!r}")
    generator = torch.Generator().manual_seed(seed)
    return _DataLoader(WithSampleIndex(dataset), batch_sampler=batch_sampler,
                       num_workers=num_workers, collate_fn=collate_samples,
                       pin_memory=torch.cuda.is_available(), generator=generator,
                       worker_init_fn=worker_init_fn)


class _DataLoader(torch.utils.data.DataLoader):
    """A DataLoader that starts its workers inside ``worker_init_fn.starting()`` where the
    ``worker_init_fn`` has one (``megatron.dist_signal_handler.QuietWorkers``: no worker dies of
    a signal that comes before it has set itself up)."""

    def __iter__(self):
        starting = getattr(self.worker_init_fn, "starting", None)
        if self.num_workers == 0 or starting is None:
            return super().__iter__()
        with starting():
            return super().__iter__()


class _Padded(torch.utils.data.Dataset):
    """``dataset`` with ``'eval_valid'`` (1) on its samples and padding slots (index -1: a copy
    of sample 0 with ``'eval_valid'`` 0), so every rank runs the same number of full-size
    micro-batches and the padding is left out of the sums."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        if idx < 0:
            return {**self.dataset[0], "index": 0, "eval_valid": np.int64(0)}
        return {**self.dataset[idx], "index": int(idx), "eval_valid": np.int64(1)}


class EvalDataLoader:
    """One pass over a whole evaluation set, each sample exactly once over the data-parallel
    ranks (Megatron's evaluation sums correct / total over the full dev set).

    Rank r reads the contiguous shard ``[r * ceil(N / dp), ...)`` in order, padded to
    ``num_micro_batches`` full micro-batches (the same count on every rank, which pipeline
    parallelism needs); padding samples carry ``'eval_valid'`` 0. Batches are dicts of tensors,
    as the pretraining loader's (with ``'index'``).
    """

    def __init__(self, dataset, micro_batch_size, dp_rank=0, dp_size=1, num_workers=0,
                 collate_fn=collate_samples):
        _check(max(len(dataset), 1), 0, micro_batch_size, dp_rank, dp_size)
        n = len(dataset)
        per_rank = -(-n // dp_size)
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = -(-per_rank // micro_batch_size)
        self.num_samples = n
        start = min(dp_rank * per_rank, n)
        own = list(range(start, min(start + per_rank, n)))
        slots = own + [-1] * (self.num_micro_batches * micro_batch_size - len(own))
        batches = [slots[i:i + micro_batch_size] for i in range(0, len(slots), micro_batch_size)]
        self._loader = torch.utils.data.DataLoader(
            _Padded(dataset), batch_sampler=batches, num_workers=num_workers,
            collate_fn=collate_fn, pin_memory=torch.cuda.is_available())

    def __len__(self):
        return self.num_micro_batches

    def __iter__(self):
        return iter(self._loader)


def build_eval_data_loader(dataset, micro_batch_size, dp_rank=0, dp_size=1, num_workers=0,
                           collate_fn=collate_samples):
    """An ``EvalDataLoader`` (see there)."""
    return EvalDataLoader(dataset, micro_batch_size, dp_rank, dp_size, num_workers, collate_fn)
