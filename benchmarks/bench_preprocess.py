"""Preprocessing throughput: tools/preprocess_data.py with 1 and N workers on a PILE-like corpus.

    python benchmarks/bench_preprocess.py                      # 100 MB corpus cached in /tmp
    python benchmarks/bench_preprocess.py --size-mb 20 --workers 1 2 4 --cache-dir ~/.cache

The corpus is a deterministic .jsonl.zst of PILE-style records ({"text": ..., "meta":
{"pile_set_name": ...}}) whose text is English-like: words drawn with their frequencies from the
docstrings of Python's standard library, cut into sentences and paragraphs. ``--size-mb`` is the
size of the uncompressed JSON lines. It is generated once and cached under ``--cache-dir``.

Each run calls the real command line in a fresh process and reports wall-clock documents/s and
MB/s (uncompressed input), tokens/s, CPU seconds used, and the speed-up over the first run.
The outputs of all runs are checked to be byte-identical.

``--paths gpt bert`` also times the BERT sentence path on the same corpus in the same run:
``--split-sentences`` with ``--sentence-splitter`` (default sentencex) and BertWordPieceLowerCase
on the test WordPiece vocab (``--bert-vocab-file``), one sequence per sentence::

    python benchmarks/bench_preprocess.py --size-mb 20 --paths gpt bert --workers 1 2
"""

import argparse
import collections
import hashlib
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets", "tokenizers")

_MODULES = ("builtins os os.path sys re json collections itertools functools typing pathlib "
            "string textwrap argparse logging subprocess threading asyncio socket email http "
            "urllib.parse urllib.request unittest datetime decimal fractions statistics random "
            "math io shutil tempfile zipfile tarfile csv sqlite3 xml.etree.ElementTree "
            "dataclasses enum inspect ast dis pickle copy heapq bisect contextlib abc "
            "numbers operator difflib pprint calendar hashlib hmac secrets uuid").split()
_SET_NAMES = ["Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github",
              "FreeLaw", "StackExchange", "Wikipedia (en)", "USPTO Backgrounds"]


def word_frequencies():
    """Words (and counts) from the docstrings of a fixed list of standard-library modules."""
    counts = collections.Counter()
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__ or ""]
        for attr in sorted(dir(module)):
            with warnings.catch_warnings():  # deprecated aliases warn when touched
                warnings.simplefilter("ignore")
                obj = getattr(module, attr, None)
                doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                docs.append(doc)
        for doc in docs:
            counts.update(w.lower() for w in re.findall(r"[A-Za-z]{2,}|[aI]\b", doc))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return words, np.array([counts[w] for w in words], dtype=np.float64)


def generate(path, size_mb, seed):
    """Write a PILE-like .jsonl.zst of about ``size_mb`` MB of JSON lines to ``path``."""
    import zstandard

    words, freq = word_frequencies()
    vocab = np.array(words, dtype=object)
    cap = np.array([w.capitalize() for w in words], dtype=object)
    rng = np.random.default_rng(seed)
    target = size_mb * 1024 * 1024
    written = docs = 0
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        while written < target:
            n_words = int(rng.lognormal(6.5, 0.9)) + 5  # ~1,000 words median, long tail
            idx = rng.choice(len(vocab), size=n_words, p=freq / freq.sum())
            ends = np.cumsum(rng.integers(4, 25, size=n_words))  # sentence lengths
            ends = ends[ends < n_words]
            starts = np.concatenate(([0], ends))
            tokens = vocab[idx].copy()
            tokens[starts] = cap[idx[starts]]
            parts = np.split(tokens, ends)
            para = rng.random(len(parts)) < 0.15
            text = "".join(" ".join(p) + (".\n\n" if brk else ". ")
                           for p, brk in zip(parts, para)).strip()
            record = {"text": text, "meta": {"pile_set_name": _SET_NAMES[docs % 10]}}
            line = (json.dumps(record) + "\n").encode()
            out.write(line)
            written += len(line)
            docs += 1
    os.replace(tmp, path)
    return docs


def corpus_path(cache_dir, size_mb, seed):
    words, _ = word_frequencies()
    tag = hashlib.md5(" ".join(words).encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"bench_pile_{size_mb}mb_seed{seed}_{tag}.jsonl.zst")


def run_tool(corpus, prefix, workers, tok_args, env=None, level="document"):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--append-eod", "--workers", str(workers),
           "--log-interval", "100000000", *tok_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"preprocess_data failed ({proc.returncode}):\n{proc.stderr}")
    done = re.search(r"Done: (\d+) documents, (\d+) tokens, ([\d.]+) MB", proc.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(f"{prefix}_text_{level}.idx", "rb") as f:  # sequences: the header's count
        seqs = int(np.frombuffer(f.read(26), "<u8", 1, 18)[0])
    return {"workers": workers, "wall": wall, "docs": int(done.group(1)), "seqs": seqs,
            "tokens": int(done.group(2)), "mb": float(done.group(3)), "cpu": cpu,
            "cmd": " ".join(cmd)}


def compare_batching(corpus, vocab_file, splitter, mb_limit=5):
    """In one process, on the first ``mb_limit`` MB of text: the splitter's speed, and BERT
    WordPiece over those sentences one call each vs one batch call per ~1 MB of documents
    (what the tool does). Prints MB/s of document text."""
    import io

    import zstandard

    sys.path.insert(0, ROOT)
    from megatron.tokenizer import build_tokenizer
    from tools.preprocess_data import make_sentence_splitter

    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=vocab_file)
    split, name = make_sentence_splitter("english", False, splitter)
    docs, size = [], 0
    with open(corpus, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), "utf-8")
        for line in reader:
            docs.append(json.loads(line)["text"])
            size += len(docs[-1].encode())
            if size >= mb_limit * 2**20:
                break
    mb = size / 2**20
    start = time.perf_counter()
    sentences = [split(d) for d in docs]
    t_split = time.perf_counter() - start
    flat = [s for ss in sentences for s in ss]
    start = time.perf_counter()
    one = [tok.tokenize(s) for s in flat]
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    batched, chunk, chunk_size = [], [], 0
    for ss, d in zip(sentences, docs):
        chunk.extend(ss)
        chunk_size += len(d)
        if chunk_size >= 2**20:
            batched.extend(tok.tokenize_batch(chunk))
            chunk, chunk_size = [], 0
    batched.extend(tok.tokenize_batch(chunk))
    t_batch = time.perf_counter() - start
    assert one == batched
    start = time.perf_counter()
    tok.tokenize_batch(docs)  # whole documents: no sentence boundaries, for reference
    t_docs = time.perf_counter() - start
    print(f"in-process, {mb:.1f} MB, {len(docs)} docs, {len(flat)} sentences: split ({name}) "
          f"{mb / t_split:.1f} MB/s; WordPiece one call per sentence {mb / t_one:.2f} MB/s, "
          f"batch per 1 MB of documents {mb / t_batch:.2f} MB/s ({t_one / t_batch:.2f}x); "
          f"whole documents unsplit, batched {mb / t_docs:.2f} MB/s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=100, help="uncompressed corpus size")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", default="/tmp", help="where the generated corpus is kept")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    p.add_argument("--vocab-file", default=os.path.join(ASSETS, "gpt2-vocab.json"))
    p.add_argument("--merge-file", default=os.path.join(ASSETS, "gpt2-merges.txt"))
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--paths", nargs="+", choices=["gpt", "bert"], default=["gpt"],
                   help="gpt: the tokenizer above, one sequence per document; bert: "
                        "--split-sentences with BertWordPieceLowerCase, one per sentence")
    p.add_argument("--bert-vocab-file", default=os.path.join(ASSETS, "bert-vocab.txt"))
    p.add_argument("--sentence-splitter", default="sentencex",
                   help="--sentence-splitter of the bert path")
    p.add_argument("--tokenizer-threads", choices=["default", "off", "on"], default="default",
                   help="HF tokenizers' own thread pool (TOKENIZERS_PARALLELISM): 'default' "
                        "leaves the tool's choice (threads with 1 worker, none per worker "
                        "with more), 'off'/'on' force it for every run")
    p.add_argument("--compare-batching", action="store_true",
                   help="also time, in this process, the sentence splitter and WordPiece per "
                        "sentence vs batched (bert path)")
    args = p.parse_args(argv)
    env = dict(os.environ)
    if args.tokenizer_threads != "default":
        env["TOKENIZERS_PARALLELISM"] = "true" if args.tokenizer_threads == "on" else "false"

    corpus = corpus_path(args.cache_dir, args.size_mb, args.seed)
    if not os.path.exists(corpus):
        start = time.perf_counter()
        n = generate(corpus, args.size_mb, args.seed)
        print(f"generated {corpus}: {n} documents in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    gpt_args = ["--tokenizer-type", args.tokenizer_type]
    for flag in ("vocab_file", "merge_file", "tokenizer_model"):
        if getattr(args, flag):
            gpt_args += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    bert_args = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                 args.bert_vocab_file, "--split-sentences", "--sentence-splitter",
                 args.sentence_splitter]
    plans = {"gpt": (gpt_args, "document"), "bert": (bert_args, "sentence")}

    rows, identical = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        for path in args.paths:
            tok_args, level = plans[path]
            outputs = []
            for workers in args.workers:
                prefix = os.path.join(tmp, f"{path}_w{workers}")
                row = run_tool(corpus, prefix, workers, tok_args, env, level)
                row["path"] = path
                rows.append(row)
                digest = ""
                for ext in (".bin", ".idx"):
                    with open(f"{prefix}_text_{level}{ext}", "rb") as f:
                        digest += hashlib.md5(f.read()).hexdigest()
                outputs.append(digest)
                os.remove(f"{prefix}_text_{level}.bin")
            identical[path] = len(set(outputs)) == 1

    first = rows[0]
    print(f"corpus: {corpus} ({os.path.getsize(corpus) / 2**20:.1f} MB compressed, "
          f"{first['mb']:.1f} MB JSON, {first['docs']} docs)")
    for path in args.paths:
        print(f"{path}: {' '.join(map(str, plans[path][0]))}")
    print(f"tokenizer threads: {args.tokenizer_threads}; cpus: {os.cpu_count()}")
    print(f"{'path':>4} {'workers':>7} {'wall s':>8} {'docs/s':>9} {'MB/s':>7} {'seqs':>9} "
          f"{'Mtok/s':>7} {'cpu s':>7} {'speed-up':>8}")
    base = {}
    for r in rows:
        base.setdefault(r["path"], r["wall"])
        print(f"{r['path']:>4} {r['workers']:>7} {r['wall']:>8.2f} {r['docs'] / r['wall']:>9.1f} "
              f"{r['mb'] / r['wall']:>7.2f} {r['seqs']:>9} "
              f"{r['tokens'] / r['wall'] / 1e6:>7.3f} {r['cpu']:>7.1f} "
              f"{base[r['path']] / r['wall']:>7.2f}x")
    for path, same in identical.items():
        print(f"{path}: outputs byte-identical across worker counts: {same}")
    if args.compare_batching:
        compare_batching(corpus, args.bert_vocab_file, args.sentence_splitter)
    return rows, all(identical.values())


if __name__ == "__main__":
    main()
