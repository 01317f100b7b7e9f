"""GPT dataset: fixed-length samples cut from shuffled, concatenated documents (Megatron-exact).

Three index arrays, cached as .npy next to the data and memory-mapped on load:
    doc_idx      int32 [E * D]   documents of E epochs, shuffled (the last epoch separately when
                                 it is used for less than 80% of its samples)
    sample_idx   int64 [N + 1, 2] (position in doc_idx, token offset) where sample k starts;
                                 sample k spans tokens [start_k, start_{k+1}] inclusive, so
                                 consecutive samples share one boundary token
    shuffle_idx  uint32/int64 [N] order in which samples are served
with one np.random.RandomState(seed) used for the doc_idx shuffle(s), then the shuffle_idx ones.
"""

import contextlib
import fcntl
import hashlib
import os
import time

import numpy as np
import torch

from megatron.data import helpers
from megatron.errors import UserError


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens from ``documents`` of ``indexed_dataset``.

    Args:
        name: split name ('train', 'valid', 'test'); part of the cache key.
        data_prefix: path prefix of the .bin/.idx pair; decides the default cache directory.
        indexed_dataset: object with ``sizes`` (int32 tokens per sequence) and
            ``get(i, offset=0, length=None)``.
        documents: sequence indices used by this split (Megatron: np.arange(start, end)).
        num_samples: minimum number of samples wanted; len(self) may be larger.
        seq_length: tokens per sample (each item holds seq_length + 1).
        seed: seed of the legacy numpy RandomState driving both shuffles.
        cache_dir: ``--data-cache-path``; looked in after ``<dirname(prefix)>/index-cache``
            and, if the index is found nowhere, the place where it is built.
        splits_string: the ``--split`` value, recorded in the cache description as Megatron does.
        log: callable receiving one info line at a time.
    """

    def __init__(self, name, data_prefix, indexed_dataset, documents, num_samples, seq_length,
                 seed, cache_dir=None, splits_string=None, log=print):
        self.name = name
        self.data_prefix = data_prefix
        self.indexed_dataset = indexed_dataset
        documents = np.asarray(documents, dtype=np.int32)
        sizes = np.asarray(indexed_dataset.sizes)
        if documents.size == 0:
            raise ValueError(f"GPTDataset {name}: no documents")
        if documents.min() < 0 or documents.max() >= sizes.shape[0]:
            raise ValueError(f"GPTDataset {name}: document indices outside [0, {sizes.shape[0]})")
        if seq_length < 1:
            raise UserError(f"--seq-length: expected a positive integer, got {seq_length}")
        if num_samples < 0:
            raise ValueError(f"GPTDataset {name}: negative num_samples {num_samples}")
        split_tokens = int(np.sum(sizes[documents], dtype=np.int64))
        if num_samples > 0 and split_tokens <= seq_length:
            raise UserError(
                f"{data_prefix}: the {name} split has {documents.size} document(s) with "
                f"{split_tokens} tokens, fewer than one sample of --seq-length {seq_length} + 1; "
                "give it more data with --split (or set --eval-iters 0)")
        self.seq_length = seq_length
        (self.doc_idx, self.sample_idx, self.shuffle_idx, self.num_epochs,
         self.loaded_from_cache, self.cache_paths) = _build_index_mappings(
            name, data_prefix, documents, sizes, splits_string, num_samples, seq_length, seed,
            cache_dir, log)

    def __len__(self):
        # sample i spans rows i and i + 1 of sample_idx
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx):
        if idx < 0:
            idx += len(self)
        j = int(self.shuffle_idx[idx])
        doc_f, off_f = (int(v) for v in self.sample_idx[j])
        doc_l, off_l = (int(v) for v in self.sample_idx[j + 1])
        get = self.indexed_dataset.get
        if doc_f == doc_l:
            sample = get(int(self.doc_idx[doc_f]), offset=off_f, length=off_l - off_f + 1)
        else:
            parts = [get(int(self.doc_idx[doc_f]), offset=off_f)]
            parts.extend(get(int(self.doc_idx[d])) for d in range(doc_f + 1, doc_l))
            parts.append(get(int(self.doc_idx[doc_l]), length=off_l + 1))
            sample = np.concatenate(parts)
        return {"text": np.array(sample, dtype=np.int64)}


# ---------------------------------------------------------------------------------------------
# Index building


def num_epochs_for(tokens_per_epoch, seq_length, num_samples):
    """Smallest E >= 1 with (E * tokens_per_epoch - 1) // seq_length >= num_samples."""
    if tokens_per_epoch <= 0:
        raise ValueError("num_epochs_for: the documents hold no tokens")
    # Closed form of Megatron's loop: need E * T >= num_samples * L + 1.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents, num_epochs, np_rng, separate_last_epoch):
    """Documents repeated num_epochs times and shuffled (last epoch separately if asked)."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        np_rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, np_rng, False)
    last = build_doc_idx(documents, 1, np_rng, False)
    return np.concatenate((first, last))


def build_shuffle_idx(num_samples, total_size, np_rng):
    """shuffle(arange(0, num_samples)) followed by shuffle(arange(num_samples, total_size))."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    np_rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    np_rng.shuffle(last)
    return np.concatenate((first, last))


def compute_index_mappings(documents, sizes, num_samples, seq_length, seed, log=print):
    """Build (doc_idx, sample_idx, shuffle_idx, num_epochs) in memory, as Megatron does."""
    sizes = np.asarray(sizes)
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    if tokens_per_epoch == 0:
        raise UserError("data: the selected documents contain no tokens")
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    np_rng = np.random.RandomState(seed=seed)

    if num_epochs == 1:
        separate_last_epoch = False
        log(" > only one epoch required, setting separate_last_epoch to False")
    else:
        from_epochs_minus_one = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_num_samples = num_samples - from_epochs_minus_one
        num_samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        # The last epoch can hold one sample more than (tokens_per_epoch - 1) // seq_length:
        # where a sample starts depends on the epochs before it (Megatron-LM allows
        # num_samples_per_epoch + 1 here too).
        assert 0 <= last_epoch_num_samples <= num_samples_per_epoch + 1
        # Less than 80% of the last epoch is used: shuffle it on its own so its samples are
        # not spread over (and diluting) the earlier epochs.
        separate_last_epoch = last_epoch_num_samples < int(0.80 * num_samples_per_epoch)
        log(f" > last epoch number of samples ({last_epoch_num_samples}) is "
            f"{'smaller' if separate_last_epoch else 'larger'} than 80% of number of samples "
            f"per epoch ({num_samples_per_epoch}), setting separate_last_epoch to "
            f"{separate_last_epoch}")

    start = time.time()
    doc_idx = build_doc_idx(documents, num_epochs, np_rng, separate_last_epoch)
    log(f" > elapsed time to build doc-idx mapping (seconds): {time.time() - start:4f}")

    start = time.time()
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, total_samples)
    log(f" > elapsed time to build sample-idx mapping (seconds): {time.time() - start:4f}")

    start = time.time()
    if separate_last_epoch:
        first_part = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    else:
        first_part = total_samples
    log(f" > building shuffle index with split [0, {first_part}) and "
        f"[{first_part}, {total_samples}) ...")
    shuffle_idx = build_shuffle_idx(first_part, total_samples, np_rng)
    log(f" > elapsed time to build shuffle-idx mapping (seconds): {time.time() - start:4f}")
    return doc_idx, sample_idx, shuffle_idx, num_epochs


def describe(name, data_prefix, num_samples, num_epochs, seq_length, seed, splits_string):
    """Megatron's cache description string (its md5 names the cache files)."""
    return ("GPT Dataset\n\n"
            f"Data prefix {data_prefix}\n"
            f"Dataset name {name}\n"
            f"Number of samples {num_samples}\n"
            f"Number of epochs {num_epochs}\n"
            f"Sequence length {seq_length}\n"
            f"Random seed {seed}\n"
            f"Split {splits_string}\n")


def _cache_files(directory, desc_hash):
    return {key: os.path.join(directory, f"{desc_hash}{suffix}")
            for key, suffix in (("desc", ".dsc"), ("doc", "_doc_idx.npy"),
                                ("sample", "_sample_idx.npy"), ("shuffle", "_shuffle_idx.npy"))}


def _atomic_save(path, write):
    """Write through a unique temporary file in the same directory, then rename into place."""
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_index_array(path, what, ndim, columns=None):
    """A cached index array, memory-mapped, read without pickle (``allow_pickle=False``): the
    cache files are plain integer arrays, and their names are predictable hashes, so a file
    planted there must never run code. Anything else -- a pickle, an object array, another
    shape, a truncated file -- is a UserError naming the file. It is refused rather than
    rebuilt: another rank may be reading it, and a planted file is worth a look."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{path}: unreadable {what} ({err}); delete it to rebuild") from None
    if array.ndim != ndim or array.dtype.kind not in "iu" \
            or (columns is not None and array.shape[1] != columns):
        expected = f"[n, {columns}]" if columns is not None else f"{ndim}-dimensional"
        raise UserError(f"{path}: expected a {expected} integer {what}, got shape "
                        f"{array.shape} dtype {array.dtype}; delete it to rebuild")
    return array


@contextlib.contextmanager
def _build_lock(path):
    """Exclusive advisory lock so concurrent ranks build an index once; the atomic renames keep
    the cache correct even where locking is unavailable (some network file systems)."""
    try:
        handle = open(path, "a")
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        handle.close()  # releases the lock


def _build_and_save(files, desc, name, directory, documents, sizes, num_samples, seq_length,
                    seed, log):
    log(f" > WARNING: could not find index map files for {name}, building them in "
        f"{directory} ...")
    doc_idx, sample_idx, shuffle_idx, _ = compute_index_mappings(
        documents, sizes, num_samples, seq_length, seed, log)
    for key, array in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", shuffle_idx)):
        _atomic_save(files[key], lambda f, a=array: np.save(f, a, allow_pickle=False))
    _atomic_save(files["desc"], lambda f: f.write(desc.encode("utf-8")))


def _build_index_mappings(name, data_prefix, documents, sizes, splits_string, num_samples,
                          seq_length, seed, cache_dir, log):
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    if tokens_per_epoch == 0:
        raise UserError(f"data: {data_prefix}: the {name} split's documents contain no tokens")
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    desc = describe(name, data_prefix, num_samples, num_epochs, seq_length, seed, splits_string)
    desc_hash = hashlib.md5(desc.encode("utf-8")).hexdigest()

    directories = [os.path.join(os.path.dirname(data_prefix), "index-cache")]
    if cache_dir:
        directories.append(cache_dir)
    files = None
    for directory in directories:
        candidate = _cache_files(directory, desc_hash)
        if all(os.path.isfile(candidate[k]) for k in ("doc", "sample", "shuffle")):
            files = candidate
            break
    loaded_from_cache = files is not None

    if files is None:
        files = _cache_files(directories[-1], desc_hash)
        try:
            os.makedirs(directories[-1], exist_ok=True)
            with _build_lock(os.path.join(directories[-1], f"{desc_hash}.lock")):
                # Another process may have built the index while we waited for the lock.
                if not all(os.path.isfile(files[k]) for k in ("doc", "sample", "shuffle")):
                    _build_and_save(files, desc, name, directories[-1], documents, sizes,
                                    num_samples, seq_length, seed, log)
        except OSError as err:
            raise UserError(f"--data-cache-path: cannot write the index cache in "
                            f"{directories[-1]} ({err.strerror or err}); give a writable "
                            f"--data-cache-path") from None

    start = time.time()
    log(f" > loading doc-idx mapping from {files['doc']}")
    doc_idx = load_index_array(files["doc"], "doc-idx mapping", ndim=1)
    log(f" > loading sample-idx mapping from {files['sample']}")
    sample_idx = load_index_array(files["sample"], "sample-idx mapping", ndim=2, columns=2)
    log(f" > loading shuffle-idx mapping from {files['shuffle']}")
    shuffle_idx = load_index_array(files["shuffle"], "shuffle-idx mapping", ndim=1)
    if shuffle_idx.shape[0] > sample_idx.shape[0] - 1:
        raise UserError(f"{files['shuffle']}: {shuffle_idx.shape[0]} samples, but the "
                        f"sample-idx mapping beside it holds {sample_idx.shape[0] - 1}; delete "
                        f"its {desc_hash}* files to rebuild them")
    log(f"    loaded indexed file in {time.time() - start:3.3f} seconds"
        f"{' (cached)' if loaded_from_cache else ''}")
    log(f"    total number of documents: {documents.shape[0]}")
    log(f"    total number of samples: {sample_idx.shape[0]}")
    log(f"    total number of epochs: {num_epochs}")
    return doc_idx, sample_idx, shuffle_idx, num_epochs, loaded_from_cache, files
