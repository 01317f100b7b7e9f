"""Megatron's binary indexed dataset ("mmap" implementation, MMIDIDX format, version 1).

A dataset is a path prefix ``P`` naming two files:

* ``P.bin``: every sequence's token ids, concatenated, in one dtype, little-endian, no header;
* ``P.idx``: a 34-byte header then three arrays (all little-endian, no padding)::

    magic     9 bytes  b"MMIDIDX\\x00\\x00"
    version   <Q       1
    dtype     <B       code from DTYPE_CODES
    len       <Q       number of sequences
    doc_count <Q       number of document boundaries (= documents + 1)
    sizes     int32[len]        tokens per sequence
    pointers  int64[len]        byte offset of each sequence in P.bin
    doc_idx   int64[doc_count]  index of the first sequence of each document, then len

The files are byte-compatible with Megatron-LM and Megatron-DeepSpeed. A document is one or more
sequences (one per sentence with ``--split-sentences``, otherwise exactly one).

``IndexedDatasetBuilder`` writes a dataset; ``IndexedDataset`` reads one through ``np.memmap``
and hands out zero-copy views.
"""

import array
import os
import struct

import numpy as np

from megatron.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"  # fairseq-derived 'lazy'/'cached' format; not supported
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, len, doc_count
HEADER_SIZE = _HEADER.size  # 34

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_COPY_CHUNK = 64 * 1024 * 1024  # bytes per read when appending another dataset's .bin


def best_fitting_dtype(vocab_size=None):
    """Token dtype for a vocabulary: uint16 if it has fewer than 65500 entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def dtype_code(dtype):
    """The MMIDIDX code of ``dtype`` (ValueError for a dtype the format cannot store)."""
    dtype = np.dtype(dtype)
    try:
        return _CODE_OF_DTYPE[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not storable in an MMIDIDX dataset; "
                         f"use one of {sorted(str(d) for d in _CODE_OF_DTYPE)}") from None


def index_file_path(prefix):
    return prefix + ".idx"


def data_file_path(prefix):
    return prefix + ".bin"


def _little(dtype):
    """``dtype`` in explicit little-endian byte order (a no-op for 1-byte types)."""
    return np.dtype(dtype).newbyteorder("<")


class IndexedDatasetBuilder:
    """Writes ``bin_path`` and, in ``finalize``, the matching .idx.

    Data go to temporary files next to the final ones; only ``finalize`` renames them, the .idx
    last, so an interrupted run leaves nothing under the final names. Use it as a context
    manager (temporaries are removed if the block raises) or call ``abort()`` yourself::

        with IndexedDatasetBuilder("out.bin", dtype=np.uint16) as builder:
            builder.add_document([10, 11, 12], [3])
            builder.finalize("out.idx")
    """

    def __init__(self, bin_path, dtype=np.int32):
        self.dtype = _little(dtype)
        self._code = dtype_code(self.dtype)
        self.bin_path = os.fspath(bin_path)
        self._tmp_bin = f"{self.bin_path}.tmp.{os.getpid()}"
        self._tmp_idx = None
        self._file = open(self._tmp_bin, "wb")
        self._sizes = array.array("i")  # int32 per sequence
        self._doc_idx = array.array("q", [0])  # int64 per document boundary
        self._bytes = 0
        self._done = False
        assert self._sizes.itemsize == 4 and self._doc_idx.itemsize == 8

    # -- writing -------------------------------------------------------------------------------
    def _as_tokens(self, tokens):
        """``tokens`` as a 1-D C-contiguous array of the builder dtype, refusing lossy casts."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.dtype == self.dtype:
            return np.ascontiguousarray(arr)
        if arr.size == 0:
            return np.empty(0, dtype=self.dtype)
        if self.dtype.kind in "iu" and not np.can_cast(arr.dtype, self.dtype):
            if arr.dtype.kind not in "iu":
                raise ValueError(f"tokens of dtype {arr.dtype} cannot be stored as {self.dtype}")
            info = np.iinfo(self.dtype)
            low, high = int(arr.min()), int(arr.max())
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise UserError(f"{self.bin_path}: token id {bad} does not fit the dataset dtype "
                                f"{self.dtype.name} (range {info.min}..{info.max}); "
                                f"is the tokenizer's vocab_size right?")
        return arr.astype(self.dtype)

    def _write(self, arr):
        self._file.write(memoryview(arr).cast("B"))
        self._bytes += arr.nbytes

    def add_item(self, tokens):
        """Append one sequence (it belongs to the current document until ``end_document``)."""
        arr = self._as_tokens(tokens)
        self._write(arr)
        self._sizes.append(arr.size)

    def end_document(self):
        """Close the current document: the sequences added since the last call form one."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens, lengths):
        """Append one document of ``len(lengths)`` sequences whose tokens are ``tokens``."""
        arr = self._as_tokens(tokens)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != arr.size or any(n < 0 for n in lengths):
            raise ValueError(f"sequence lengths {lengths} do not split {arr.size} tokens")
        self._write(arr)
        self._sizes.extend(lengths)
        self._doc_idx.append(len(self._sizes))

    add_doc = add_document  # Megatron-DeepSpeed name

    def add_documents(self, tokens, sequence_lengths, sequences_per_document):
        """Append many documents at once (same result as one ``add_document`` per document).

        ``tokens`` holds every sequence back to back, ``sequence_lengths`` the length of each
        sequence, ``sequences_per_document`` how many sequences each document has (0 allowed).
        """
        arr = self._as_tokens(tokens)
        lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
        per_doc = np.asarray(sequences_per_document, dtype=np.int64)
        if (int(lengths.sum(dtype=np.int64)) != arr.size or int(per_doc.sum()) != lengths.size
                or (lengths.size and int(lengths.min()) < 0)
                or (per_doc.size and int(per_doc.min()) < 0)):
            raise ValueError("sequence_lengths / sequences_per_document do not describe tokens")
        self._write(arr)
        start = len(self._sizes)
        self._sizes.frombytes(lengths.tobytes())
        self._doc_idx.frombytes((np.cumsum(per_doc) + start).tobytes())

    def add_index(self, prefix):
        """Append every document of the dataset at ``prefix`` (same dtype required)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(f"{index_file_path(prefix)}: dtype {other.dtype.name} differs from "
                            f"the dataset being built ({self.dtype.name}); cannot merge")
        offset = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(other.sizes, dtype=np.int32).tobytes())
        tail = other.document_indices[1:].astype(np.int64) + offset
        self._doc_idx.frombytes(tail.tobytes())
        nbytes = other.nbytes
        del other  # release the memmaps before copying the file through a plain handle
        with open(data_file_path(prefix), "rb") as src:
            copied = 0
            while copied < nbytes:
                chunk = src.read(min(_COPY_CHUNK, nbytes - copied))
                if not chunk:
                    raise UserError(f"{data_file_path(prefix)}: file shrank while being merged")
                self._file.write(chunk)
                copied += len(chunk)
        self._bytes += nbytes

    merge_file_ = add_index  # Megatron-DeepSpeed name

    # -- finishing -------------------------------------------------------------------------------
    def finalize(self, idx_path=None):
        """Write the .idx and move both files to their final names (.bin first, .idx last)."""
        if self._done:
            raise RuntimeError("finalize() called twice")
        if idx_path is None:
            if not self.bin_path.endswith(".bin"):
                raise ValueError("idx_path is required when bin_path does not end in .bin")
            idx_path = self.bin_path[:-4] + ".idx"
        idx_path = os.fspath(idx_path)
        try:
            self._file.close()
            if self._doc_idx[-1] != len(self._sizes):
                # Sequences added with add_item but no end_document: they form a last document.
                self._doc_idx.append(len(self._sizes))
            sizes = np.frombuffer(self._sizes, dtype=np.int32).astype("<i4", copy=False)
            pointers = np.zeros(len(sizes), dtype="<i8")
            if len(sizes) > 1:
                np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
                pointers *= self.dtype.itemsize
            assert (int(pointers[-1]) + int(sizes[-1]) * self.dtype.itemsize
                    if len(sizes) else 0) == self._bytes, "sizes do not match bytes written"
            doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64).astype("<i8", copy=False)
            self._tmp_idx = f"{idx_path}.tmp.{os.getpid()}"
            with open(self._tmp_idx, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
                f.write(sizes.tobytes())
                f.write(pointers.tobytes())
                f.write(doc_idx.tobytes())
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, idx_path)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self):
        """Close and delete the temporary files; nothing appears under the final names."""
        self._done = True
        if not self._file.closed:
            self._file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path is not None and os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.abort()
            raise RuntimeError(f"builder for {self.bin_path} left without finalize(); "
                               f"nothing was written")
        return False

    @property
    def num_sequences(self):
        return len(self._sizes)

    @property
    def num_documents(self):
        return len(self._doc_idx) - 1


MMapIndexedDatasetBuilder = IndexedDatasetBuilder  # Megatron-DeepSpeed name


def _map(path, mmap):
    """The bytes of ``path`` as a uint8 array (memory-mapped unless ``mmap`` is False)."""
    if not mmap:
        return np.fromfile(path, dtype=np.uint8)
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=np.uint8)  # np.memmap refuses empty files
    return np.memmap(path, dtype=np.uint8, mode="r")


class IndexedDataset:
    """Read-only MMIDIDX dataset. Arrays and items are views into the mapped files.

    ``len(ds)`` is the number of sequences; ``ds[i]`` is sequence ``i`` (a numpy view, no copy);
    ``ds[a:b]`` is a list of such views; ``document_indices`` (alias ``doc_idx``) gives, for each
    document, the index of its first sequence, followed by ``len(ds)``.
    """

    def __init__(self, path_prefix, mmap=True):
        self.path_prefix = os.fspath(path_prefix)
        self.mmap = mmap
        self._open()

    def _open(self):
        prefix = self.path_prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                hint = ""
                if prefix.endswith((".bin", ".idx")):
                    hint = " (give the path prefix without the .bin/.idx suffix)"
                raise UserError(f"{path}: dataset file not found{hint}")

        idx = _map(idx_path, self.mmap)
        head = bytes(idx[:HEADER_SIZE])
        if head[:8] == LEGACY_MAGIC:
            raise UserError(f"{idx_path}: legacy TNTIDX ('lazy'/'cached') index; only the "
                            f"MMIDIDX ('mmap') format is supported")
        if head[:9] != MAGIC[:len(head)]:  # a short file may still be a truncated index
            raise UserError(f"{idx_path}: not an MMIDIDX index (magic {head[:9]!r}, "
                            f"expected {MAGIC!r})")
        if len(head) < HEADER_SIZE:
            raise UserError(f"{idx_path}: {len(head)} bytes, too short for an MMIDIDX index "
                            f"header ({HEADER_SIZE} bytes); index truncated")
        _, version, code, length, doc_count = _HEADER.unpack(head)
        if version != VERSION:
            raise UserError(f"{idx_path}: MMIDIDX version {version}, only version {VERSION} "
                            f"is supported")
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unknown dtype code {code} "
                            f"(expected one of {sorted(DTYPE_CODES)})")
        expected = HEADER_SIZE + 4 * length + 8 * length + 8 * doc_count
        if idx.size != expected:
            raise UserError(f"{idx_path}: {idx.size} bytes, expected {expected} for {length} "
                            f"sequences and {doc_count} document boundaries; index truncated "
                            f"or corrupt")
        self.dtype = _little(DTYPE_CODES[code])
        self._idx = idx
        off = HEADER_SIZE
        self.sizes = np.frombuffer(idx, dtype="<i4", count=length, offset=off)
        off += 4 * length
        self.pointers = np.frombuffer(idx, dtype="<i8", count=length, offset=off)
        off += 8 * length
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=doc_count, offset=off)

        itemsize = self.dtype.itemsize
        if length:
            last = int(self.pointers[-1])
            total_before_last = int(self.sizes[:-1].sum(dtype=np.int64))
            if int(self.pointers[0]) != 0 or last != total_before_last * itemsize:
                raise UserError(f"{idx_path}: sequence pointers are inconsistent with sequence "
                                f"sizes; index corrupt")
            if int(self.sizes.min()) < 0:
                raise UserError(f"{idx_path}: negative sequence size; index corrupt")
            self.nbytes = last + int(self.sizes[-1]) * itemsize
        else:
            self.nbytes = 0
        docs = self.document_indices
        if (doc_count == 0 or docs[0] != 0 or docs[-1] != length
                or (doc_count > 1 and bool((docs[1:] < docs[:-1]).any()))):
            raise UserError(f"{idx_path}: document index must start at 0, end at the number "
                            f"of sequences ({length}) and never decrease; index corrupt")

        bin_size = os.path.getsize(bin_path)
        if bin_size != self.nbytes:
            raise UserError(f"{bin_path}: {bin_size} bytes, but its index {idx_path} describes "
                            f"{self.nbytes}; data file truncated or does not match the index")
        self._bin = _map(bin_path, self.mmap)

    # -- pickling: reopen the files instead of copying the mapped arrays ----------------------
    def __getstate__(self):
        return {"path_prefix": self.path_prefix, "mmap": self.mmap}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self.mmap = state["mmap"]
        self._open()

    # -- access --------------------------------------------------------------------------------
    @property
    def doc_idx(self):
        return self.document_indices

    @property
    def num_documents(self):
        return len(self.document_indices) - 1

    def __len__(self):
        return len(self.sizes)

    def _index(self, idx):
        n = len(self.sizes)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        return i

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must have step 1")
            if stop <= start:
                return []
            sizes = self.sizes[start:stop]
            flat = np.frombuffer(self._bin, dtype=self.dtype, count=int(sizes.sum(dtype=np.int64)),
                                 offset=int(self.pointers[start]))
            return np.split(flat, np.cumsum(sizes[:-1], dtype=np.int64))
        i = self._index(idx)
        return np.frombuffer(self._bin, dtype=self.dtype, count=int(self.sizes[i]),
                             offset=int(self.pointers[i]))

    def get(self, idx, offset=0, length=None):
        """Tokens ``offset .. offset+length`` of sequence ``idx`` (to its end if no length)."""
        i = self._index(idx)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}..{offset + length} out of range for sequence {i} "
                             f"of {size} tokens")
        return np.frombuffer(self._bin, dtype=self.dtype, count=length,
                             offset=int(self.pointers[i]) + offset * self.dtype.itemsize)

    @staticmethod
    def exists(path_prefix):
        """True if both ``prefix.idx`` and ``prefix.bin`` exist."""
        return (os.path.isfile(index_file_path(path_prefix))
                and os.path.isfile(data_file_path(path_prefix)))

    def __repr__(self):
        return (f"IndexedDataset({self.path_prefix!r}: {len(self)} sequences, "
                f"{self.num_documents} documents, {self.dtype.name})")


MMapIndexedDataset = IndexedDataset  # Megatron-DeepSpeed name
