"""Pretraining samplers: DP slicing, exact resume, random epochs, and the DataLoader."""

import numpy as np
import pytest
import torch

from megatron.data.samplers import (MegatronPretrainingRandomSampler, MegatronPretrainingSampler,
                                    build_pretraining_data_loader, cyclic_iter)


class Counting(torch.utils.data.Dataset):
    def __init__(self, n, length=3):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"text": np.full(self.length, i, dtype=np.int32)}


def interleave(per_rank):
    """Megatron order: step by step, rank 0's micro-batch then rank 1's ..."""
    out = []
    for step in zip(*per_rank):
        for batch in step:
            out.extend(batch)
    return out


def test_sequential_dp_ranks_equal_one_big_rank():
    total, mbs, dp = 103, 2, 4
    per_rank = [list(MegatronPretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    single = list(MegatronPretrainingSampler(total, 0, mbs * dp, 0, 1))
    assert interleave(per_rank) == [i for b in single for i in b]
    assert per_rank[1][0] == [2, 3] and per_rank[3][1] == [14, 15]
    assert all(len(b) == mbs for r in per_rank for b in r)
    assert sum(len(r) for r in per_rank) * mbs == 96  # the partial last chunk is dropped


def test_sequential_resume_and_drop_last():
    full = list(MegatronPretrainingSampler(50, 0, 3, 1, 2))
    resumed = list(MegatronPretrainingSampler(50, 18, 3, 1, 2))
    assert resumed == full[3:]
    tail = list(MegatronPretrainingSampler(50, 0, 3, 1, 2, drop_last=False))
    assert tail == full  # rank 1's slice of the partial chunk [48, 49] is empty: nothing yielded
    assert list(MegatronPretrainingSampler(50, 0, 3, 0, 2, drop_last=False))[-1] == [48, 49]
    assert list(MegatronPretrainingSampler(10, 0, 4, 0, 2, drop_last=False))[-1] == [8, 9]
    with pytest.raises(ValueError):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)


@pytest.mark.parametrize("sharding", [True, False])
def test_random_sampler_resume_and_epochs(sharding):
    total, mbs, dp = 45, 2, 2
    ds = Counting(total)

    def run(consumed, rank, steps):
        sampler = MegatronPretrainingRandomSampler(ds, total, consumed, mbs, rank, dp,
                                                   data_sharding=sharding)
        it = cyclic_iter(sampler)
        return [next(it) for _ in range(steps)], sampler

    per_epoch = (total // (mbs * dp))  # 11 steps per epoch, 1 sample left over
    full, sampler = run(0, 1, 3 * per_epoch)
    assert sampler.consumed_samples >= 2 * per_epoch * mbs * dp
    epoch0 = [i for b in full[:per_epoch] for i in b]
    epoch1 = [i for b in full[per_epoch:2 * per_epoch] for i in b]
    assert len(set(epoch0)) == len(epoch0) and epoch0 != epoch1
    if sharding:
        assert sorted(epoch0) == sorted(epoch1)  # same owned bucket, new order
    # resume mid-epoch and across an epoch boundary
    for steps_done in (4, per_epoch, per_epoch + 3):
        resumed, _ = run(steps_done * mbs * dp, 1, 5)
        assert resumed == full[steps_done:steps_done + 5]
    # the ranks together cover each epoch without overlap
    other, _ = run(0, 0, per_epoch)
    union = set(epoch0) | {i for b in other for i in b}
    assert len(union) == per_epoch * mbs * dp and max(union) < total


def test_random_sampler_rejects_misaligned_resume():
    sampler = MegatronPretrainingRandomSampler(Counting(40), 40, 3, 2, 0, 2)
    with pytest.raises(ValueError, match="multiple"):
        next(iter(sampler))


def test_data_loader_collates_int64_and_resumes():
    ds = Counting(20)
    loader = build_pretraining_data_loader(ds, 4, 2, 1, 2)
    batches = list(loader)
    assert batches[0]["text"].dtype == torch.int64 and batches[0]["text"].shape == (2, 3)
    assert batches[0]["text"][:, 0].tolist() == [6, 7]
    assert len(batches) == 4
    cyclic = build_pretraining_data_loader(ds, 0, 2, 0, 2, dataloader_type="cyclic")
    assert next(iter(cyclic))["text"].shape == (2, 3)
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None
    from megatron.errors import UserError
    with pytest.raises(UserError, match="--dataloader-type"):
        build_pretraining_data_loader(ds, 0, 1, 0, 1, dataloader_type="bogus")


def _iterators(dataloader_type, dataset, consumed_train=0, consumed_valid=0, dp_rank=0,
               iteration=0, state_out=None):
    import argparse

    from megatron.training import build_data_iterators

    args = argparse.Namespace(train_iters=100, train_samples=None, global_batch_size=4,
                              eval_interval=10, eval_iters=1, micro_batch_size=2,
                              num_workers=0, dataloader_type=dataloader_type, seed=0,
                              skip_train=False, padded_vocab_size=1 << 20)
    state = argparse.Namespace(iteration=iteration, consumed_train_samples=consumed_train,
                               consumed_valid_samples=consumed_valid)
    if state_out is not None:
        state_out.append(state)
    parallel = argparse.Namespace(dp_rank=dp_rank, dp_size=2)
    return build_data_iterators(args, state, None, lambda a, t, n: (dataset, dataset, None),
                                parallel, log=lambda *a: None)


def test_cyclic_iterators_start_a_new_epoch_instead_of_stopping():
    """Megatron wraps 'cyclic' loaders in cyclic_iter: the random sampler ends each epoch and
    the next pass starts the next one; 'single' stops at the end of the data."""
    ds = Counting(10)  # 2 steps of micro 2 x DP 2 per epoch, 2 samples left over
    train, valid, test = _iterators("cyclic", ds)
    assert test is None
    batches = [next(train)["index"].tolist() for _ in range(7)]
    epochs = [sorted(i for b in batches[e * 2:e * 2 + 2] for i in b) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2]  # rank 0's shard, each epoch in full
    assert batches[:2] != batches[2:4] or batches[2:4] != batches[4:6]  # reshuffled
    assert [next(valid)["index"].tolist() for _ in range(5)]  # validation cycles too
    # resuming at consumed samples 12 (epoch 1, step 1) gives the same batches
    resumed, _, _ = _iterators("cyclic", ds, consumed_train=12)
    assert [next(resumed)["index"].tolist() for _ in range(4)] == batches[3:7]

    single, _, _ = _iterators("single", ds)
    assert [next(single)["index"].tolist() for _ in range(2)] == [[0, 1], [4, 5]]
    with pytest.raises(StopIteration):
        next(single)
    # the validation iterator resumes after consumed_valid_samples
    _, valid, _ = _iterators("single", ds, consumed_valid=4, dp_rank=1)
    assert next(valid)["index"].tolist() == [6, 7]


def test_checkpoint_without_consumed_counters_resumes_after_its_iterations():
    """Megatron's backward compatibility: iteration > 0 with zero consumed samples (a
    checkpoint from before the counters were saved) resumes at iteration * global batch, and
    validation at (iteration // eval_interval) * eval_iters * global batch."""
    ds = Counting(200)
    states = []
    train, valid, _ = _iterators("single", ds, iteration=25, state_out=states)
    assert states[0].consumed_train_samples == 100  # 25 iterations x global batch 4
    assert states[0].consumed_valid_samples == 8  # 2 evaluations x 1 iteration x 4
    assert next(train)["index"].tolist() == [100, 101]
    assert next(valid)["index"].tolist() == [8, 9]
    # counters that were saved are kept
    states = []
    train, _, _ = _iterators("single", ds, consumed_train=40, consumed_valid=4, iteration=10,
                             state_out=states)
    assert (states[0].consumed_train_samples, states[0].consumed_valid_samples) == (40, 4)
    assert next(train)["index"].tolist() == [40, 41]
