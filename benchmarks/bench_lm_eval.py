"""lm-eval loglikelihood scoring throughput: our model ``megatron-ltd`` against lm-eval's HFLM on
the same checkpoint exported to Hugging Face, same requests, batch size and dtype.

    python benchmarks/bench_lm_eval.py                         # GPT-2 small shape, CPU, fp32
    python benchmarks/bench_lm_eval.py --batch-size 16 --dtype bfloat16 --docs 60
    python benchmarks/bench_lm_eval.py --layers 2 --hidden 128 --heads 4 --docs 8   # smoke

Setup (cached under ``--work-dir``): a GPT-2-format BPE vocabulary trained with
tools/train_bpe_vocab.py on the Python standard library's sources, asked for GPT-2's 50,257
tokens (the sources yield about 44,000; no GPT-2 vocabulary can be downloaded here, and a
vocabulary of that size makes the LM head cost about what it costs there), a GPT of the
given shape saved by pretrain_gpt.py (one step on mock data: the weights do not matter for
speed), and its export with ``tools/convert_hf.py export`` (``GPT2LMHeadModel``).

Requests: zero-shot multiple-choice and cloze requests shaped like the paper's tasks, built
from standard-library docstring text with a fixed seed: HellaSwag-like (a long context, 4
endings of 10-25 words), ARC-like (a question, 4 short answers), PIQA-like (a short goal, 2
long solutions) and LAMBADA-like (a long context, one word), ``--docs`` documents of each.
Both sides get the same ``Instance`` list through lm-eval's ``loglikelihood`` (tokenising
included). Throughput = tokens of all requests (context + continuation, as scored) / wall
seconds of one timed run per side, after a warm-up on a few requests; the two sides' results
are compared (log-likelihoods and greedy flags) so the speed is of the same computation.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STDLIB = os.path.dirname(os.__file__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="/tmp/bench_lm_eval")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--docs", type=int, default=40, help="documents of each request kind")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def run(cmd, cwd=ROOT):
    """Run a command line of this repository; its output only when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def stdlib_sources():
    """The standard library's .py files (sorted), the corpus for the vocabulary and text."""
    out = []
    for base, dirs, files in os.walk(STDLIB):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests"))
        out += [os.path.join(base, f) for f in sorted(files) if f.endswith(".py")]
    return out


def build_vocab(work):
    """vocab.json / merges.txt of 50,257 tokens (GPT-2's size) trained on stdlib sources."""
    vocab = os.path.join(work, "vocab")
    if not os.path.isfile(os.path.join(vocab, "merges.txt")):
        corpus = os.path.join(work, "stdlib.jsonl")
        with open(corpus, "w") as f:
            for path in stdlib_sources():
                try:
                    f.write(json.dumps({"text": open(path, encoding="utf-8").read()}) + "\n")
                except (UnicodeDecodeError, OSError):
                    continue
        run([sys.executable, "tools/train_bpe_vocab.py", "--input", corpus, "--vocab-size",
             "50257", "--output-dir", vocab])
    return os.path.join(vocab, "vocab.json"), os.path.join(vocab, "merges.txt")


def build_checkpoint(opts, work, vocab_file, merge_file):
    """A GPT of the benchmark's shape saved by pretrain_gpt.py after one step on mock data."""
    name = f"gpt_l{opts.layers}_h{opts.hidden}_a{opts.heads}_s{opts.seq_length}"
    ckpt = os.path.join(work, name)
    if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        run([sys.executable, "pretrain_gpt.py", "--num-layers", str(opts.layers),
             "--hidden-size", str(opts.hidden), "--num-attention-heads", str(opts.heads),
             "--seq-length", str(opts.seq_length), "--max-position-embeddings",
             str(opts.seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
             "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--eval-iters", "0",
             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab_file,
             "--merge-file", merge_file, "--save", ckpt, "--device", "cpu",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1"])
    hf_dir = ckpt + "_hf"
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        run([sys.executable, "tools/convert_hf.py", "export", "--load", ckpt, "--output",
             hf_dir])
    return ckpt, hf_dir


def docstring_words():
    """Words of the standard library's docstrings, in file order (the requests' text)."""
    words = []
    for path in stdlib_sources()[:400]:
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        for doc in re.findall(r'"""(.*?)"""', text, flags=re.S):
            words += re.findall(r"[A-Za-z][A-Za-z'-]*[.,;:]?", doc)
    return words


def build_requests(n_docs, seed):
    """(context, continuation) pairs of four task shapes, ``n_docs`` documents each."""
    rng = random.Random(seed)
    words = docstring_words()

    def text(n):
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])

    shapes = {  # (context words, (min, max) continuation words, choices)
        "hellaswag": ((60, 100), (10, 25), 4),
        "arc": ((15, 40), (1, 6), 4),
        "piqa": ((8, 20), (10, 30), 2),
        "lambada": ((60, 100), (1, 1), 1),
    }
    pairs = []
    for (lo, hi), (clo, chi), choices in shapes.values():
        for _ in range(n_docs):
            context = text(rng.randint(lo, hi))
            pairs += [(context, " " + text(rng.randint(clo, chi))) for _ in range(choices)]
    return pairs


def timed(lm, instances):
    """(results, seconds) of one loglikelihood run over ``instances``."""
    start = time.perf_counter()
    results = lm.loglikelihood(instances, disable_tqdm=True)
    return results, time.perf_counter() - start


def scored_tokens(lm, pairs):
    """Tokens the requests put through the model (context + continuation, truncated)."""
    total = 0
    for context, continuation in pairs:
        ctx, cont = lm._encode_pair(context, continuation)
        total += min(len(ctx) + len(cont), lm.max_length + 1) - 1
    return total


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.makedirs(opts.work_dir, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    vocab_file, merge_file = build_vocab(opts.work_dir)
    ckpt, hf_dir = build_checkpoint(opts, opts.work_dir, vocab_file, merge_file)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tasks.lm_eval_adapter import MegatronLM

    pairs = build_requests(opts.docs, opts.seed)
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours = MegatronLM(load=ckpt, device=opts.device, batch_size=opts.batch_size,
                      dtype=opts.dtype)
    hf = HFLM(pretrained=hf_dir, device=opts.device, batch_size=opts.batch_size,
              dtype=opts.dtype)
    tokens = scored_tokens(ours, pairs)
    assert tokens == scored_tokens(hf, pairs), "the two tokenizers disagree"
    warm = instances[:2 * opts.batch_size]
    for lm in (ours, hf):
        lm.loglikelihood(warm, disable_tqdm=True)
    ours_res, ours_s = timed(ours, instances)
    hf_res, hf_s = timed(hf, instances)

    diff = max(abs(a[0] - b[0]) for a, b in zip(ours_res, hf_res))
    same_greedy = sum(a[1] == b[1] for a, b in zip(ours_res, hf_res)) / len(pairs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: {opts.layers} layers, hidden {opts.hidden}, {opts.heads} heads, "
          f"max length {ours.max_length}, vocabulary {ours.vocab_size}; {opts.dtype} on "
          f"{opts.device}, {torch.get_num_threads()} threads, batch {opts.batch_size}; "
          f"load average {load:.2f}")
    print(f"requests: {len(pairs)} ({opts.docs} documents x 4 shapes), {tokens} tokens")
    print(f"agreement: max |loglikelihood difference| {diff:.2e}, greedy flags equal "
          f"{100 * same_greedy:.1f}%")
    print("| impl | seconds | tokens/s |")
    print("|---|---|---|")
    print(f"| ours (megatron-ltd) | {ours_s:.2f} | {tokens / ours_s:.0f} |")
    print(f"| lm-eval HFLM | {hf_s:.2f} | {tokens / hf_s:.0f} |")
    print(f"| **ours / HFLM** | | **{hf_s / ours_s:.2f}x** |")
    return {"ours_s": ours_s, "hf_s": hf_s, "tokens": tokens, "max_diff": diff,
            "same_greedy": same_greedy}


if __name__ == "__main__":
    main()
