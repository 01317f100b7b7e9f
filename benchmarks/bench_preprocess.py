"""Preprocessing throughput: tools/preprocess_data.py's fast (gigatoken) and hf paths side by
side, and gigatoken called directly on the same file as the ceiling.

    python benchmarks/bench_preprocess.py                      # 100 MB corpus cached in /tmp
    python benchmarks/bench_preprocess.py --size-mb 20 --workers 1 2 --hf-workers 1

The corpus is a deterministic .jsonl.zst of PILE-style records ({"text": ..., "meta":
{"pile_set_name": ...}}): English-like prose (words drawn with their frequencies from the
docstrings of Python's standard library) with a long tail of rare strings (new words, numbers,
identifiers, URLs, other scripts, emoji), every tenth document code-like, half the lines with
\\u escapes. ``--size-mb`` is the size of the uncompressed JSON lines. It is generated once and
cached under ``--cache-dir``, with a GPT-2-format byte-level BPE vocabulary of ``--vocab-size``
(50257) trained on it by tools/train_bpe_vocab.py.

Each run calls the real command line in a fresh process (every backend x worker count) and
reports MB/s of JSON over the tool's encode loop (zstd decode, JSON, tokenize, write; startup
excluded, wall time beside it), tokens/s, CPU seconds, MB per CPU-second (per core), the peak
resident memory of all its processes, and the ratios to the best hf run and to the library
itself: gigatoken's ``encode_files`` on the same .jsonl.zst with all cores (its whole-file API,
which holds the decompressed file and every token in memory). The outputs of all runs are
checked to be byte-identical, and the library's token count to equal the tool's.

``--paths gpt bert`` also times the BERT sentence path (hf only) on the same corpus in the same
run: ``--split-sentences`` with ``--sentence-splitter`` (default sentencex) and
BertWordPieceLowerCase on the test WordPiece vocab (``--bert-vocab-file``)::

    python benchmarks/bench_preprocess.py --size-mb 20 --paths gpt bert --workers 1 2
"""

import argparse
import collections
import hashlib
import importlib
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
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


_SCRIPTS = ("abcdefghijklmnopqrstuvwxyz",
            "\u00e0\u00e1\u00e2\u00e4\u00e7\u00e8\u00e9\u00ea\u00ee\u00ef\u00f1\u00f3\u00f6\u00fa"
            "\u00fc\u00dfaeinorst",
            "\u0430\u0431\u0432\u0433\u0434\u0435\u0436\u0437\u0438\u043a\u043b\u043c\u043d\u043e"
            "\u043f\u0440\u0441\u0442\u0443",
            "\u03b1\u03b2\u03b3\u03b4\u03b5\u03b6\u03b7\u03b8\u03b9\u03ba\u03bb\u03bc",
            "\u7684\u4e00\u662f\u4e0d\u4e86\u4eba\u6211\u5728\u6709\u4ed6\u8fd9\u4e2d\u5927\u6765"
            "\u4e0a\u56fd\u4e2a\u5230\u8bf4\u4eec")
_SYMBOLS = ["\U0001F600", "\U0001F44D\U0001F3FD", "\u2764\ufe0f", "(c)", "\u2014", "\u00a7",
            "\u2022", "&amp;", "\u00b1"]


def rare_strings(rng, n):
    """``n`` strings of the long tail a web corpus has beside its common words: new words,
    numbers, identifiers, URLs, other scripts, emoji."""
    letters = [np.array(list(s)) for s in _SCRIPTS]

    def word(script=0, lo=3, hi=13):
        return "".join(rng.choice(letters[script], rng.integers(lo, hi)))

    out = []
    for kind in rng.integers(0, 8, size=n):
        if kind <= 2:  # a word never seen before
            out.append(word())
        elif kind == 3:
            out.append(str([int(rng.integers(0, 10 ** int(rng.integers(1, 10)))),
                            round(float(rng.normal(0, 1e3)), 3),
                            int(rng.integers(1800, 2030))][int(rng.integers(0, 3))]))
        elif kind == 4:
            out.append("_".join(word(0, 2, 7) for _ in range(int(rng.integers(2, 4))))
                       + str(rng.integers(0, 99)))
        elif kind == 5:
            out.append(f"https://www.{word(0, 5, 10)}.org/{word(0, 3, 8)}/"
                       f"{rng.integers(0, 10**6)}.html")
        elif kind == 6:
            out.append(word(int(rng.integers(1, len(letters))), 2, 9))
        else:
            out.append(_SYMBOLS[int(rng.integers(0, len(_SYMBOLS)))])
    return np.array(out, dtype=object)


def generate(path, size_mb, seed):
    """Write a PILE-like .jsonl.zst of about ``size_mb`` MB of JSON lines to ``path``: prose of
    common words (with their docstring frequencies), one word in 12 from a long tail of 300,000
    rare strings, every tenth document code-like; log-normal lengths (~1,000 words median)."""
    import zstandard

    words, freq = word_frequencies()
    vocab = np.array(words, dtype=object)
    cap = np.array([w.capitalize() for w in words], dtype=object)
    rng = np.random.default_rng(seed)
    rare = rare_strings(rng, 300_000)
    target = size_mb * 1024 * 1024
    written = docs = 0
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        while written < target:
            n_words = int(rng.lognormal(6.5, 0.9)) + 5
            idx = rng.choice(len(vocab), size=n_words, p=freq / freq.sum())
            ends = np.cumsum(rng.integers(4, 25, size=n_words))  # sentence lengths
            ends = ends[ends < n_words]
            starts = np.concatenate(([0], ends))
            tokens = vocab[idx].copy()
            tokens[starts] = cap[idx[starts]]
            tail = rng.random(n_words) < 1 / 12
            tokens[tail] = rare[rng.integers(0, len(rare), size=int(tail.sum()))]
            parts = np.split(tokens, ends)
            if docs % 10 == 7:  # code-like: indented calls, symbols, no sentence ends
                text = "\n".join("    " * int(rng.integers(0, 3)) + "_".join(p[:2]) + "("
                                 + ", ".join(p[2:]) + ")" + [":", ";", " {", ""][len(p) % 4]
                                 for p in parts)
            else:
                para = rng.random(len(parts)) < 0.15
                text = "".join(" ".join(p) + (".\n\n" if brk else ". ")
                               for p, brk in zip(parts, para)).strip()
            record = {"text": text, "meta": {"pile_set_name": _SET_NAMES[docs % 10]}}
            # Half the lines with \u escapes (as the PILE's), half raw UTF-8.
            line = (json.dumps(record, ensure_ascii=docs % 2 == 0) + "\n").encode()
            out.write(line)
            written += len(line)
            docs += 1
    os.replace(tmp, path)
    return docs


def corpus_path(cache_dir, size_mb, seed):
    words, _ = word_frequencies()
    tag = hashlib.md5(" ".join(words).encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"bench_pile_v2_{size_mb}mb_seed{seed}_{tag}.jsonl.zst")


def _tree_rss(pid):
    """Resident bytes of process ``pid`` and its descendants (0 if gone): proportional set
    sizes where the OS gives them (forked workers share pages, which RSS would count twice)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += getattr(p.memory_full_info(), "pss", None) or p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(cmd, env=None):
    """Run ``cmd``; wall seconds, CPU seconds (all its processes), peak resident memory of the
    process tree (PSS, sampled every 0.1 s with psutil; else the largest single process's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = None
    if importlib.util.find_spec("psutil") is not None:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if sampler is not None:
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak_mb = (peak[0] or after.ru_maxrss * 1024) / 2**20
    return {"wall": wall, "cpu": cpu, "rss_mb": peak_mb, "stdout": out, "stderr": err}


def run_tool(corpus, prefix, workers, tok_args, env=None, level="document", backend="hf"):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--append-eod", "--workers", str(workers),
           "--log-interval", "100000000", "--tokenizer-backend", backend, *tok_args]
    row = measure(cmd, env)
    done = re.search(r"Done: (\d+) documents, (\d+) tokens, ([\d.]+) MB in ([\d.]+) s .*; "
                     r"([\d.]+) CPU-s", row.pop("stderr"))
    row.pop("stdout")
    with open(f"{prefix}_text_{level}.idx", "rb") as f:  # sequences: the header's count
        seqs = int(np.frombuffer(f.read(26), "<u8", 1, 18)[0])
    row.update(workers=workers, backend=backend, docs=int(done.group(1)), seqs=seqs,
               tokens=int(done.group(2)), mb=float(done.group(3)), loop=float(done.group(4)),
               loop_cpu=float(done.group(5)),
               cmd=" ".join(map(str, cmd)))
    return row


_CEILING = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import gigatoken
from megatron.tokenizer import build_tokenizer
tok = build_tokenizer("GPT2BPETokenizer", vocab_file={vocab!r}, merge_file={merges!r})
lib = gigatoken.Tokenizer(tok._tok)
start, cpu = time.perf_counter(), sum(os.times()[:2])
ids = lib.encode_files(gigatoken.JsonlFileSource([{corpus!r}], "text"))
seconds, cpu = time.perf_counter() - start, sum(os.times()[:2]) - cpu
print(json.dumps({{"loop": seconds, "loop_cpu": cpu, "docs": len(ids),
                  "tokens": int(len(ids.layout.content))}}))
"""


def run_ceiling(corpus, vocab, merges):
    """gigatoken called directly on the same file (its whole-file API, all cores): the
    library's own throughput, which the tool's fast path is measured against."""
    code = _CEILING.format(root=ROOT, vocab=vocab, merges=merges, corpus=corpus)
    row = measure([sys.executable, "-c", code])
    row.update(json.loads(row.pop("stdout").strip().splitlines()[-1]))
    row.pop("stderr")
    return row


def trained_vocab(corpus, cache_dir, vocab_size):
    """A GPT-2-format byte-level BPE vocabulary of ``vocab_size`` trained on ``corpus``
    (tools/train_bpe_vocab.py), cached beside it."""
    out = corpus.replace(".jsonl.zst", f"_bpe{vocab_size}")
    vocab, merges = os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt")
    if not os.path.exists(merges):
        import zstandard

        plain = out + ".jsonl"
        with open(corpus, "rb") as src, open(plain, "wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_bpe_vocab.py"),
                        "--input", plain, "--vocab-size", str(vocab_size), "--output-dir", out],
                       check=True, capture_output=True)
        os.remove(plain)
    return vocab, merges


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
    p.add_argument("--backends", nargs="+", choices=["fast", "hf"], default=["fast", "hf"],
                   help="--tokenizer-backend of the gpt path runs")
    p.add_argument("--hf-workers", type=int, nargs="+", default=None,
                   help="worker counts of the hf runs (default: --workers)")
    p.add_argument("--vocab-size", type=int, default=50257,
                   help="size of the byte-level BPE vocabulary trained on the corpus (GPT-2's "
                        "50257 by default) when --vocab-file is not given")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    p.add_argument("--vocab-file", default=None, help="default: trained on the corpus")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip gigatoken called directly on the file")
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
    if args.vocab_file is None and args.tokenizer_type == "GPT2BPETokenizer":
        args.vocab_file, args.merge_file = trained_vocab(corpus, args.cache_dir,
                                                         args.vocab_size)
    gpt_args = ["--tokenizer-type", args.tokenizer_type]
    for flag in ("vocab_file", "merge_file", "tokenizer_model"):
        if getattr(args, flag):
            gpt_args += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    bert_args = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                 args.bert_vocab_file, "--split-sentences", "--sentence-splitter",
                 args.sentence_splitter]
    plans = {"gpt": (gpt_args, "document", args.backends),
             "bert": (bert_args, "sentence", ["hf"])}
    load = os.getloadavg()

    ceiling = None
    if "gpt" in args.paths and "fast" in args.backends and not args.no_ceiling \
            and args.tokenizer_type == "GPT2BPETokenizer":
        ceiling = run_ceiling(corpus, args.vocab_file, args.merge_file)
    rows, identical = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        for path in args.paths:
            tok_args, level, backends = plans[path]
            outputs = []
            for backend in backends:
                counts = args.hf_workers if backend == "hf" and args.hf_workers else args.workers
                for workers in counts:
                    prefix = os.path.join(tmp, f"{path}_{backend}_w{workers}")
                    row = run_tool(corpus, prefix, workers, tok_args, env, level, backend)
                    row["path"] = path
                    rows.append(row)
                    digest = ""
                    for ext in (".bin", ".idx"):
                        with open(f"{prefix}_text_{level}{ext}", "rb") as f:
                            digest += hashlib.md5(f.read()).hexdigest()
                    outputs.append(digest)
                    os.remove(f"{prefix}_text_{level}.bin")
            identical[path] = len(set(outputs)) == 1
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]

    first = rows[0]
    print(f"corpus: {corpus} ({os.path.getsize(corpus) / 2**20:.1f} MB compressed, "
          f"{first['mb']:.1f} MB JSON, {first['docs']} docs)")
    for path in args.paths:
        print(f"{path}: {' '.join(map(str, plans[path][0]))}")
    print(f"cpus: {os.cpu_count()}; load average (1/5/15 min, max of before and after): "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; tokenizer threads: "
          f"{args.tokenizer_threads}")
    print("MB/s, Mtok/s: over the encode loop (zstd, JSON, tokenize, write; startup excluded, "
          "wall s includes it); /cpu-s: the same per CPU-second of the loop (per core); "
          "RSS: peak of all processes (PSS); x hf, x lib: MB/s ratios to the best hf run and "
          "to the library, /core: the same per CPU-second")
    print(f"{'path':>4} {'backend':>8} {'workers':>7} {'wall s':>7} {'loop s':>7} {'MB/s':>7} "
          f"{'Mtok/s':>7} {'cpu-s':>6} {'MB/cpu-s':>8} {'Mtok/cpu-s':>10} {'RSS MB':>7} "
          f"{'x hf':>6} {'/core':>6} {'x lib':>6} {'/core':>6}")

    def rates(r):
        return r["mb"] / r["loop"], r["mb"] / r["loop_cpu"]

    hf_best = {}  # the best hf run of each path: the "x hf" baseline
    for r in rows:
        if r["backend"] == "hf":
            best = hf_best.get(r["path"], (0, 0))
            hf_best[r["path"]] = tuple(map(max, best, rates(r)))
    table = list(rows)
    if ceiling is not None:
        table.insert(0, dict(ceiling, path="gpt", backend="library", workers="all",
                             mb=first["mb"]))
    for r in table:
        wall_rate, core_rate = rates(r)
        ratios = []
        for base in (hf_best.get(r["path"]),
                     rates(table[0]) if ceiling is not None and r["path"] == "gpt" else None):
            ratios += [f"{wall_rate / base[0]:.2f}", f"{core_rate / base[1]:.2f}"] if base \
                else ["-", "-"]
        print(f"{r['path']:>4} {r['backend']:>8} {r['workers']:>7} {r['wall']:>7.2f} "
              f"{r['loop']:>7.2f} {wall_rate:>7.2f} {r['tokens'] / r['loop'] / 1e6:>7.3f} "
              f"{r['loop_cpu']:>6.2f} {core_rate:>8.2f} "
              f"{r['tokens'] / r['loop_cpu'] / 1e6:>10.3f} {r['rss_mb']:>7.0f} "
              + " ".join(f"{x:>6}" for x in ratios))
    if ceiling is not None:
        gpt = [r for r in rows if r["path"] == "gpt"]
        same = all(r["tokens"] == ceiling["tokens"] + r["docs"] for r in gpt)  # + EOD each
        print(f"library token count equals the tool's (without EODs): {same}")
    for path, same in identical.items():
        print(f"{path}: outputs byte-identical across backends and worker counts: {same}")
    if args.compare_batching:
        compare_batching(corpus, args.bert_vocab_file, args.sentence_splitter)
    return rows, all(identical.values())


if __name__ == "__main__":
    main()
