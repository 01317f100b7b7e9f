"""Loader for the compiled data helpers (helpers.c), with numpy/Python fallbacks.

helpers.c is compiled on first use with the system C compiler (``$CC`` or ``cc``) into a cache
directory (``$MEGATRON_LTD_CACHE``, default ``~/.cache/megatron_ltd``). The shared object's name
carries a hash of the source, so an edited helpers.c is rebuilt; compilation runs under a file
lock and the result is renamed into place, so concurrent processes never load a half-written
library. Without a compiler the Python fallbacks are used (one warning).

Public functions:
    build_blending_indices(weights, size) -> (dataset_index uint8, dataset_sample_index int64)
    build_sample_idx(sizes, doc_idx, seq_length, num_samples) -> int64 array [num_samples + 1, 2]
    build_mapping(docs, sizes, num_epochs, max_num_samples, max_seq_length, short_seq_prob, seed,
                  verbose, min_num_sent) -> uint32/uint64 array [n, 3] (BERT samples mapping)
    mt19937(seed, n) / mt19937_64(seed, n): the first n outputs of std::mt19937 / mt19937_64
"""

import ctypes
import fcntl
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers.c")
_CACHE_ENV = "MEGATRON_LTD_CACHE"
_lock = threading.Lock()
_lib = None           # loaded ctypes library
_lib_tried = False    # whether loading was attempted (successfully or not)


def cache_dir():
    """Directory holding the compiled helpers."""
    return os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "megatron_ltd")


def _compile(so_path):
    """Compile helpers.c to so_path under a file lock; returns an error string or None."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return f"no C compiler found ({compiler!r})"
    directory = os.path.dirname(so_path)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "helpers.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if os.path.exists(so_path):  # another process built it while we waited
                return None
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            cmd = [compiler, "-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=c99",
                   _SOURCE, "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                return f"{' '.join(cmd)} failed: {proc.stderr.strip()}"
            os.replace(tmp, so_path)
            return None
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _load():
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    so_path = os.path.join(cache_dir(), f"helpers_{digest}.so")
    if not os.path.exists(so_path):
        error = _compile(so_path)
        if error is not None:
            raise OSError(error)
    lib = ctypes.CDLL(so_path)
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.build_blending_indices.argtypes = [ptr, ptr, ptr, i32, i64]
    lib.build_blending_indices.restype = ctypes.c_int
    lib.build_sample_idx.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.build_sample_idx.restype = ctypes.c_int
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    lib.mt19937_fill.argtypes = [ptr, i64, u32]
    lib.mt19937_fill.restype = None
    lib.mt19937_64_fill.argtypes = [ptr, i64, u64]
    lib.mt19937_64_fill.restype = None
    lib.build_bert_mapping.argtypes = [ptr, i32, ptr, i64, ptr, i32, u64, i32, i32, i64, i32,
                                       ptr]
    lib.build_bert_mapping.restype = i64
    lib.shuffle_bert_mapping.argtypes = [ptr, i32, i64, u64]
    lib.shuffle_bert_mapping.restype = None
    return lib


def compiled_library():
    """The loaded helpers library, or None (after one warning) if it cannot be built."""
    global _lib, _lib_tried
    with _lock:
        if not _lib_tried:
            _lib_tried = True
            try:
                _lib = _load()
            except OSError as err:
                warnings.warn(f"megatron.data.helpers: compiled helpers unavailable ({err}); "
                              "using the slower Python fallback", RuntimeWarning, stacklevel=3)
                _lib = None
        return _lib


def _reset_for_tests():
    global _lib, _lib_tried
    with _lock:
        _lib, _lib_tried = None, False


def _ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


# ---------------------------------------------------------------------------------------------
# Blending indices


def build_blending_indices_py(weights, size):
    """Python reference of Megatron's greedy blending (same float arithmetic as helpers.c)."""
    weights = [float(w) for w in weights]
    current = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.uint8)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for s in range(size):
        sd = float(s) if s > 1 else 1.0
        best, best_error = 0, weights[0] * sd - float(current[0])
        for i in range(1, len(weights)):
            error = weights[i] * sd - float(current[i])
            if error > best_error:
                best, best_error = i, error
        dataset_index[s] = best
        dataset_sample_index[s] = current[best]
        current[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights, size, use_c=True):
    """Which dataset (uint8) and which of its samples (int64) fill each blended sample."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not 0 < weights.size < 256:
        raise ValueError(f"blending needs 1..255 datasets, got {weights.size}")
    lib = compiled_library() if use_c else None
    if lib is None:
        return build_blending_indices_py(weights, size)
    dataset_index = np.empty(size, dtype=np.uint8)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    rc = lib.build_blending_indices(_ptr(dataset_index), _ptr(dataset_sample_index),
                                    _ptr(weights), weights.size, size)
    if rc != 0:
        raise MemoryError("build_blending_indices: allocation failed")
    return dataset_index, dataset_sample_index


# ---------------------------------------------------------------------------------------------
# GPT sample index


def build_sample_idx_np(sizes, doc_idx, seq_length, num_samples):
    """Vectorised sample_idx: row k is where sample k starts (and sample k-1 ends).

    Sample k starts at global token k * seq_length of the concatenated documents (consecutive
    samples share that boundary token). Megatron's loop records the non-empty document holding
    that token and the offset inside it, so a sample ending exactly at a document's last token
    stays in that document, and zero-length documents are never pointed at (except row 0).
    """
    lengths = np.asarray(sizes)[doc_idx].astype(np.int64)
    ends = np.cumsum(lengths)                                 # exclusive end of each doc
    targets = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and (ends.size == 0 or targets[-1] >= ends[-1]):
        raise ValueError("build_sample_idx: documents hold too few tokens")
    doc_pos = np.searchsorted(ends, targets, side="right")   # first doc whose end > target
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_idx[0] = 0
    sample_idx[1:, 0] = doc_pos
    sample_idx[1:, 1] = targets - (ends[doc_pos] - lengths[doc_pos])
    return sample_idx


def build_sample_idx(sizes, doc_idx, seq_length, num_samples, use_c=True):
    """sample_idx [num_samples + 1, 2] int64 of (index into doc_idx, token offset)."""
    lib = compiled_library() if use_c else None
    if lib is None:
        return build_sample_idx_np(sizes, doc_idx, seq_length, num_samples)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int32)
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    rc = lib.build_sample_idx(_ptr(out), _ptr(sizes), _ptr(doc_idx), doc_idx.size,
                              int(seq_length), int(num_samples))
    if rc != 0:
        raise ValueError("build_sample_idx: documents hold too few tokens")
    return out


# ---------------------------------------------------------------------------------------------
# Mersenne Twister (std::mt19937 / std::mt19937_64), numpy implementation for the fallback


class _MTParams:
    def __init__(self, dtype, n, m, a, upper, lower, f, shift, temper):
        self.dtype, self.n, self.m, self.f, self.shift, self.temper = dtype, n, m, f, shift, temper
        self.a, self.upper, self.lower = dtype(a), dtype(upper), dtype(lower)
        self.width = np.dtype(dtype).itemsize * 8


def _temper32(y):
    y = y ^ (y >> 11)
    y = y ^ ((y << 7) & np.uint32(0x9D2C5680))
    y = y ^ ((y << 15) & np.uint32(0xEFC60000))
    return y ^ (y >> 18)


def _temper64(y):
    y = y ^ ((y >> 29) & np.uint64(0x5555555555555555))
    y = y ^ ((y << 17) & np.uint64(0x71D67FFFEDA60000))
    y = y ^ ((y << 37) & np.uint64(0xFFF7EEE000000000))
    return y ^ (y >> 43)


_MT32 = _MTParams(np.uint32, 624, 397, 0x9908B0DF, 0x80000000, 0x7FFFFFFF, 1812433253, 30,
                  _temper32)
_MT64 = _MTParams(np.uint64, 312, 156, 0xB5026F5AA96619E9, 0xFFFFFFFF80000000, 0x7FFFFFFF,
                  6364136223846793005, 62, _temper64)


class MersenneTwister:
    """std::mt19937 (``bits=32``) or std::mt19937_64 (``bits=64``) seeded with ``seed``.

    The state update is vectorised in numpy (one block of n outputs per twist), so drawing is
    cheap; ``next()`` hands out the buffered block as Python ints.
    """

    def __init__(self, seed, bits=32):
        self._p = p = _MT32 if bits == 32 else _MT64
        mask = (1 << p.width) - 1
        state = [int(seed) & mask]
        for i in range(1, p.n):
            prev = state[-1]
            state.append((p.f * (prev ^ (prev >> p.shift)) + i) & mask)
        self._mt = np.array(state, dtype=p.dtype)
        self._block = []
        self._pos = 0

    def _twist(self):
        p, mt = self._p, self._mt
        n, m = p.n, p.m
        start = 0
        # mt[i] depends on mt[i+1] (not yet updated) and mt[(i+m) % n] (updated once i >= n-m):
        # blocks of n-m entries depend only on earlier blocks.
        while start < n - 1:
            end = min(start + (n - m), n - 1)
            y = (mt[start:end] & p.upper) | (mt[start + 1:end + 1] & p.lower)
            src = mt[(np.arange(start, end) + m) % n]
            mt[start:end] = src ^ (y >> 1) ^ ((y & 1) * p.a)
            start = end
        y = (mt[n - 1] & p.upper) | (mt[0] & p.lower)
        mt[n - 1] = mt[m - 1] ^ (y >> 1) ^ ((y & 1) * p.a)

    def block(self):
        """The next n outputs as a numpy array (discarding what is left of the current one)."""
        self._twist()
        self._block, self._pos = [], 0
        return self._p.temper(self._mt.copy())

    def next(self):
        if self._pos >= len(self._block):
            self._twist()
            self._block = self._p.temper(self._mt.copy()).tolist()
            self._pos = 0
        value = self._block[self._pos]
        self._pos += 1
        return value

    def take(self, count):
        """The next ``count`` outputs as a numpy array."""
        parts, have = [], 0
        if self._pos < len(self._block):
            rest = np.array(self._block[self._pos:self._pos + count], dtype=self._p.dtype)
            self._pos += rest.size
            parts.append(rest)
            have = rest.size
        while have < count:
            block = self.block()
            need = min(count - have, block.size)
            if need < block.size:
                self._block, self._pos = block.tolist(), need
            parts.append(block[:need])
            have += need
        return np.concatenate(parts) if parts else np.empty(0, dtype=self._p.dtype)


def mt19937(seed, n, use_c=True):
    """The first n outputs of std::mt19937(seed) as uint32."""
    lib = compiled_library() if use_c else None
    if lib is None:
        return MersenneTwister(seed, 32).take(n)
    out = np.empty(n, dtype=np.uint32)
    lib.mt19937_fill(_ptr(out), int(n), int(seed) % 2**32)
    return out


def mt19937_64(seed, n, use_c=True):
    """The first n outputs of std::mt19937_64(seed) as uint64."""
    lib = compiled_library() if use_c else None
    if lib is None:
        return MersenneTwister(seed, 64).take(n)
    out = np.empty(n, dtype=np.uint64)
    lib.mt19937_64_fill(_ptr(out), int(n), int(seed) % 2**64)
    return out


# ---------------------------------------------------------------------------------------------
# BERT samples mapping

LONG_SENTENCE_LEN = 512


def short_seq_ratio(short_seq_prob):
    """C's ``(int32_t) round(1.0 / short_seq_prob)`` (0 when the probability is 0)."""
    if short_seq_prob <= 0:
        return 0
    x = 1.0 / float(short_seq_prob)
    floor = math.floor(x)
    return int(floor + 1 if x - floor >= 0.5 else floor)  # round half away from zero


def document_stats(docs, sizes):
    """Per document: number of sentences and whether build_mapping skips it for a sentence
    longer than LONG_SENTENCE_LEN (only checked for documents of more than one sentence)."""
    docs = np.asarray(docs, dtype=np.int64)
    counts = np.diff(docs)
    lo, hi = int(docs[0]), int(docs[-1])
    long_cum = np.zeros(hi - lo + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes[lo:hi]) > LONG_SENTENCE_LEN, out=long_cum[1:])
    has_long = (long_cum[docs[1:] - lo] - long_cum[docs[:-1] - lo] > 0) & (counts > 1)
    return counts, has_long


def build_mapping_py(docs, sizes, num_epochs, max_num_samples, max_seq_length, short_seq_prob,
                     seed, min_num_sent):
    """Pure Python/numpy build_mapping: same rows and order as the C version (slower).

    One Python step per sample (not per sentence): from a sample's first sentence the end is
    found with a binary search over the sentence-length prefix sums.
    """
    docs = np.asarray(docs, dtype=np.int64)
    sizes = np.asarray(sizes)
    ratio = short_seq_ratio(short_seq_prob)
    rng = MersenneTwister(int(seed) % 2**32, 32)

    def target():
        if ratio == 0:
            return max_seq_length
        r = rng.next()
        return 2 + r % (max_seq_length - 1) if r % ratio == 0 else max_seq_length

    lo, hi = int(docs[0]), int(docs[-1])
    cum = np.zeros(hi - lo + 1, dtype=np.int64)  # cum[k - lo] = tokens of sentences lo..k-1
    np.cumsum(sizes[lo:hi], out=cum[1:])
    counts, has_long = document_stats(docs, sizes)
    eligible = np.flatnonzero((counts >= min_num_sent) & ~has_long)
    firsts, lasts = docs[eligible].tolist(), docs[eligible + 1].tolist()
    rows = []
    for _ in range(num_epochs):
        if len(rows) >= max_num_samples:
            break
        epoch_start = len(rows)
        for first, last in zip(firsts, lasts):
            start, goal = first, target()
            while True:
                # Megatron emits at the first sentence k with (tokens[start..k] >= goal and
                # k - start + 1 >= min_num_sent and more than one sentence left) or at the
                # document's last sentence; the first clause holds on an interval of k.
                j = int(np.searchsorted(cum, cum[start - lo] + goal, side="left")) + lo
                k = max(j - 1, start + min_num_sent - 1, start)
                if k > last - 3:
                    k = last - 1
                rows.append((start, k + 1, goal))
                goal = target()
                start = k + 1
                if start >= last:
                    break
        if len(rows) == epoch_start:
            break
    dtype = np.uint64 if sizes.shape[0] > np.iinfo(np.uint32).max else np.uint32
    maps = np.array(rows, dtype=dtype).reshape(-1, 3)
    # Fisher-Yates with std::mt19937_64(seed + 1), applied to a permutation of the rows.
    n = maps.shape[0]
    perm = list(range(n))
    rng64 = MersenneTwister((int(seed) + 1) % 2**64, 64)
    for i in range(n - 1, 0, -1):
        j = rng64.next() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return maps[np.array(perm, dtype=np.int64)] if n else maps


def build_mapping(docs, sizes, num_epochs, max_num_samples, max_seq_length, short_seq_prob,
                  seed, verbose=False, min_num_sent=2, use_c=True, log=print):
    """Megatron's BERT samples mapping: rows (first sentence, end sentence exclusive, target
    length), shuffled; uint32, or uint64 when there are more than 2^32 - 1 sentences.

    ``docs`` are document boundaries into ``sizes`` (a slice of the dataset's doc_idx);
    documents with fewer than ``min_num_sent`` sentences, or of more than one sentence with one
    longer than LONG_SENTENCE_LEN tokens, are skipped. Target lengths come from
    std::mt19937(seed) (a short target 2 + r % (max_seq_length - 1) when r % round(1 /
    short_seq_prob) == 0), and the rows are shuffled with std::mt19937_64(seed + 1). Epochs over
    the documents repeat until at least ``max_num_samples`` rows exist (checked per epoch), at
    most ``num_epochs``.
    """
    docs = np.ascontiguousarray(docs, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    if docs.ndim != 1 or docs.size < 1:
        raise ValueError("build_mapping: docs must be a 1-D array of document boundaries")
    if docs.size > 1 and (int(docs[0]) < 0 or int(docs[-1]) > sizes.shape[0]
                          or bool((docs[1:] < docs[:-1]).any())):
        raise ValueError(f"build_mapping: document boundaries must be nondecreasing within "
                         f"[0, {sizes.shape[0]}]")
    if max_seq_length < 2:
        raise ValueError(f"build_mapping: max_seq_length must be > 1, got {max_seq_length}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"build_mapping: short_seq_prob must be in [0, 1], got {short_seq_prob}")
    if num_epochs < 1 or max_num_samples < 0:
        raise ValueError("build_mapping: num_epochs must be >= 1 and max_num_samples >= 0")
    num_epochs = min(int(num_epochs), np.iinfo(np.int32).max)
    max_num_samples = min(int(max_num_samples), 2**64 - 1)
    ratio = short_seq_ratio(short_seq_prob)
    if ratio > np.iinfo(np.int32).max:
        raise ValueError(f"build_mapping: short_seq_prob {short_seq_prob} is too small")
    if verbose:
        log(f"    using:\n     number of documents:            {docs.size - 1}\n"
            f"     sentences range:                [{docs[0]}, {docs[-1]})\n"
            f"     total number of sentences:      {docs[-1] - docs[0]}\n"
            f"     number of epochs:               {num_epochs}\n"
            f"     maximum number of samples:      {max_num_samples}\n"
            f"     maximum sequence length:        {max_seq_length}\n"
            f"     short sequence probability:     {short_seq_prob}\n"
            f"     short sequence ration (1/prob): {ratio}\n"
            f"     seed:                           {seed}")
    lib = compiled_library() if use_c else None
    if lib is None or docs.size < 2:
        if docs.size < 2:
            dtype = np.uint64 if sizes.shape[0] > np.iinfo(np.uint32).max else np.uint32
            return np.empty((0, 3), dtype=dtype)
        return build_mapping_py(docs, sizes, num_epochs, max_num_samples, max_seq_length,
                                short_seq_prob, seed, min_num_sent)
    is_64 = sizes.shape[0] > np.iinfo(np.uint32).max
    stats = np.zeros(3, dtype=np.int64)
    args = (docs.ctypes.data_as(ctypes.c_void_p), docs.size - 1, _ptr(sizes), num_epochs,
            max_num_samples, int(max_seq_length), ratio, int(seed), int(min_num_sent))
    count = lib.build_bert_mapping(None, int(is_64), *args, _ptr(stats))
    if verbose:
        log(f"   number of empty documents: {stats[0]}\n"
            f"   number of documents with one sentence: {stats[1]}\n"
            f"   number of documents with long sentences: {stats[2]}\n"
            f"   will create mapping for {count} samples")
    maps = np.empty((count, 3), dtype=np.uint64 if is_64 else np.uint32)
    filled = lib.build_bert_mapping(_ptr(maps), int(is_64), *args, None)
    assert filled == count
    lib.shuffle_bert_mapping(_ptr(maps), int(is_64), count, (int(seed) + 1) % 2**64)
    return maps
