"""MMIDIDX reader/writer: byte layout, round trip, merging, validation of corrupt files."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
)
from megatron.errors import UserError


def build(prefix, docs, dtype=np.uint16):
    """Write ``docs`` (a list of documents, each a list of sequences) under ``prefix``."""
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype) as builder:
        for doc in docs:
            for seq in doc:
                builder.add_item(seq)
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
    return prefix


def test_dtype_codes_and_best_fit():
    assert {c: d.name for c, d in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32",
        8: "uint16"}
    assert best_fitting_dtype(50257) == np.uint16
    assert best_fitting_dtype(30522) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32


def test_worked_example_is_byte_exact(tmp_path):
    prefix = build(str(tmp_path / "ex"), [[[10, 11, 12]], [[13, 14]]])
    assert open(prefix + ".bin", "rb").read() == bytes.fromhex("0a000b000c000d000e00")
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3)
                + struct.pack("<2i", 3, 2) + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2))
    idx = open(prefix + ".idx", "rb").read()
    assert len(idx) == 82
    assert idx == expected


def test_round_trip_and_views(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 60000, rng.integers(0, 9)).tolist()
             for _ in range(rng.integers(1, 4))] for _ in range(40)]
    prefix = build(str(tmp_path / "rt"), docs)
    flat = [seq for doc in docs for seq in doc]
    ds = IndexedDataset(prefix)
    assert len(ds) == len(flat)
    assert ds.dtype == np.uint16
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64
    assert ds.doc_idx is ds.document_indices
    assert ds.document_indices.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    for i, seq in enumerate(flat):
        assert ds[i].tolist() == seq
    assert ds[-1].tolist() == flat[-1]
    assert [a.tolist() for a in ds[3:11]] == flat[3:11]
    assert ds[5:5] == []
    with pytest.raises(ValueError):
        ds[0:10:2]
    with pytest.raises(IndexError):
        ds[len(flat)]
    long = max(range(len(flat)), key=lambda i: len(flat[i]))
    assert ds.get(long, offset=2).tolist() == flat[long][2:]
    assert ds.get(long, offset=1, length=3).tolist() == flat[long][1:4]
    # Same answers without mmap and after pickling (which reopens the files).
    ds2 = IndexedDataset(prefix, mmap=False)
    assert [a.tolist() for a in ds2[0:len(ds2)]] == flat
    ds3 = pickle.loads(pickle.dumps(ds))
    assert ds3[7].tolist() == flat[7]
    assert IndexedDataset.exists(prefix)
    assert not IndexedDataset.exists(str(tmp_path / "nope"))


def test_zero_copy(tmp_path):
    ds = IndexedDataset(build(str(tmp_path / "zc"), [[[1, 2, 3]], [[4, 5]]]))
    for arr in (ds[1], ds[0:2][1], ds.get(0, 1), ds.sizes, ds.pointers, ds.doc_idx):
        base = arr
        while not isinstance(base, np.memmap):
            assert base.base is not None, "array is a copy, not a view of the mapped file"
            base = base.base
        assert not arr.flags.owndata


def test_add_document_and_eod_style_lengths(tmp_path):
    prefix = str(tmp_path / "ad")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as b:
        b.add_document(np.array([1, 2, 3, 4, 5]), [2, 3])
        b.add_document([], [])  # an empty document is a boundary with no sequences
        b.add_document([7], [1])
        with pytest.raises(ValueError):
            b.add_document([1, 2], [3])
        b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 2, 3]
    assert [a.tolist() for a in ds[0:3]] == [[1, 2], [3, 4, 5], [7]]


def test_token_out_of_range_is_user_error(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "r.bin"), dtype=np.uint16) as b:
        with pytest.raises(UserError, match="70000"):
            b.add_item([1, 70000])
        b.abort()
    assert os.listdir(tmp_path) == []


def test_add_index_equals_single_build(tmp_path):
    docs_a = [[[1, 2, 3]], [[4], [5, 6]]]
    docs_b = [[[7, 8]], [[9, 10, 11, 12]], [[]]]
    a = build(str(tmp_path / "a"), docs_a)
    b = build(str(tmp_path / "b"), docs_b)
    whole = build(str(tmp_path / "whole"), docs_a + docs_b)
    merged = str(tmp_path / "merged")
    with IndexedDatasetBuilder(merged + ".bin", dtype=np.uint16) as builder:
        builder.add_index(a)
        builder.add_index(b)
        builder.finalize(merged + ".idx")
    for ext in (".bin", ".idx"):
        assert open(merged + ext, "rb").read() == open(whole + ext, "rb").read()


def test_add_index_dtype_mismatch(tmp_path):
    a = build(str(tmp_path / "a"), [[[1, 2]]], dtype=np.int32)
    with IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16) as builder:
        with pytest.raises(UserError, match="a.idx.*int32"):
            builder.add_index(a)
        builder.abort()


def test_interrupted_build_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with IndexedDatasetBuilder(str(tmp_path / "x.bin")) as builder:
            builder.add_item([1, 2])
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="finalize"):
        with IndexedDatasetBuilder(str(tmp_path / "y.bin")) as builder:
            builder.add_item([1])
    assert os.listdir(tmp_path) == []


def test_empty_dataset(tmp_path):
    prefix = build(str(tmp_path / "empty"), [])
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.doc_idx.tolist() == [0]
    assert os.path.getsize(prefix + ".idx") == 34 + 8


# -- corrupt files ------------------------------------------------------------------------------

def _corrupt(tmp_path, name, mutate_idx=None, mutate_bin=None):
    prefix = build(str(tmp_path / name), [[[10, 11, 12]], [[13, 14]]])
    if mutate_idx:
        data = bytearray(open(prefix + ".idx", "rb").read())
        open(prefix + ".idx", "wb").write(bytes(mutate_idx(data)))
    if mutate_bin:
        data = bytearray(open(prefix + ".bin", "rb").read())
        open(prefix + ".bin", "wb").write(bytes(mutate_bin(data)))
    return prefix


def _set(offset, raw):
    def mutate(data):
        data[offset:offset + len(raw)] = raw
        return data
    return mutate


@pytest.mark.parametrize("name, mutate_idx, mutate_bin, suffix, message", [
    ("trunc_idx", lambda d: d[:-5], None, ".idx", "truncated"),
    ("short_idx", lambda d: d[:20], None, ".idx", "truncated"),
    ("trunc_bin", None, lambda d: d[:-2], ".bin", "truncated"),
    ("long_bin", None, lambda d: d + b"\x00\x00", ".bin", "does not match"),
    ("magic", _set(0, b"XXIDIDX"), None, ".idx", "not an MMIDIDX index"),
    ("legacy", _set(0, b"TNTIDX\x00\x00\x00"), None, ".idx", "TNTIDX"),
    ("version", _set(9, struct.pack("<Q", 2)), None, ".idx", "version 2"),
    ("dtype", _set(17, b"\x09"), None, ".idx", "dtype code 9"),
    ("pointers", _set(34 + 8 + 8, struct.pack("<q", 4)), None, ".idx", "pointers"),
    ("doc_start", _set(34 + 8 + 16, struct.pack("<q", 1)), None, ".idx", "document index"),
    ("doc_end", _set(34 + 8 + 16 + 16, struct.pack("<q", 5)), None, ".idx", "document index"),
])
def test_corrupt_files_raise_user_error(tmp_path, name, mutate_idx, mutate_bin, suffix, message):
    prefix = _corrupt(tmp_path, name, mutate_idx, mutate_bin)
    with pytest.raises(UserError, match=message) as info:
        IndexedDataset(prefix)
    assert (prefix + suffix) in str(info.value)
    assert "\n" not in str(info.value)


def test_decreasing_doc_idx(tmp_path):
    prefix = build(str(tmp_path / "dec"), [[[1]], [[2]], [[3]]])
    data = bytearray(open(prefix + ".idx", "rb").read())
    off = 34 + 3 * 12
    data[off:off + 32] = struct.pack("<4q", 0, 2, 1, 3)
    open(prefix + ".idx", "wb").write(bytes(data))
    with pytest.raises(UserError, match="never decrease"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_missing_file(tmp_path, missing):
    prefix = build(str(tmp_path / "m"), [[[1, 2]]])
    os.remove(prefix + missing)
    with pytest.raises(UserError, match="not found") as info:
        IndexedDataset(prefix)
    assert prefix + missing in str(info.value)
    with pytest.raises(UserError, match="without the .bin/.idx suffix"):
        IndexedDataset(prefix + ".bin")
