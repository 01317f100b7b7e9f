"""Data paths and weights, --split, and the train/valid/test GPT and BERT dataset builders
(Megatron): one shared builder, given a per-family factory of split datasets."""

import math
import time

import numpy as np

from megatron.errors import UserError


def parse_data_path(values, flag="--data-path"):
    """Parse ``--data-path``-style values into (prefixes, weights or None).

    One entry is a single unweighted dataset. Otherwise the values are ``w1 p1 w2 p2 ...`` pairs;
    the returned weights are normalised to sum to 1.
    """
    if values is None:
        return [], None
    if isinstance(values, str):
        values = values.split()
    values = [str(v) for v in values]
    if len(values) == 0:
        return [], None
    if len(values) == 1:
        return [values[0].strip()], None
    if len(values) % 2 != 0:
        raise UserError(f"{flag}: expected one prefix or 'weight prefix' pairs, got an odd "
                        f"number of values ({len(values)}); last token {values[-1]!r}")
    weights, prefixes = [], []
    for weight_token, prefix in zip(values[0::2], values[1::2]):
        try:
            weight = float(weight_token)
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"{flag}: expected a positive weight before prefix {prefix!r}, "
                            f"got {weight_token!r}")
        weights.append(weight)
        prefixes.append(prefix.strip())
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def get_train_valid_test_split_(splits_string, size):
    """Boundaries [0, a, b, size] of the train/valid/test document ranges (Megatron exact).

    '949,50,1' (or '949/50/1') over 1000 documents -> [0, 949, 999, 1000].
    """
    text = str(splits_string)
    separator = "," if "," in text else ("/" if "/" in text else None)
    tokens = text.split(separator) if separator else [text]
    try:
        splits = [float(t) for t in tokens]
    except ValueError:
        raise UserError(f"--split: expected up to 3 comma- or '/'-separated non-negative "
                        f"numbers such as '949,50,1', got {splits_string!r}") from None
    if any(not math.isfinite(s) or s < 0 for s in splits):
        raise UserError(f"--split: expected non-negative numbers, got {splits_string!r}")
    splits = (splits + [0.0, 0.0, 0.0])[:3]
    total = sum(splits)
    if total <= 0.0:
        raise UserError(f"--split: the weights must not all be zero, got {splits_string!r}")
    splits = [s / total for s in splits]
    index = [0]
    for fraction in splits:
        index.append(index[-1] + int(round(fraction * float(size))))
    diff = index[-1] - size
    for k in range(1, len(index)):
        index[k] -= diff
    assert len(index) == 4 and index[-1] == size
    return index


def get_datasets_weights_and_num_samples(data_prefix, train_valid_test_num_samples):
    """(prefixes, normalised weights, per-dataset sample targets) for a weighted blend.

    Each target is ceil(n * weight * 1.005): a 0.5% surplus so the greedy blend never runs a
    child dataset dry. ``train_valid_test_num_samples`` is a list (one target per split) or a
    single int (a separate --train/valid/test-data-path).
    """
    prefixes, weights = parse_data_path(data_prefix)
    if weights is None:
        weights = [1.0] * len(prefixes)
    if isinstance(train_valid_test_num_samples, (list, tuple)):
        per_dataset = [[int(math.ceil(n * w * 1.005)) for n in train_valid_test_num_samples]
                       for w in weights]
    else:
        per_dataset = [int(math.ceil(train_valid_test_num_samples * w * 1.005))
                       for w in weights]
    return prefixes, weights, per_dataset


def get_indexed_dataset_(data_prefix, flag="--data-path", log=print):
    """Open the .bin/.idx pair at ``data_prefix``; a missing pair is a UserError."""
    from megatron.data.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(data_prefix):
        raise UserError(f"{flag}: no dataset at prefix {data_prefix!r} (expected "
                        f"{data_prefix}.bin and {data_prefix}.idx)")
    log(" > building dataset index ...")
    start = time.time()
    indexed_dataset = IndexedDataset(data_prefix)
    log(f" > finished creating indexed dataset in {time.time() - start:4f} seconds")
    log(f"    number of documents: {indexed_dataset.sizes.shape[0]}")
    return indexed_dataset


class _GPTFactory:
    """How the shared builder makes GPT datasets: --split divides sequences."""

    def __init__(self, seq_length, seed, data_cache_path, splits_string, log):
        self.seq_length, self.seed = seq_length, seed
        self.data_cache_path, self.splits_string, self.log = data_cache_path, splits_string, log

    def num_units(self, indexed_dataset):
        return indexed_dataset.sizes.shape[0]

    def log_split(self, indexed_dataset, start, end):
        pass

    def build(self, name, prefix, indexed_dataset, start, end, num_samples):
        from megatron.data.gpt_dataset import GPTDataset

        documents = np.arange(start, end, dtype=np.int32)
        return GPTDataset(name, prefix, indexed_dataset, documents, num_samples,
                          self.seq_length, self.seed, cache_dir=self.data_cache_path,
                          splits_string=self.splits_string, log=self.log)


class _BertFactory:
    """How the shared builder makes BERT datasets: --split divides documents (doc_idx)."""

    def __init__(self, max_seq_length, masked_lm_prob, short_seq_prob, seed, binary_head,
                 tokenizer, data_cache_path, log):
        self.max_seq_length, self.masked_lm_prob = max_seq_length, masked_lm_prob
        self.short_seq_prob, self.seed, self.binary_head = short_seq_prob, seed, binary_head
        self.tokenizer, self.data_cache_path, self.log = tokenizer, data_cache_path, log

    def num_units(self, indexed_dataset):
        return indexed_dataset.doc_idx.shape[0] - 1

    def log_split(self, indexed_dataset, start, end):
        first, last = int(indexed_dataset.doc_idx[start]), int(indexed_dataset.doc_idx[end])
        self.log(f"     sentence indices in [{first}, {last}) total of {last - first} "
                 f"sentences")

    def build(self, name, prefix, indexed_dataset, start, end, num_samples):
        from megatron.data.bert_dataset import BertDataset

        return BertDataset(name, indexed_dataset, prefix, None, num_samples,
                           self.masked_lm_prob, self.max_seq_length, self.short_seq_prob,
                           self.seed, self.binary_head, self.tokenizer,
                           doc_idx=indexed_dataset.doc_idx[start:end + 1],
                           data_cache_path=self.data_cache_path, log=self.log)


def _build_split_datasets(factory, data_prefix, splits_string, num_samples, flag, log):
    """train/valid/test datasets of one prefix, split by contiguous ranges of the factory's
    units (GPT: sequences, BERT: documents)."""
    indexed_dataset = get_indexed_dataset_(data_prefix, flag, log)
    total = factory.num_units(indexed_dataset)
    if total == 0:
        raise UserError(f"{flag}: {data_prefix} holds no documents (an empty .bin/.idx "
                        f"pair); was the preprocessing input empty?")
    splits = get_train_valid_test_split_(splits_string, total)
    log(" > dataset split:")
    result = []
    for k, label in enumerate(("train", "validation", "test")):
        log(f"    {label}:")
        log(f"     document indices in [{splits[k]}, {splits[k + 1]}) total of "
            f"{splits[k + 1] - splits[k]} documents")
        factory.log_split(indexed_dataset, splits[k], splits[k + 1])
    for k, name in enumerate(("train", "valid", "test")):
        dataset = None
        if splits[k + 1] > splits[k]:
            dataset = factory.build(name, data_prefix, indexed_dataset, splits[k],
                                    splits[k + 1], num_samples[k])
        result.append(dataset)
    return tuple(result)


def _build_whole_dataset(factory, name, values, flag, num_samples, log):
    """One split from a separate --{name}-data-path: every document of each file, blended."""
    from megatron.data.blendable_dataset import BlendableDataset

    prefixes, weights = parse_data_path(values, flag)

    def whole(prefix, n):
        indexed_dataset = get_indexed_dataset_(prefix, flag, log)
        return factory.build(name, prefix, indexed_dataset, 0,
                             factory.num_units(indexed_dataset), n)

    if weights is None:
        return whole(prefixes[0], num_samples)
    _, weights, per_dataset = get_datasets_weights_and_num_samples(values, num_samples)
    datasets = [whole(p, n) for p, n in zip(prefixes, per_dataset)]
    return BlendableDataset(datasets, weights, sum(per_dataset), log=log)


def _build_datasets(factory, data_prefix, splits_string, train_valid_test_num_samples,
                    train_data_path, valid_data_path, test_data_path, log):
    """(train, valid, test) from --data-path (split and blended) or the separate paths."""
    separate = [train_data_path, valid_data_path, test_data_path]
    prefixes, weights = parse_data_path(data_prefix)
    if any(separate):
        if prefixes:
            raise UserError("--data-path: cannot be combined with --train-data-path/"
                            "--valid-data-path/--test-data-path; give one or the other")
        flags = ("--train-data-path", "--valid-data-path", "--test-data-path")
        names = ("train", "valid", "test")
        return tuple(
            _build_whole_dataset(factory, name, values, flag, n, log) if values else None
            for name, values, flag, n in zip(names, separate, flags,
                                             train_valid_test_num_samples))
    if not prefixes:
        raise UserError("--data-path: required (or --train-data-path/--valid-data-path/"
                        "--test-data-path)")

    if weights is None:
        return _build_split_datasets(factory, prefixes[0], splits_string,
                                     train_valid_test_num_samples, "--data-path", log)

    from megatron.data.blendable_dataset import BlendableDataset

    _, weights, per_dataset = get_datasets_weights_and_num_samples(
        data_prefix, list(train_valid_test_num_samples))
    per_split = ([], [], [])
    for i, (prefix, targets) in enumerate(zip(prefixes, per_dataset)):
        built = _build_split_datasets(factory, prefix, splits_string, targets, "--data-path",
                                      log)
        for k, dataset in enumerate(built):
            if dataset is not None:
                per_split[k].append((i, dataset))
    result = []
    for k, members in enumerate(per_split):
        if not members:
            result.append(None)
            continue
        if len(members) != len(prefixes):
            # Small files can leave a split empty; blend the others with renormalised weights.
            log(f" > WARNING: the {('train', 'valid', 'test')[k]} split is empty for "
                f"{len(prefixes) - len(members)} of {len(prefixes)} --data-path datasets; "
                f"blending the remaining ones")
        member_weights = [weights[i] for i, _ in members]
        size = sum(per_dataset[i][k] for i, _ in members)
        result.append(BlendableDataset([d for _, d in members], member_weights, size, log=log))
    return tuple(result)


def build_train_valid_test_datasets(data_prefix, splits_string, train_valid_test_num_samples,
                                    seq_length, seed, data_cache_path=None, train_data_path=None,
                                    valid_data_path=None, test_data_path=None, log=print):
    """(train, valid, test) GPT datasets; None for a split without documents or path.

    ``data_prefix`` is the ``--data-path`` list: one prefix, or weight/prefix pairs which are
    split individually by ``splits_string`` and blended per split. The separate
    ``--train/valid/test-data-path`` lists use whole files and ignore ``--split``.
    """
    factory = _GPTFactory(seq_length, seed, data_cache_path, splits_string, log)
    return _build_datasets(factory, data_prefix, splits_string, train_valid_test_num_samples,
                           train_data_path, valid_data_path, test_data_path, log)


def build_bert_train_valid_test_datasets(data_prefix, splits_string,
                                         train_valid_test_num_samples, max_seq_length,
                                         masked_lm_prob, short_seq_prob, seed, binary_head,
                                         tokenizer, data_cache_path=None, train_data_path=None,
                                         valid_data_path=None, test_data_path=None, log=print):
    """(train, valid, test) BertDatasets (blended per split for weighted --data-path); None for
    a split without documents or path.

    Same --data-path / --split / --train/valid/test-data-path handling as the GPT builder,
    except that --split divides documents (``doc_idx``), not sentences, and each split's
    dataset sees its slice ``doc_idx[start:end + 1]``. The data must be sentence-level
    (preprocessed with --split-sentences).
    """
    factory = _BertFactory(max_seq_length, masked_lm_prob, short_seq_prob, seed, binary_head,
                           tokenizer, data_cache_path, log)
    return _build_datasets(factory, data_prefix, splits_string, train_valid_test_num_samples,
                           train_data_path, valid_data_path, test_data_path, log)
