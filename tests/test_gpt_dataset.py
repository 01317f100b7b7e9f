"""GPTDataset index building (Megatron test vectors, vectorised == loop), cache, splits, paths."""

import hashlib
import multiprocessing
import os

import numpy as np
import pytest

from megatron.data import gpt_dataset, helpers
from megatron.data.dataset_utils import (build_train_valid_test_datasets,
                                         get_datasets_weights_and_num_samples,
                                         get_train_valid_test_split_, parse_data_path)
from megatron.data.gpt_dataset import GPTDataset, compute_index_mappings
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.errors import UserError

REF_SIZES = [5, 3, 7, 4, 6]
REF_DOC_IDX = [2, 2, 4, 1, 0, 3, 4, 0, 1, 3, 0, 4, 3, 2, 1]
REF_SAMPLE_IDX = [[0, 0], [0, 4], [1, 1], [1, 5], [2, 2], [3, 0], [4, 1], [5, 0], [6, 0], [6, 4],
                  [7, 2], [8, 1], [9, 2], [10, 2], [11, 1], [11, 5], [12, 3], [13, 3], [14, 0]]
REF_SHUFFLE_IDX = [7, 11, 2, 3, 1, 9, 5, 4, 0, 8, 6, 10, 17, 13, 16, 15, 12, 14]


def quiet(*_):
    pass


def write_dataset(prefix, sizes):
    """One sequence per document; token values are their global position in the file."""
    sizes = np.asarray(sizes, dtype=np.int32)
    tokens = np.arange(int(sizes.sum()), dtype=np.int32)
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
        builder.add_documents(tokens, sizes, np.ones(len(sizes), dtype=np.int64))
        builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def sample_idx_loop(sizes, doc_idx, seq_length, num_samples):
    """Straightforward port of Megatron's build_sample_idx loop (the ground truth)."""
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    i, offset = 0, 0
    for k in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[i]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                i += 1
                offset = 0
        out[k] = (i, offset)
    return out


# -- reference test vectors ---------------------------------------------------------------------

def test_reference_vectors_in_memory():
    sizes = np.array(REF_SIZES, dtype=np.int32)
    doc_idx, sample_idx, shuffle_idx, epochs = compute_index_mappings(
        np.arange(5, dtype=np.int32), sizes, 14, 4, 1234, log=quiet)
    assert epochs == 3
    assert doc_idx.dtype == np.int32 and doc_idx.tolist() == REF_DOC_IDX
    assert sample_idx.tolist() == REF_SAMPLE_IDX
    assert shuffle_idx.dtype == np.uint32 and shuffle_idx.tolist() == REF_SHUFFLE_IDX


def test_reference_vectors_dataset_items_and_cache(tmp_path):
    prefix = str(tmp_path / "ref")
    indexed = write_dataset(prefix, REF_SIZES)
    lines = []
    ds = GPTDataset("train", prefix, indexed, np.arange(5, dtype=np.int32), 14, 4, 1234,
                    splits_string="949,50,1", log=lines.append)
    assert not ds.loaded_from_cache
    assert any("separate_last_epoch to True" in line for line in lines)
    assert any("total number of epochs: 3" in line for line in lines)
    assert len(ds) == 18
    assert np.asarray(ds.doc_idx).tolist() == REF_DOC_IDX
    assert np.asarray(ds.sample_idx).tolist() == REF_SAMPLE_IDX
    assert np.asarray(ds.shuffle_idx).tolist() == REF_SHUFFLE_IDX
    assert isinstance(ds.sample_idx, np.memmap)

    # Items are windows of seq_length + 1 tokens over the epoch-concatenated documents.
    starts = np.concatenate([[0], np.cumsum(REF_SIZES)])
    stream = np.concatenate([np.arange(starts[d], starts[d + 1]) for d in REF_DOC_IDX])
    for i in range(len(ds)):
        j = REF_SHUFFLE_IDX[i]
        text = ds[i]["text"]
        assert text.dtype == np.int64 and text.shape == (5,)
        assert text.tolist() == stream[j * 4:j * 4 + 5].tolist()

    # Cache: Megatron HEAD names, in <dir>/index-cache, reused without rebuilding.
    desc = ("GPT Dataset\n\nData prefix {}\nDataset name train\nNumber of samples 14\n"
            "Number of epochs 3\nSequence length 4\nRandom seed 1234\nSplit 949,50,1\n"
            ).format(prefix)
    h = hashlib.md5(desc.encode("utf-8")).hexdigest()
    cache = tmp_path / "index-cache"
    assert sorted(f for f in os.listdir(cache) if not f.endswith(".lock")) == sorted(
        [f"{h}.dsc", f"{h}_doc_idx.npy", f"{h}_sample_idx.npy", f"{h}_shuffle_idx.npy"])
    assert (cache / f"{h}.dsc").read_text() == desc


def test_second_construction_uses_cache(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ref")
    indexed = write_dataset(prefix, REF_SIZES)
    first = GPTDataset("train", prefix, indexed, np.arange(5), 14, 4, 1234, log=quiet)

    def fail(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "compute_index_mappings", fail)
    lines = []
    second = GPTDataset("train", prefix, indexed, np.arange(5), 14, 4, 1234, log=lines.append)
    assert second.loaded_from_cache and any("(cached)" in line for line in lines)
    assert [second[i]["text"].tolist() for i in range(len(second))] == \
        [first[i]["text"].tolist() for i in range(len(first))]


def _build_in_child(prefix, queue):
    indexed = IndexedDataset(prefix)
    ds = GPTDataset("train", prefix, indexed, np.arange(len(indexed)), 500, 16, 9, log=quiet)
    queue.put((ds.loaded_from_cache, np.asarray(ds.shuffle_idx).tolist()[:50]))


def test_concurrent_builders_agree_and_leave_no_temporaries(tmp_path):
    prefix = str(tmp_path / "race")
    write_dataset(prefix, np.random.RandomState(1).randint(1, 50, size=300))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(prefix, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r[1] == results[0][1] for r in results)
    assert [f for f in os.listdir(tmp_path / "index-cache") if ".tmp-" in f] == []


def test_data_cache_path_used_when_not_found_next_to_data(tmp_path):
    prefix = str(tmp_path / "data" / "ref")
    os.makedirs(tmp_path / "data")
    indexed = write_dataset(prefix, REF_SIZES)
    cache_dir = str(tmp_path / "cache")
    ds = GPTDataset("valid", prefix, indexed, np.arange(5), 3, 4, 7, cache_dir=cache_dir,
                    log=quiet)
    assert not os.path.exists(tmp_path / "data" / "index-cache")
    assert ds.cache_paths["doc"].startswith(cache_dir)
    again = GPTDataset("valid", prefix, indexed, np.arange(5), 3, 4, 7, cache_dir=cache_dir,
                       log=quiet)
    assert again.loaded_from_cache


def test_one_epoch_is_one_shuffle_and_no_separate_epoch():
    sizes = np.array([10, 10, 10], dtype=np.int32)
    lines = []
    doc_idx, sample_idx, shuffle_idx, epochs = compute_index_mappings(
        np.arange(3, dtype=np.int32), sizes, 5, 4, 3, log=lines.append)
    assert epochs == 1 and "only one epoch" in lines[0]
    assert sorted(doc_idx.tolist()) == [0, 1, 2]
    assert len(sample_idx) == (30 - 1) // 4 + 1
    assert sorted(shuffle_idx.tolist()) == list(range(7))


def test_num_epochs_matches_megatron_loop():
    rng = np.random.RandomState(0)
    for _ in range(300):
        tokens, seq, n = rng.randint(1, 50), rng.randint(1, 20), rng.randint(0, 200)
        epochs, total = 0, 0
        while True:
            epochs += 1
            total += tokens
            if (total - 1) // seq >= n:
                break
        assert gpt_dataset.num_epochs_for(tokens, seq, n) == epochs


# -- vectorised / compiled sample_idx equals the loop -------------------------------------------

@pytest.mark.parametrize("trial", range(40))
def test_sample_idx_equals_loop_on_random_inputs(trial):
    rng = np.random.RandomState(trial)
    num_docs = rng.randint(1, 30)
    # Small sizes with zeros make samples end exactly on document ends and skip empty documents.
    sizes = rng.randint(0, 8, size=num_docs).astype(np.int32)
    sizes[rng.randint(num_docs)] = max(1, sizes.max())
    epochs = rng.randint(1, 4)
    doc_idx = np.tile(np.arange(num_docs, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    seq_length = rng.randint(1, 10)
    total = int(sizes[doc_idx].sum())
    num_samples = (total - 1) // seq_length
    expected = sample_idx_loop(sizes, doc_idx, seq_length, num_samples)
    np.testing.assert_array_equal(
        helpers.build_sample_idx_np(sizes, doc_idx, seq_length, num_samples), expected)
    np.testing.assert_array_equal(
        helpers.build_sample_idx(sizes, doc_idx, seq_length, num_samples), expected)


def test_items_with_empty_documents(tmp_path):
    sizes = [0, 4, 0, 0, 3, 5, 0]
    prefix = str(tmp_path / "holes")
    indexed = write_dataset(prefix, sizes)
    ds = GPTDataset("train", prefix, indexed, np.arange(len(sizes)), 6, 3, 5, log=quiet)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    stream = np.concatenate([np.arange(starts[d], starts[d + 1]) for d in ds.doc_idx])
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        assert ds[i]["text"].tolist() == stream[j * 3:j * 3 + 4].tolist()


def test_last_epoch_may_hold_one_sample_more_than_an_epoch(tmp_path):
    # 9 tokens per epoch, seq 5: (9 - 1) // 5 = 1 sample per epoch, yet 5 samples need 3 epochs
    # of which the last contributes 2 ((27 - 1) // 5 - (18 - 1) // 5). Megatron-LM accepts
    # num_samples_per_epoch + 1 here; an assertion used to stop at num_samples_per_epoch.
    prefix = str(tmp_path / "tiny")
    indexed = write_dataset(prefix, [3, 3, 3])
    ds = GPTDataset("train", prefix, indexed, np.arange(3), 5, 5, 1234, log=quiet)
    assert ds.num_epochs == 3 and len(ds) == 5
    expected = sample_idx_loop(indexed.sizes, ds.doc_idx, 5, 5)
    np.testing.assert_array_equal(ds.sample_idx, expected)
    for i in range(len(ds)):
        assert len(ds[i]["text"]) == 6
    # Random small cases: every one builds and matches the loop.
    rng = np.random.RandomState(5)
    for _ in range(300):
        sizes = rng.randint(1, 6, size=rng.randint(1, 6)).astype(np.int32)
        seq, n = rng.randint(1, 10), rng.randint(1, 30)
        if sizes.sum() <= seq:
            continue
        doc_idx, sample_idx, _, _ = compute_index_mappings(
            np.arange(len(sizes), dtype=np.int32), sizes, n, seq, 1, log=quiet)
        np.testing.assert_array_equal(
            sample_idx, sample_idx_loop(sizes, doc_idx, seq, len(sample_idx) - 1))


# -- dataset_utils ------------------------------------------------------------------------------

def test_split_vectors():
    assert get_train_valid_test_split_("949,50,1", 1000) == [0, 949, 999, 1000]
    assert get_train_valid_test_split_("949,50,1", 10) == [0, 10, 10, 10]
    assert get_train_valid_test_split_("949/50/1", 1000) == [0, 949, 999, 1000]
    assert get_train_valid_test_split_("969, 30, 1", 1000) == [0, 969, 999, 1000]
    assert get_train_valid_test_split_("1", 7) == [0, 7, 7, 7]
    assert get_train_valid_test_split_("8,2,0,5", 10) == [0, 8, 10, 10]


@pytest.mark.parametrize("bad", ["abc", "1,x,2", "0,0,0", "-1,2,3", ""])
def test_split_bad_string(bad):
    with pytest.raises(UserError, match="--split"):
        get_train_valid_test_split_(bad, 100)


def test_weights_and_num_samples_vector():
    prefixes, weights, per_dataset = get_datasets_weights_and_num_samples(
        ["0.3", "a", "0.7", "b"], [1000, 100, 10])
    assert prefixes == ["a", "b"]
    assert weights == pytest.approx([0.3, 0.7])
    assert per_dataset == [[302, 31, 4], [704, 71, 8]]
    assert get_datasets_weights_and_num_samples(["1", "a", "3", "b"], 100)[2] == [26, 76]


def test_parse_data_path():
    assert parse_data_path(["data/x_text_document"]) == (["data/x_text_document"], None)
    prefixes, weights = parse_data_path(["1", "a", "3", "b"])
    assert prefixes == ["a", "b"] and weights == [0.25, 0.75]
    assert parse_data_path([]) == ([], None)
    with pytest.raises(UserError, match=r"--data-path.*'oops'"):
        parse_data_path(["oops", "a", "1", "b"])
    with pytest.raises(UserError, match=r"--train-data-path.*'-1'"):
        parse_data_path(["-1", "a", "1", "b"], flag="--train-data-path")
    with pytest.raises(UserError, match=r"--data-path.*odd.*'c'"):
        parse_data_path(["1", "a", "c"])


def test_build_single_prefix_splits(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, np.random.RandomState(0).randint(1, 20, size=100))
    lines = []
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "80,20,0", [50, 10, 5], 8, 1234, log=lines.append)
    assert test is None
    assert len(train) >= 50 and len(valid) >= 10
    assert " > dataset split:" in lines
    assert any("document indices in [0, 80) total of 80 documents" in line for line in lines)
    assert train[0]["text"].shape == (9,)
    # valid only draws from documents 80..99
    starts = np.concatenate([[0], np.cumsum(IndexedDataset(prefix).sizes)])
    assert int(valid.doc_idx.min()) == 80
    assert valid[0]["text"].min() >= starts[80]


def test_build_blended_and_separate_paths(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, [6] * 40)
    write_dataset(b, [9] * 40)
    lines = []
    train, valid, test = build_train_valid_test_datasets(
        ["0.3", a, "0.7", b], "90,10,0", [100, 20, 0], 8, 1, log=lines.append)
    assert test is None
    assert len(train) == 31 + 71 and len(valid) == 7 + 15  # ceil(n * w * 1.005) summed
    assert " > sample ratios:" in lines
    assert {train[i]["dataset_idx"] for i in range(10)} == {0, 1}

    train, valid, test = build_train_valid_test_datasets(
        [], "949,50,1", [30, 5, 5], 8, 1, train_data_path=["1", a, "1", b],
        valid_data_path=[b], log=quiet)
    assert test is None
    assert len(train) == 16 + 16
    assert len(valid) >= 5 and valid.indexed_dataset.path_prefix == b
    # whole file, ignoring --split
    assert sorted(set(np.asarray(valid.doc_idx).tolist())) == list(range(40))


def test_build_user_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match=f"--data-path.*{missing}"):
        build_train_valid_test_datasets([missing], "1,0,0", [1, 0, 0], 4, 1, log=quiet)
    with pytest.raises(UserError, match="--valid-data-path.*nope"):
        build_train_valid_test_datasets(None, "1,0,0", [1, 1, 0], 4, 1,
                                        valid_data_path=[missing], log=quiet)
    with pytest.raises(UserError, match="--data-path"):
        build_train_valid_test_datasets([], "1,0,0", [1, 0, 0], 4, 1, log=quiet)
    with pytest.raises(UserError, match="--data-path"):
        build_train_valid_test_datasets(["x"], "1,0,0", [1, 0, 0], 4, 1,
                                        train_data_path=["y"], log=quiet)


def test_split_too_small_for_one_sample_names_the_split(tmp_path):
    from megatron.data.gpt_dataset import GPTDataset
    from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron.errors import UserError

    prefix = str(tmp_path / "tiny")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document([1, 2, 3], [3])
    builder.finalize(prefix + ".idx")
    with pytest.raises(UserError, match="test split has 1 document"):
        GPTDataset("test", prefix, IndexedDataset(prefix), [0], 4, 8, 1234,
                   cache_dir=str(tmp_path), log=lambda *a: None)
