"""BERT pretraining dataset (Megatron-DeepSpeed's ``BertDataset``, same samples for a seed).

Input: an MMIDIDX dataset preprocessed with ``--split-sentences`` (one sequence per sentence,
``doc_idx`` marking documents). Two steps, as in Megatron:

1. The *samples mapping* (``get_samples_mapping``, built by ``helpers.build_mapping``): rows
   (first sentence, end sentence exclusive, target length) that group consecutive sentences of
   a document into samples of about ``max_seq_length - 3`` tokens (a shorter random target with
   probability ``short_seq_prob``), repeated over epochs until the split's target number of
   samples is reached, then shuffled. Cached as
   ``{prefix}_{name}_indexmap[_{E}ep][_{N}mns]_{L}msl_{ssp:0.2f}ssp_{seed}s.npy``.
2. Per item ``idx`` (``build_training_sample``), with ``np.random.RandomState((seed + idx) %
   2**32)`` drawn in Megatron's order: split the sentences into segments A and B (with the
   binary head: swapped with probability 0.5, ``is_random`` = sentence-order prediction label),
   truncate to the target length, ``[CLS] A [SEP] B [SEP]``, whole-word n-gram masking (80%
   ``[MASK]``, 10% unchanged, 10% a random vocabulary id), pad to ``max_seq_length``.

Items are dicts of int64 arrays ``text``, ``types``, ``labels`` (-1 except at masked positions),
``loss_mask``, ``padding_mask`` and ints ``is_random``, ``truncated`` (the data loader's sampler
adds ``index``). Tokens are handled as numpy arrays; the only Python loop per item runs over the
shuffled masking candidates, whose random draws depend on each other (as in Megatron).
"""

import collections
import os
import time

import numpy as np
import torch

from megatron.data import helpers
from megatron.data.dataset_utils import build_bert_train_valid_test_datasets  # noqa: F401
from megatron.errors import UserError

MaskedLmInstance = collections.namedtuple("MaskedLmInstance", ["index", "label"])

_INT32_MAX = int(np.iinfo(np.int32).max)
_INT64_MAX = int(np.iinfo(np.int64).max)


# ---------------------------------------------------------------------------------------------
# Samples mapping


def samples_mapping_filename(data_prefix, name, num_epochs, max_num_samples, max_seq_length,
                             short_seq_prob, seed, data_cache_path=None):
    """Megatron's cache file name; in ``data_cache_path`` (under the prefix's basename) if given.

    ``num_epochs``/``max_num_samples`` of None are Megatron's "unlimited" values (int32 max - 1,
    int64 max - 1) and leave their part out of the name.
    """
    path = data_prefix
    if data_cache_path:
        path = os.path.join(data_cache_path, os.path.basename(data_prefix))
    path += f"_{name}_indexmap"
    if num_epochs is not None and num_epochs != _INT32_MAX - 1:
        path += f"_{num_epochs}ep"
    if max_num_samples is not None and max_num_samples != _INT64_MAX - 1:
        path += f"_{max_num_samples}mns"
    path += f"_{max_seq_length}msl_{short_seq_prob:0.2f}ssp_{seed}s.npy"
    return path


def check_documents(doc_idx, sizes, binary_head, data_prefix, name="train"):
    """UserError when build_mapping would find no usable document in ``doc_idx``.

    With the binary head a sample needs two sentences, so a document must have at least two
    (a GPT-style ``_text_document`` file has one sequence per document); documents of more than
    one sentence with a sentence longer than 512 tokens are skipped, as Megatron does.
    """
    counts, has_long = helpers.document_stats(doc_idx, sizes)
    min_num_sent = 2 if binary_head else 1
    if int(np.count_nonzero((counts >= min_num_sent) & ~has_long)) > 0:
        return
    where = f"{data_prefix}: the {name} split ({counts.size} documents)"
    if binary_head and not bool((counts >= 2).any()):
        raise UserError(f"{where}: no document has at least 2 sentences: was it preprocessed "
                        f"with --split-sentences? (or train without the sentence-order head: "
                        f"--bert-no-binary-head)")
    if bool((counts >= min_num_sent).any()):
        raise UserError(f"{where}: every document with at least {min_num_sent} sentences has a "
                        f"sentence longer than {helpers.LONG_SENTENCE_LEN} tokens and is skipped; "
                        f"was it preprocessed with --split-sentences?")
    raise UserError(f"{where}: all documents are empty")


def get_samples_mapping(indexed_dataset, data_prefix, num_epochs, max_num_samples,
                        max_seq_length, short_seq_prob, seed, name, binary_head, doc_idx=None,
                        data_cache_path=None, log=print):
    """The [n, 3] samples mapping of ``doc_idx`` (default: the whole dataset), memory-mapped.

    Built once (under a file lock, written to a temporary file and renamed) and then loaded
    with ``np.load(allow_pickle=False, mmap_mode='r')``. A cache file that cannot be read as an
    [n, 3] integer array of sentence ranges inside ``doc_idx`` is a UserError naming the file
    (delete it to rebuild): it is never silently rebuilt, since another rank may be reading it.
    ``max_num_samples`` 0/None with ``num_epochs`` None builds one epoch (Megatron raises).
    """
    from megatron.data.gpt_dataset import _atomic_save, _build_lock, load_index_array

    if doc_idx is None:
        doc_idx = indexed_dataset.doc_idx
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    if not num_epochs:
        num_epochs = 1 if not max_num_samples else _INT32_MAX - 1
    if not max_num_samples:
        max_num_samples = _INT64_MAX - 1
    path = samples_mapping_filename(data_prefix, name, num_epochs, max_num_samples,
                                    max_seq_length, short_seq_prob, seed, data_cache_path)
    loaded_from_cache = os.path.isfile(path)
    if not loaded_from_cache:
        directory = os.path.dirname(os.path.abspath(path))
        flag = "--data-cache-path" if data_cache_path else "--data-path"
        try:
            os.makedirs(directory, exist_ok=True)
            with _build_lock(path + ".lock"):
                if not os.path.isfile(path):  # another process may have built it meanwhile
                    log(f" > WARNING: could not find index map file {path}, building the "
                        f"indices ...")
                    check_documents(doc_idx, indexed_dataset.sizes, binary_head, data_prefix,
                                    name)
                    start = time.time()
                    log(f" > building samples index mapping for {name} ...")
                    mapping = helpers.build_mapping(
                        doc_idx, indexed_dataset.sizes, num_epochs, max_num_samples,
                        max_seq_length, short_seq_prob, seed, True, 2 if binary_head else 1,
                        log=log)
                    log(" > done building samples index mapping")
                    _atomic_save(path, lambda f: np.save(f, mapping, allow_pickle=False))
                    log(f" > saved the index mapping in {path}")
                    log(f" > elapsed time to build and save samples mapping (seconds): "
                        f"{time.time() - start:4f}")
        except OSError as err:
            raise UserError(f"{flag}: cannot write the samples mapping {path} "
                            f"({err.strerror or err}); give a writable --data-cache-path") \
                from None

    log(f" > loading indexed mapping from {path}")
    start = time.time()
    mapping = load_index_array(path, "samples mapping", ndim=2, columns=3)
    if mapping.shape[0]:
        lo, hi = int(doc_idx[0]), int(doc_idx[-1])
        for row in (mapping[0], mapping[-1]):
            if not lo <= int(row[0]) < int(row[1]) <= hi:
                raise UserError(f"{path}: samples mapping does not match the sentences "
                                f"[{lo}, {hi}) of {data_prefix} ({name} split); delete it to "
                                f"rebuild")
    log(f"    loaded indexed file in {time.time() - start:3.3f} seconds"
        f"{' (cached)' if loaded_from_cache else ''}")
    log(f"    total number of samples: {mapping.shape[0]}")
    return mapping


# ---------------------------------------------------------------------------------------------
# One training sample (Megatron's dataset_utils functions, on numpy arrays)


def get_a_and_b_segments(sample, np_rng):
    """Split the sentences into A = sample[:a_end], B = the rest (a_end = 1 for two sentences,
    else randint(1, n)); swap them with probability 0.5. Returns (A, B, is_next_random)."""
    n_sentences = len(sample)
    assert n_sentences > 1, "make sure each sample has at least two sentences."
    a_end = 1
    if n_sentences >= 3:
        a_end = np_rng.randint(1, n_sentences)
    tokens_a = np.concatenate([np.asarray(s) for s in sample[:a_end]])
    tokens_b = np.concatenate([np.asarray(s) for s in sample[a_end:]])
    is_next_random = bool(np_rng.random_sample() < 0.5)
    if is_next_random:
        tokens_a, tokens_b = tokens_b, tokens_a
    return tokens_a, tokens_b, is_next_random


def _truncation_sides(len_a, len_b, steps):
    """Which segment (True = A) Megatron's loop shortens at each of ``steps`` steps: the longer
    one, B on ties. Closed form: first the run that evens the lengths out, then alternation."""
    if len_a > len_b:
        first, side = len_a - len_b, True
    else:
        first, side = len_b - len_a + 1, False
    sides = np.empty(steps, dtype=bool)
    head = min(first, steps)
    sides[:head] = side
    sides[head:] = (np.arange(steps - head) % 2 == 0) != side
    return sides


def truncate_segments(tokens_a, tokens_b, len_a, len_b, max_num_tokens, np_rng):
    """Shorten A and B to ``max_num_tokens`` tokens together: each step drops one token of the
    longer segment (B on ties), from its front with probability 0.5 else from its back.

    Returns (tokens_a, tokens_b, truncated); unlike Megatron's in-place list version the
    segments are returned (as array views).
    """
    assert len_a > 0
    steps = len_a + len_b - max_num_tokens
    if steps <= 0:
        return tokens_a, tokens_b, False
    sides = _truncation_sides(len_a, len_b, steps)
    front = np_rng.random_sample(steps) < 0.5  # one draw per step, as Megatron's loop
    a_front = int(np.count_nonzero(sides & front))
    a_back = int(np.count_nonzero(sides & ~front))
    b_front = int(np.count_nonzero(~sides & front))
    b_back = int(np.count_nonzero(~sides & ~front))
    return (tokens_a[a_front:len_a - a_back], tokens_b[b_front:len_b - b_back], True)


def create_tokens_and_tokentypes(tokens_a, tokens_b, cls_id, sep_id):
    """``[CLS] A [SEP]`` with type 0, then ``B [SEP]`` with type 1 (nothing if B is empty)."""
    len_a, len_b = len(tokens_a), len(tokens_b)
    total = len_a + 2 + (len_b + 1 if len_b else 0)
    tokens = np.empty(total, dtype=np.int64)
    tokens[0] = cls_id
    tokens[1:1 + len_a] = tokens_a
    tokens[1 + len_a] = sep_id
    tokentypes = np.zeros(total, dtype=np.int64)
    if len_b:
        tokens[2 + len_a:total - 1] = tokens_b
        tokens[total - 1] = sep_id
        tokentypes[2 + len_a:] = 1
    return tokens, tokentypes


def _ngram_cdf(max_ngrams, favor_longer_ngram):
    """The cdf ``np_rng.choice(ngrams, p=pvals)`` searches (p proportional to 1/n)."""
    pvals = 1.0 / np.arange(1, max_ngrams + 1)
    pvals /= pvals.sum(keepdims=True)
    if favor_longer_ngram:
        pvals = pvals[::-1]
    p = pvals[:max_ngrams] / pvals[:max_ngrams].sum(keepdims=True)
    cdf = p.cumsum()
    cdf /= cdf[-1]
    return cdf


def continuation_flags(tokens, vocab_id_to_token_dict):
    """True where the token's WordPiece string starts with '##' (looked up once per id)."""
    tokens = np.asarray(tokens)
    unique, inverse = np.unique(tokens, return_inverse=True)
    flags = np.array([vocab_id_to_token_dict[int(t)].startswith("##") for t in unique.tolist()],
                     dtype=bool)
    return flags[inverse.reshape(-1)]


def create_masked_lm_predictions(tokens, vocab_id_list, vocab_id_to_token_dict, masked_lm_prob,
                                 cls_id, sep_id, mask_id, max_predictions_per_seq, np_rng,
                                 max_ngrams=3, do_whole_word_mask=True, favor_longer_ngram=False,
                                 continuation=None):
    """Megatron's BERT masking ('bert' style, no permutation, n-gram lengths ~ 1/n).

    Candidates are the non-[CLS]/[SEP] positions, grouped into whole words ('##' pieces join
    the previous candidate). For every candidate word (shuffled) an n-gram length n is drawn;
    the span of n words starting there (shorter if it would exceed ``num_to_predict`` =
    min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))) is masked unless
    it overlaps an earlier span: each position becomes [MASK] with probability 0.8, stays with
    0.1, a random ``vocab_id_list`` id with 0.1. ``continuation`` (bool per position) may be
    given instead of looking the tokens up in ``vocab_id_to_token_dict``.

    Returns (output_tokens, masked_positions (sorted), masked_labels, token_boundary,
    masked_spans) like Megatron; output_tokens is an int64 array.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    special = (tokens == cls_id) | (tokens == sep_id)
    if continuation is None:
        continuation = continuation_flags(tokens, vocab_id_to_token_dict)
    continuation = np.asarray(continuation, dtype=bool)
    positions = np.flatnonzero(~special)
    starts = np.ones(positions.size, dtype=bool)
    if do_whole_word_mask:
        starts = ~continuation[positions]
        if positions.size:
            starts[0] = True
    token_boundary = (special | ~continuation).astype(np.int64).tolist()
    output_tokens = tokens.copy()
    if masked_lm_prob == 0:
        return output_tokens, [], [], token_boundary, []

    num_to_predict = min(max_predictions_per_seq,
                         max(1, int(round(len(tokens) * masked_lm_prob))))
    # Word g covers positions[bounds[g]:bounds[g + 1]]; the n-gram at g ends at bounds[g + n].
    bounds = np.append(np.flatnonzero(starts), positions.size).tolist()
    num_words = len(bounds) - 1
    order = np.arange(num_words)
    np_rng.shuffle(order)
    cdf = _ngram_cdf(max_ngrams, favor_longer_ngram)

    covered = np.zeros(tokens.size, dtype=bool)
    masked_positions, masked_spans = [], []
    num_vocab = len(vocab_id_list)
    for g in order.tolist():
        if len(masked_positions) >= num_to_predict:
            break
        n = int(np.searchsorted(cdf, np_rng.random_sample(), side="right")) + 1
        begin = bounds[g]
        size = bounds[min(g + n, num_words)] - begin
        n -= 1
        while len(masked_positions) + size > num_to_predict:
            if n == 0:
                break
            size = bounds[min(g + n, num_words)] - begin
            n -= 1
        if len(masked_positions) + size > num_to_predict:
            continue
        span = positions[begin:begin + size]
        if covered[span].any():
            continue
        covered[span] = True
        for index in span.tolist():
            if np_rng.random_sample() < 0.8:
                output_tokens[index] = mask_id
            elif np_rng.random_sample() < 0.5:
                pass  # keep the original token
            else:
                output_tokens[index] = vocab_id_list[np_rng.randint(0, num_vocab)]
            masked_positions.append(index)
        span_list = span.tolist()
        masked_spans.append(MaskedLmInstance(index=span_list,
                                             label=tokens[span].tolist()))
    # (Megatron shuffles the candidates once more here; nothing reads the generator after it.)
    masked_positions.sort()
    masked_labels = tokens[masked_positions].tolist() if masked_positions else []
    masked_spans.sort(key=lambda s: s.index[0])
    return output_tokens, masked_positions, masked_labels, token_boundary, masked_spans


def pad_and_convert_to_numpy(tokens, tokentypes, masked_positions, masked_labels, pad_id,
                             max_seq_length):
    """Pad to ``max_seq_length`` with ``pad_id`` (token types too, as Megatron does).

    Returns (tokens, tokentypes, labels (-1 except masked), padding_mask, loss_mask), int64.
    """
    num_tokens = len(tokens)
    padding_length = max_seq_length - num_tokens
    assert padding_length >= 0, f"{num_tokens} tokens exceed max_seq_length {max_seq_length}"
    assert len(tokentypes) == num_tokens and len(masked_positions) == len(masked_labels)
    tokens_np = np.full(max_seq_length, pad_id, dtype=np.int64)
    tokens_np[:num_tokens] = tokens
    tokentypes_np = np.full(max_seq_length, pad_id, dtype=np.int64)
    tokentypes_np[:num_tokens] = tokentypes
    padding_mask_np = np.zeros(max_seq_length, dtype=np.int64)
    padding_mask_np[:num_tokens] = 1
    labels_np = np.full(max_seq_length, -1, dtype=np.int64)
    loss_mask_np = np.zeros(max_seq_length, dtype=np.int64)
    if len(masked_positions):
        positions = np.asarray(masked_positions, dtype=np.int64)
        assert int(positions.max()) < num_tokens
        labels_np[positions] = masked_labels
        loss_mask_np[positions] = 1
    return tokens_np, tokentypes_np, labels_np, padding_mask_np, loss_mask_np


def build_training_sample(sample, target_seq_length, max_seq_length, vocab_id_list,
                          vocab_id_to_token_dict, cls_id, sep_id, mask_id, pad_id,
                          masked_lm_prob, np_rng, binary_head, continuation_table=None):
    """One BERT sample from ``sample`` (a list of sentences, each an array of token ids).

    ``continuation_table`` (bool per vocabulary id: WordPiece starts with '##') replaces the
    per-token dictionary look-ups when given.
    """
    if binary_head:
        assert len(sample) > 1
    assert target_seq_length <= max_seq_length
    if binary_head:
        tokens_a, tokens_b, is_next_random = get_a_and_b_segments(sample, np_rng)
    else:
        tokens_a = np.concatenate([np.asarray(s) for s in sample])
        tokens_b = tokens_a[:0]
        is_next_random = False
    max_num_tokens = target_seq_length
    tokens_a, tokens_b, truncated = truncate_segments(
        tokens_a, tokens_b, len(tokens_a), len(tokens_b), max_num_tokens, np_rng)
    tokens, tokentypes = create_tokens_and_tokentypes(tokens_a, tokens_b, cls_id, sep_id)
    continuation = None
    if continuation_table is not None:
        continuation = continuation_table[tokens]
    max_predictions_per_seq = masked_lm_prob * max_num_tokens
    tokens, masked_positions, masked_labels, _, _ = create_masked_lm_predictions(
        tokens, vocab_id_list, vocab_id_to_token_dict, masked_lm_prob, cls_id, sep_id, mask_id,
        max_predictions_per_seq, np_rng, continuation=continuation)
    tokens_np, tokentypes_np, labels_np, padding_mask_np, loss_mask_np = \
        pad_and_convert_to_numpy(tokens, tokentypes, masked_positions, masked_labels, pad_id,
                                 max_seq_length)
    return {
        "text": tokens_np,
        "types": tokentypes_np,
        "labels": labels_np,
        "is_random": int(is_next_random),
        "loss_mask": loss_mask_np,
        "padding_mask": padding_mask_np,
        "truncated": int(truncated),
    }


# ---------------------------------------------------------------------------------------------
# Dataset


#: Sentences whose token ids are checked against the vocabulary when the dataset is built;
#: every item checks its own tokens as well (one vectorised max per item).
_EAGER_VOCAB_CHECK_SENTENCES = 1000


class BertDataset(torch.utils.data.Dataset):
    """Megatron's BERT dataset over the documents ``doc_idx`` of ``indexed_dataset``.

    Args:
        name: split name ('train', 'valid', 'test'); part of the cache file name.
        indexed_dataset: sentence-level IndexedDataset (``sizes``, ``doc_idx``, slicing).
        data_prefix: the dataset's path prefix (names the cache file).
        num_epochs: None (Megatron: as many as needed) or a fixed number of epochs.
        max_num_samples: the split's target number of samples; len(self) may be larger.
        masked_lm_prob: ``--mask-prob``.
        max_seq_length: ``--seq-length``; the mapping uses max_seq_length - 3.
        short_seq_prob: ``--short-seq-prob``.
        seed: ``--seed``.
        binary_head: sentence-order prediction (two segments per sample).
        tokenizer: BERT WordPiece tokenizer (``cls``, ``sep``, ``mask``, ``pad``, ``inv_vocab``).
        doc_idx: this split's view of the document boundaries (Megatron: ``doc_idx[start:end+1]``
            of the documents in the split); default the whole dataset.
        data_cache_path: ``--data-cache-path`` (else the mapping is cached next to the data).
    """

    def __init__(self, name, indexed_dataset, data_prefix, num_epochs, max_num_samples,
                 masked_lm_prob, max_seq_length, short_seq_prob, seed, binary_head, tokenizer,
                 doc_idx=None, data_cache_path=None, log=print):
        if max_seq_length - 3 < 2:
            raise UserError(f"--seq-length: BERT needs at least 5 positions ([CLS], two [SEP] "
                            f"and 2 tokens), got {max_seq_length}")
        if not 0.0 <= masked_lm_prob <= 1.0:
            raise UserError(f"--mask-prob: expected a probability in [0, 1], got "
                            f"{masked_lm_prob}")
        if not 0.0 <= short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob: expected a probability in [0, 1], got "
                            f"{short_seq_prob}")
        self.name = name
        self.seed = seed
        self.masked_lm_prob = masked_lm_prob
        self.max_seq_length = max_seq_length
        self.binary_head = binary_head
        self.data_prefix = data_prefix
        self.indexed_dataset = indexed_dataset
        self.doc_idx = np.asarray(indexed_dataset.doc_idx if doc_idx is None else doc_idx,
                                  dtype=np.int64)

        # Vocabulary (Megatron: list(tokenizer.inv_vocab.keys()) and inv_vocab itself).
        self.vocab_id_to_token_dict = tokenizer.inv_vocab
        self.vocab_id_list = list(self.vocab_id_to_token_dict.keys())
        self.vocab_size = len(self.vocab_id_list)
        table_size = max(self.vocab_id_list) + 1 if self.vocab_id_list else 0
        self._continuation = np.zeros(table_size, dtype=bool)
        self._known = np.zeros(table_size, dtype=bool)
        for idx, token in self.vocab_id_to_token_dict.items():
            self._known[idx] = True
            self._continuation[idx] = token.startswith("##")
        self.cls_id, self.sep_id = tokenizer.cls, tokenizer.sep
        self.mask_id, self.pad_id = tokenizer.mask, tokenizer.pad

        lo = int(self.doc_idx[0])
        hi = min(int(self.doc_idx[-1]), lo + _EAGER_VOCAB_CHECK_SENTENCES)
        if hi > lo:
            self._check_vocab(np.concatenate(indexed_dataset[lo:hi]), f"sentences [{lo}, {hi})")

        self.samples_mapping = get_samples_mapping(
            indexed_dataset, data_prefix, num_epochs, max_num_samples, max_seq_length - 3,
            short_seq_prob, seed, name, binary_head, doc_idx=self.doc_idx,
            data_cache_path=data_cache_path, log=log)

    def _check_vocab(self, tokens, where):
        if tokens.size == 0:
            return
        low, high = int(tokens.min()), int(tokens.max())
        bad = None
        if low < 0:
            bad = low
        elif high >= self._known.size:
            bad = high
        elif not self._known[tokens].all():
            bad = int(tokens[~self._known[tokens]][0])
        if bad is not None:
            raise UserError(f"{self.data_prefix}: token id {bad} in {where} is not in the "
                            f"tokenizer's vocabulary ({self.vocab_size} ids); was the data "
                            f"preprocessed with this --vocab-file / --tokenizer-type?")

    def __len__(self):
        return self.samples_mapping.shape[0]

    def __getitem__(self, idx):
        if idx < 0:
            idx += len(self)
        start, end, target_seq_length = (int(v) for v in self.samples_mapping[idx])
        sample = self.indexed_dataset[start:end]
        if sample:
            self._check_vocab(np.concatenate(sample) if len(sample) > 1 else sample[0],
                              f"sentences [{start}, {end})")
        # Megatron: numpy (not Python) RNG, seeded per item.
        np_rng = np.random.RandomState(seed=((self.seed + idx) % 2**32))
        return build_training_sample(
            sample, target_seq_length, self.max_seq_length, self.vocab_id_list,
            self.vocab_id_to_token_dict, self.cls_id, self.sep_id, self.mask_id, self.pad_id,
            self.masked_lm_prob, np_rng, self.binary_head,
            continuation_table=self._continuation)
