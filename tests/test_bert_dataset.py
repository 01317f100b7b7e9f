"""BERT dataset: MT19937 streams, samples mapping (C == numpy == per-sentence loop), cache,
per-item samples (== a plain list-based rendering of Megatron's functions), masking statistics,
builders (split, blend, separate paths) and bad inputs."""

import os

import numpy as np
import pytest

from megatron.data import bert_dataset, helpers
from megatron.data.bert_dataset import (BertDataset, create_masked_lm_predictions,
                                        get_samples_mapping, samples_mapping_filename)
from megatron.data.dataset_utils import (build_bert_train_valid_test_datasets,
                                         build_train_valid_test_datasets)
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.errors import UserError
from megatron.tokenizer.bert import BertWordPieceTokenizer

VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizers",
                     "bert-vocab.txt")
INT32_MAX = int(np.iinfo(np.int32).max)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    return BertWordPieceTokenizer(VOCAB)


def word_pieces(tokenizer):
    inv = tokenizer.inv_vocab
    starts = np.array(sorted(i for i, t in inv.items()
                             if not t.startswith("##") and not t.startswith("[")))
    conts = np.array(sorted(i for i, t in inv.items() if t.startswith("##")))
    return starts, conts


def write_corpus(prefix, tokenizer, num_docs, seed=0, sentences=(1, 8), words=(3, 20),
                 id_offset=0):
    """Sentence-level dataset of random words (a start piece and 0-2 '##' pieces)."""
    rs = np.random.RandomState(seed)
    starts, conts = word_pieces(tokenizer)
    tokens, lengths, per_doc = [], [], []
    for _ in range(num_docs):
        n_sent = rs.randint(*sentences)
        per_doc.append(n_sent)
        for _ in range(n_sent):
            n = 0
            for _ in range(rs.randint(*words)):
                tokens.append(rs.choice(starts))
                n += 1
                for _ in range(rs.choice([0, 0, 0, 1, 2])):
                    tokens.append(rs.choice(conts))
                    n += 1
            lengths.append(n)
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
        builder.add_documents(np.array(tokens, dtype=np.int64) + id_offset, lengths, per_doc)
        builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def write_sizes(prefix, sizes, per_doc, value=10):
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
        builder.add_documents(np.full(int(np.sum(sizes)), value), sizes, per_doc)
        builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    prefix = str(tmp_path_factory.mktemp("bert") / "corpus_text_sentence")
    return prefix, write_corpus(prefix, tokenizer, 300)


def make_dataset(corpus, tokenizer, cache, num_samples=500, seq=64, seed=1234, binary=True,
                 mask_prob=0.15, ssp=0.1, name="train"):
    prefix, ds = corpus
    return BertDataset(name, ds, prefix, None, num_samples, mask_prob, seq, ssp, seed, binary,
                       tokenizer, data_cache_path=str(cache), log=quiet)


# -- Mersenne Twister ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_c", [True, False])
def test_mt19937_known_vectors(use_c):
    out = helpers.mt19937(5489, 10000, use_c=use_c)
    assert out.dtype == np.uint32
    assert int(out[0]) == 3499211612 and int(out[-1]) == 4123659995
    out64 = helpers.mt19937_64(5489, 10000, use_c=use_c)
    assert out64.dtype == np.uint64 and int(out64[-1]) == 9981545732273789042


def test_mt19937_c_equals_numpy_and_next_equals_take():
    for seed in (0, 1, 1234, 2**32 - 1):
        assert np.array_equal(helpers.mt19937(seed, 1500), helpers.mt19937(seed, 1500, False))
        assert np.array_equal(helpers.mt19937_64(seed, 700), helpers.mt19937_64(seed, 700, False))
    rng = helpers.MersenneTwister(7, 32)
    mixed = [rng.next() for _ in range(5)] + rng.take(1000).tolist() + [rng.next()]
    assert mixed == helpers.mt19937(7, 1006).tolist()
    legacy = getattr(np.random.MT19937, "_legacy_seeding", None)
    if legacy is not None:  # numpy's legacy integer seeding is std::mt19937's
        bit_generator = np.random.MT19937()
        bit_generator._legacy_seeding(1234)
        assert np.array_equal(bit_generator.random_raw(2000), helpers.mt19937(1234, 2000))


# -- samples mapping ----------------------------------------------------------------------------

def mapping_loop(docs, sizes, num_epochs, max_num_samples, max_len, ssp, seed, min_num_sent):
    """Per-sentence rendering of Megatron's build_mapping loop (the ground truth)."""
    ratio = helpers.short_seq_ratio(ssp)
    rng = helpers.MersenneTwister(seed, 32)

    def target():
        if ratio == 0:
            return max_len
        r = rng.next()
        return 2 + r % (max_len - 1) if r % ratio == 0 else max_len

    rows = []
    for _ in range(num_epochs):
        if len(rows) >= max_num_samples:
            break
        before = len(rows)
        for d in range(len(docs) - 1):
            first, last = int(docs[d]), int(docs[d + 1])
            remain = last - first
            long = remain > 1 and any(int(sizes[s]) > 512 for s in range(first, last))
            if remain < min_num_sent or long:
                continue
            prev, seq_len, num_sent, goal = first, 0, 0, target()
            for s in range(first, last):
                seq_len += int(sizes[s])
                num_sent += 1
                remain -= 1
                if (seq_len >= goal and remain > 1 and num_sent >= min_num_sent) or remain == 0:
                    rows.append((prev, s + 1, goal))
                    prev, seq_len, num_sent, goal = s + 1, 0, 0, target()
        if len(rows) == before:
            break
    return rows


def fisher_yates(rows, seed):
    rows = list(rows)
    rng = helpers.MersenneTwister(seed + 1, 64)
    for i in range(len(rows) - 1, 0, -1):
        j = rng.next() % (i + 1)
        rows[i], rows[j] = rows[j], rows[i]
    return rows


def test_build_mapping_c_numpy_and_loop_agree_on_random_inputs():
    rs = np.random.RandomState(0)
    for _ in range(150):
        ndocs = rs.randint(1, 25)
        per = rs.randint(0, 8, size=ndocs)
        sizes = rs.randint(0, 60, size=int(per.sum()) + rs.randint(0, 3)).astype(np.int32)
        if rs.rand() < 0.3 and sizes.size:
            sizes[rs.randint(sizes.size)] = 600
        docs = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
        lo = rs.randint(0, ndocs + 1)
        hi = rs.randint(lo, ndocs + 1)
        view = docs[lo:hi + 1]
        max_len = int(rs.randint(2, 100))
        ssp = float(rs.choice([0.0, 0.1, 0.33, 0.5, 1.0]))
        mns = int(rs.choice([1, 2]))
        seed = int(rs.randint(0, 2**31 - 1))
        target = int(rs.randint(0, 150))
        c = helpers.build_mapping(view, sizes, INT32_MAX - 1, target, max_len, ssp, seed,
                                  False, mns)
        py = helpers.build_mapping(view, sizes, INT32_MAX - 1, target, max_len, ssp, seed,
                                   False, mns, use_c=False)
        assert c.dtype == py.dtype == np.uint32 and c.shape == py.shape
        assert np.array_equal(c, py)
        expected = fisher_yates(mapping_loop(view, sizes, 1000, target, max_len, ssp, seed, mns),
                                seed)
        assert [tuple(r) for r in c.tolist()] == expected


def test_build_mapping_hand_example():
    # doc0: 5 sentences; doc1: 1 sentence; doc2: 2 sentences; doc3: a 600-token sentence.
    sizes = np.array([3, 4, 5, 2, 6, 10, 2, 2, 600, 1], dtype=np.int32)
    docs = np.array([0, 5, 6, 8, 10], dtype=np.int64)
    one_epoch = {(0, 3, 8), (3, 5, 8), (6, 8, 8)}
    for use_c in (True, False):
        m = helpers.build_mapping(docs, sizes, INT32_MAX - 1, 1, 8, 0.0, 1, False, 2,
                                  use_c=use_c)
        assert m.shape == (3, 3) and set(map(tuple, m.tolist())) == one_epoch
        # targets are checked at each epoch start: 3 >= 3 stops after one epoch, 4 needs two
        assert helpers.build_mapping(docs, sizes, INT32_MAX - 1, 3, 8, 0.0, 1, False, 2,
                                     use_c=use_c).shape == (3, 3)
        assert helpers.build_mapping(docs, sizes, INT32_MAX - 1, 4, 8, 0.0, 1, False, 2,
                                     use_c=use_c).shape == (6, 3)
        # without the binary head one-sentence documents count; long ones still do not
        m1 = helpers.build_mapping(docs, sizes, INT32_MAX - 1, 1, 8, 0.0, 1, False, 1,
                                   use_c=use_c)
        assert set(map(tuple, m1.tolist())) == one_epoch | {(5, 6, 8)}
        # the row order is Fisher-Yates with mt19937_64(seed + 1) over the emission order
        assert [tuple(r) for r in m.tolist()] == fisher_yates(
            [(0, 3, 8), (3, 5, 8), (6, 8, 8)], 1)


def test_build_mapping_short_targets_follow_mt19937():
    # Every sentence exceeds any target, so each one closes a sample (but the last two go
    # together). short_seq_prob 1 -> every target is 2 + r % (max_len - 1).
    sizes = np.full(6, 100, dtype=np.int32)
    docs = np.array([0, 6], dtype=np.int64)
    r = helpers.mt19937(42, 5).astype(np.int64)
    targets = (2 + r % 19).tolist()
    m = helpers.build_mapping(docs, sizes, 1, 1, 20, 1.0, 42, False, 1)
    rows = sorted(map(tuple, m.tolist()))
    assert rows == [(0, 1, targets[0]), (1, 2, targets[1]), (2, 3, targets[2]),
                    (3, 4, targets[3]), (4, 6, targets[4])]


def test_short_seq_prob_effect():
    rs = np.random.RandomState(1)
    sizes = rs.randint(5, 30, size=20000).astype(np.int32)
    docs = np.arange(0, 20001, 10, dtype=np.int64)
    fractions = {}
    for ssp in (0.0, 0.1, 0.5):
        m = helpers.build_mapping(docs, sizes, INT32_MAX - 1, 1, 120, ssp, 5, False, 2)
        fractions[ssp] = float(np.mean(m[:, 2] < 120))
    assert fractions[0.0] == 0.0
    assert 0.07 < fractions[0.1] < 0.13
    assert 0.45 < fractions[0.5] < 0.55
    assert helpers.short_seq_ratio(0.1) == 10 and helpers.short_seq_ratio(0.4) == 3


# -- cache ------------------------------------------------------------------------------------

def test_cache_name_reuse_and_corruption(tmp_path, corpus, tokenizer, monkeypatch):
    prefix, ds = corpus
    name = samples_mapping_filename(prefix, "train", None, 101000, 509, 0.1, 1234)
    assert name == prefix + "_train_indexmap_101000mns_509msl_0.10ssp_1234s.npy"
    assert samples_mapping_filename(prefix, "valid", 3, None, 61, 0.05, 7, str(tmp_path)) == \
        str(tmp_path / (os.path.basename(prefix) + "_valid_indexmap_3ep_61msl_0.05ssp_7s.npy"))

    first = make_dataset(corpus, tokenizer, tmp_path)
    path = str(tmp_path / (os.path.basename(prefix)
                           + "_train_indexmap_500mns_61msl_0.10ssp_1234s.npy"))
    assert os.path.isfile(path)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert isinstance(first.samples_mapping, np.memmap)

    def fail(*args, **kwargs):
        raise AssertionError("the cached mapping should have been reused")

    monkeypatch.setattr(helpers, "build_mapping", fail)
    second = make_dataset(corpus, tokenizer, tmp_path)
    assert np.array_equal(first.samples_mapping, second.samples_mapping)

    with open(path, "r+b") as f:  # truncate the cache file
        f.truncate(100)
    with pytest.raises(UserError, match="delete it to rebuild") as err:
        make_dataset(corpus, tokenizer, tmp_path)
    assert path in str(err.value) and "\n" not in str(err.value)
    np.save(path, np.zeros((4, 2), dtype=np.uint32))
    with pytest.raises(UserError, match=r"\[n, 3\]"):
        make_dataset(corpus, tokenizer, tmp_path)


def test_mapping_cached_next_to_data_without_cache_path(tmp_path, tokenizer):
    prefix = str(tmp_path / "d_text_sentence")
    ds = write_corpus(prefix, tokenizer, 20)
    mapping = get_samples_mapping(ds, prefix, None, 10, 61, 0.1, 3, "train", True, log=quiet)
    assert os.path.isfile(prefix + "_train_indexmap_10mns_61msl_0.10ssp_3s.npy")
    assert mapping.shape[0] >= 10 and mapping.dtype == np.uint32


# -- samples ------------------------------------------------------------------------------------

def reference_sample(sentences, target, max_seq_length, vocab_ids, inv, cls, sep, mask, pad,
                     prob, rng, binary_head, max_ngrams=3):
    """Megatron's build_training_sample spelled out on Python lists (RNG calls in its order)."""
    sentences = [list(map(int, s)) for s in sentences]
    if binary_head:
        a_end = rng.randint(1, len(sentences)) if len(sentences) >= 3 else 1
        a = [t for s in sentences[:a_end] for t in s]
        b = [t for s in sentences[a_end:] for t in s]
        is_random = rng.random() < 0.5
        if is_random:
            a, b = b, a
    else:
        a, b, is_random = [t for s in sentences for t in s], [], False
    truncated = len(a) + len(b) > target
    while len(a) + len(b) > target:
        seg = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del seg[0]
        else:
            seg.pop()
    tokens = [cls] + a + [sep] + (b + [sep] if b else [])
    types = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b else [])

    groups = []
    for i, t in enumerate(tokens):
        if t in (cls, sep):
            continue
        if groups and inv[t].startswith("##"):
            groups[-1].append(i)
        else:
            groups.append([i])
    out = list(tokens)
    budget = min(prob * target, max(1, int(round(len(tokens) * prob))))
    ngrams = np.arange(1, max_ngrams + 1)
    pvals = 1.0 / ngrams
    pvals /= pvals.sum()
    cands = [[groups[g:g + n] for n in ngrams] for g in range(len(groups))]
    rng.shuffle(cands)
    masked, covered = [], set()
    for cand in cands:
        if len(masked) >= budget:
            break
        n = rng.choice(ngrams[:len(cand)], p=pvals[:len(cand)] / pvals[:len(cand)].sum())
        span = sum(cand[n - 1], [])
        n -= 1
        while len(masked) + len(span) > budget and n > 0:
            span = sum(cand[n - 1], [])
            n -= 1
        if len(masked) + len(span) > budget or any(i in covered for i in span):
            continue
        for i in span:
            covered.add(i)
            if rng.random() < 0.8:
                out[i] = mask
            elif rng.random() >= 0.5:
                out[i] = vocab_ids[rng.randint(0, len(vocab_ids))]
            masked.append(i)
    pad_len = max_seq_length - len(out)
    labels = [-1] * max_seq_length
    loss_mask = [0] * max_seq_length
    for i in masked:
        labels[i], loss_mask[i] = tokens[i], 1
    return {"text": out + [pad] * pad_len, "types": types + [pad] * pad_len, "labels": labels,
            "is_random": int(is_random), "loss_mask": loss_mask,
            "padding_mask": [1] * len(out) + [0] * pad_len, "truncated": int(truncated)}


KEYS = ["text", "types", "labels", "is_random", "loss_mask", "padding_mask", "truncated"]


@pytest.mark.parametrize("binary", [True, False])
def test_samples_equal_plain_rendering_of_megatron(tmp_path, corpus, tokenizer, binary):
    dataset = make_dataset(corpus, tokenizer, tmp_path, num_samples=300, seq=48, binary=binary,
                           ssp=0.3)
    _, ds = corpus
    inv = tokenizer.inv_vocab
    for idx in range(0, len(dataset), 3):
        start, end, target = (int(v) for v in dataset.samples_mapping[idx])
        rng = np.random.RandomState((1234 + idx) % 2**32)
        expected = reference_sample([ds[i] for i in range(start, end)], target, 48,
                                    list(inv.keys()), inv, tokenizer.cls, tokenizer.sep,
                                    tokenizer.mask, tokenizer.pad, 0.15, rng, binary)
        got = dataset[idx]
        assert sorted(got) == sorted(KEYS)
        for key in KEYS:
            if isinstance(got[key], int):
                assert got[key] == expected[key], (idx, key)
            else:
                assert got[key].dtype == np.int64 and got[key].shape == (48,)
                assert got[key].tolist() == expected[key], (idx, key)


def test_sample_layout_consistency(tmp_path, corpus, tokenizer):
    dataset = make_dataset(corpus, tokenizer, tmp_path, num_samples=200, seq=64)
    cls, sep, pad, mask = tokenizer.cls, tokenizer.sep, tokenizer.pad, tokenizer.mask
    for idx in range(len(dataset)):
        s = dataset[idx]
        n = int(s["padding_mask"].sum())
        target = int(dataset.samples_mapping[idx][2])
        assert np.array_equal(s["padding_mask"], (np.arange(64) < n).astype(np.int64))
        assert n <= target + 3 and s["text"][0] == cls
        assert np.all(s["text"][n:] == pad) and np.all(s["types"][n:] == pad)
        seps = np.flatnonzero(s["text"][:n] == sep)
        assert seps[-1] == n - 1 and len(seps) == 2  # binary head: two segments
        assert np.all(s["types"][:seps[0] + 1] == 0) and np.all(s["types"][seps[0] + 1:n] == 1)
        masked = s["loss_mask"] == 1
        assert np.array_equal(masked, s["labels"] != -1)
        assert not masked[n:].any() and not masked[seps].any() and not masked[0]
        assert masked.sum() <= max(1, int(0.15 * target))
        assert s["truncated"] in (0, 1) and s["is_random"] in (0, 1)
        assert np.all(s["text"][masked & (s["text"] != mask)] >= 0)


def test_determinism_across_instances_and_seeds(tmp_path, corpus, tokenizer):
    a = make_dataset(corpus, tokenizer, tmp_path / "a")
    b = make_dataset(corpus, tokenizer, tmp_path / "b")
    for idx in (0, 7, 123, len(a) - 1):
        x, y = a[idx], b[idx]
        assert all(np.array_equal(x[k], y[k]) for k in KEYS)
        z = a[idx]
        assert all(np.array_equal(x[k], z[k]) for k in KEYS)
    c = make_dataset(corpus, tokenizer, tmp_path / "c", seed=99)
    assert not np.array_equal(a.samples_mapping, c.samples_mapping)


def test_masking_statistics_and_sentence_order_balance(tmp_path, corpus, tokenizer):
    dataset = make_dataset(corpus, tokenizer, tmp_path, num_samples=3000, seq=128, ssp=0.0)
    cls, sep, pad, mask = tokenizer.cls, tokenizer.sep, tokenizer.pad, tokenizer.mask
    masked = candidates = as_mask = kept = other = is_random = 0
    for idx in range(len(dataset)):
        s = dataset[idx]
        text, m = s["text"], s["loss_mask"] == 1
        candidates += int(np.count_nonzero((text != cls) & (text != sep) & (text != pad)
                                           | m))
        masked += int(m.sum())
        as_mask += int(np.count_nonzero(text[m] == mask))
        kept += int(np.count_nonzero(text[m] == s["labels"][m]))
        other += int(np.count_nonzero((text[m] != mask) & (text[m] != s["labels"][m])))
        is_random += s["is_random"]
    n = len(dataset)
    assert 0.13 < masked / candidates < 0.17
    assert abs(as_mask / masked - 0.8) < 0.02
    assert abs(kept / masked - 0.1) < 0.015
    assert abs(other / masked - 0.1) < 0.015
    assert abs(is_random / n - 0.5) < 0.04


def word_groups(tokens, tokenizer):
    inv = tokenizer.inv_vocab
    groups = []
    for i, t in enumerate(tokens):
        if t in (tokenizer.cls, tokenizer.sep, tokenizer.pad):
            continue
        if groups and inv[int(t)].startswith("##"):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def test_whole_words_are_masked_together(tmp_path, corpus, tokenizer):
    dataset = make_dataset(corpus, tokenizer, tmp_path, num_samples=400, seq=64)
    multi_piece_masked = 0
    for idx in range(len(dataset)):
        s = dataset[idx]
        original = np.where(s["loss_mask"] == 1, s["labels"], s["text"])
        for group in word_groups(original[:int(s["padding_mask"].sum())], tokenizer):
            flags = s["loss_mask"][group]
            assert flags.min() == flags.max(), (idx, group)
            multi_piece_masked += int(len(group) > 1 and flags[0] == 1)
    assert multi_piece_masked > 50


def test_ngram_option(tokenizer):
    starts, _ = word_pieces(tokenizer)
    inv = tokenizer.inv_vocab
    rs = np.random.RandomState(3)
    spans = {1: [], 3: []}
    for trial in range(300):
        tokens = np.concatenate([[tokenizer.cls], rs.choice(starts, 200), [tokenizer.sep]])
        for max_ngrams in (1, 3):
            rng = np.random.RandomState(trial)
            out, positions, labels, _, masked_spans = create_masked_lm_predictions(
                tokens, list(inv), inv, 0.15, tokenizer.cls, tokenizer.sep, tokenizer.mask,
                30.0, rng, max_ngrams=max_ngrams)
            assert positions == sorted(positions) and labels == tokens[positions].tolist()
            assert len(positions) == 30
            spans[max_ngrams] += [len(s.index) for s in masked_spans]
    assert set(spans[1]) == {1}
    lengths = np.bincount(spans[3])[1:]
    # p(n) proportional to 1/n: 6/11, 3/11, 2/11 of the draws (shortened near the budget)
    assert lengths[0] > lengths[1] > lengths[2] > 0
    assert abs(lengths[1] / lengths[2] - 1.5) < 0.3


def test_truncation_sides_match_megatron_loop():
    rs = np.random.RandomState(0)
    for _ in range(500):
        la, lb = int(rs.randint(1, 40)), int(rs.randint(0, 40))
        target = int(rs.randint(2, la + lb + 1)) if la + lb >= 2 else 2
        steps = max(0, la + lb - target)
        sides, a, b = [], la, lb
        for _ in range(steps):
            sides.append(a > b)
            if a > b:
                a -= 1
            else:
                b -= 1
        assert bert_dataset._truncation_sides(la, lb, steps).tolist() == sides


# -- builders -----------------------------------------------------------------------------------

def test_builder_split_by_documents(tmp_path, corpus, tokenizer):
    prefix, ds = corpus
    train, valid, test = build_bert_train_valid_test_datasets(
        [prefix], "80,15,5", [400, 60, 20], 64, 0.15, 0.1, 1234, True, tokenizer,
        data_cache_path=str(tmp_path), log=quiet)
    docs = ds.doc_idx
    bounds = [0, 240, 285, 300]  # 300 documents split 80/15/5
    for k, dataset in enumerate((train, valid, test)):
        assert isinstance(dataset, BertDataset)
        assert len(dataset) >= [400, 60, 20][k]
        assert np.array_equal(dataset.doc_idx, docs[bounds[k]:bounds[k + 1] + 1])
        m = np.asarray(dataset.samples_mapping)
        assert m[:, 0].min() >= docs[bounds[k]] and m[:, 1].max() <= docs[bounds[k + 1]]
    names = sorted(os.listdir(tmp_path))
    assert any("_valid_indexmap_60mns_61msl_0.10ssp_1234s.npy" in n for n in names)


def test_builder_blending_and_separate_paths(tmp_path, tokenizer):
    p1, p2 = str(tmp_path / "one"), str(tmp_path / "two")
    write_corpus(p1, tokenizer, 60, seed=1)
    write_corpus(p2, tokenizer, 60, seed=2)
    train, valid, test = build_bert_train_valid_test_datasets(
        ["0.3", p1, "0.7", p2], "90,10,0", [100, 10, 0], 32, 0.15, 0.1, 5, True, tokenizer,
        log=quiet)
    assert test is None and len(train) == 31 + 71 and len(valid) == 4 + 8
    ratio = np.mean(train.dataset_index == 1)
    assert abs(ratio - 0.7) < 0.02
    item = train[3]
    assert set(item) == set(KEYS) | {"dataset_idx"}

    train, valid, test = build_bert_train_valid_test_datasets(
        None, "969,30,1", [50, 5, 0], 32, 0.15, 0.1, 5, False, tokenizer,
        train_data_path=[p1], valid_data_path=["1", p1, "1", p2], log=quiet)
    assert isinstance(train, BertDataset) and test is None
    assert np.array_equal(train.doc_idx, IndexedDataset(p1).doc_idx)
    assert len(valid) == 3 + 3  # ceil(5 * 0.5 * 1.005) each


def test_builder_reexported_from_bert_dataset():
    assert bert_dataset.build_bert_train_valid_test_datasets is \
        build_bert_train_valid_test_datasets


def test_gpt_builder_unchanged_by_generalisation(tmp_path):
    prefix = str(tmp_path / "g")
    write_sizes(prefix, np.full(50, 20), np.ones(50, dtype=np.int64))
    train, valid, test = build_train_valid_test_datasets([prefix], "8,1,1", [30, 3, 3], 16, 1,
                                                         data_cache_path=str(tmp_path),
                                                         log=quiet)
    assert train.sample_idx.shape[0] - 1 >= 30
    assert len(train.doc_idx) >= 40 and set(np.asarray(train.doc_idx)) == set(range(40))


# -- bad inputs --------------------------------------------------------------------------------

def test_document_level_data_with_binary_head(tmp_path, tokenizer):
    prefix = str(tmp_path / "gpt_text_document")
    ds = write_corpus(prefix, tokenizer, 30, sentences=(1, 2))  # one sequence per document
    with pytest.raises(UserError, match="no document has at least 2 sentences: was it "
                                        "preprocessed with --split-sentences") as err:
        BertDataset("train", ds, prefix, None, 10, 0.15, 64, 0.1, 1, True, tokenizer,
                    log=quiet)
    assert prefix in str(err.value) and "\n" not in str(err.value)
    dataset = BertDataset("train", ds, prefix, None, 10, 0.15, 64, 0.1, 1, False, tokenizer,
                          log=quiet)  # without the binary head every document is a sample
    assert len(dataset) >= 10 and dataset[0]["is_random"] == 0


def test_long_sentences_and_empty_documents(tmp_path, tokenizer):
    prefix = str(tmp_path / "long")
    ds = write_sizes(prefix, [600, 3, 700, 2], [2, 2], value=20)
    with pytest.raises(UserError, match="longer than 512 tokens"):
        BertDataset("train", ds, prefix, None, 10, 0.15, 64, 0.1, 1, True, tokenizer, log=quiet)
    prefix = str(tmp_path / "empty")
    ds = write_sizes(prefix, [], [0, 0], value=20)
    with pytest.raises(UserError, match="all documents are empty"):
        BertDataset("train", ds, prefix, None, 10, 0.15, 64, 0.1, 1, False, tokenizer,
                    log=quiet)


def test_vocabulary_mismatch(tmp_path, tokenizer, monkeypatch):
    prefix = str(tmp_path / "wrongvocab")
    ds = write_corpus(prefix, tokenizer, 20, id_offset=50000)  # e.g. GPT-2 ids
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary") as err:
        BertDataset("train", ds, prefix, None, 10, 0.15, 64, 0.1, 1, True, tokenizer, log=quiet)
    assert prefix in str(err.value) and "--vocab-file" in str(err.value)
    monkeypatch.setattr(bert_dataset, "_EAGER_VOCAB_CHECK_SENTENCES", 0)
    dataset = BertDataset("train", ds, prefix, None, 10, 0.15, 64, 0.1, 1, True, tokenizer,
                          data_cache_path=str(tmp_path / "c"), log=quiet)
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        dataset[0]


def test_missing_files_and_bad_flags(tmp_path, corpus, tokenizer):
    with pytest.raises(UserError, match="--data-path: no dataset at prefix"):
        build_bert_train_valid_test_datasets([str(tmp_path / "nope")], "1,0,0", [1, 0, 0], 64,
                                             0.15, 0.1, 1, True, tokenizer, log=quiet)
    prefix, ds = corpus
    for kwargs, flag in (({"seq": 4}, "--seq-length"), ({"mask_prob": 1.5}, "--mask-prob"),
                         ({"ssp": -0.1}, "--short-seq-prob")):
        with pytest.raises(UserError, match=flag):
            make_dataset(corpus, tokenizer, tmp_path, **kwargs)


def test_dataset_without_compiler_matches(tmp_path, corpus, tokenizer, monkeypatch):
    with_c = make_dataset(corpus, tokenizer, tmp_path / "c", num_samples=300)
    monkeypatch.setattr(helpers, "compiled_library", lambda: None)
    without = make_dataset(corpus, tokenizer, tmp_path / "py", num_samples=300)
    assert np.array_equal(with_c.samples_mapping, without.samples_mapping)


def test_zero_target_builds_one_epoch(tmp_path, corpus, tokenizer):
    prefix, ds = corpus
    mapping = get_samples_mapping(ds, prefix, None, 0, 61, 0.1, 1, "test", True,
                                  data_cache_path=str(tmp_path), log=quiet)
    once = helpers.build_mapping(ds.doc_idx, ds.sizes, 1, 10**9, 61, 0.1, 1, False, 2)
    assert np.array_equal(mapping, once)
    assert os.path.isfile(tmp_path / (os.path.basename(prefix)
                                      + "_test_indexmap_1ep_61msl_0.10ssp_1s.npy"))
