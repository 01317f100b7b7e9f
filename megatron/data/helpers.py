"""Loader for the compiled data helpers (helpers.c), with numpy/Python fallbacks.

helpers.c is compiled on first use with the system C compiler (``$CC`` or ``cc``) into a cache
directory (``$MEGATRON_LTD_CACHE``, default ``~/.cache/megatron_ltd``). The shared object's name
carries a hash of the source, so an edited helpers.c is rebuilt; compilation runs under a file
lock and the result is renamed into place, so concurrent processes never load a half-written
library. Without a compiler the Python fallbacks are used (one warning).

Public functions:
    build_blending_indices(weights, size) -> (dataset_index uint8, dataset_sample_index int64)
    build_sample_idx(sizes, doc_idx, seq_length, num_samples) -> int64 array [num_samples + 1, 2]
"""

import ctypes
import fcntl
import hashlib
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
