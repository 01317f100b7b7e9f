"""Tiny end-to-end GPT pretraining demo on CPU, on text every Python installation ships.

    python examples/tiny_cpu_demo.py [--output-dir demo_output] [--train-iters 200]

1. builds a corpus (.jsonl) from the documentation Python ships (pydoc topics, docstrings),
2. trains a small byte-level BPE vocabulary (tools/train_bpe_vocab.py),
3. preprocesses the corpus into .bin/.idx (tools/preprocess_data.py, 2 workers),
4. pretrains a small GPT with pretrain_gpt.py and random-LTD (the middle layers start on a
   random quarter of the tokens and grow to all of them; the progress line every 10 iterations
   shows the kept length and the consumed layer tokens; TensorBoard logs; checkpoints),
5. prints greedy and top-p samples from the checkpoint (tools/generate_text.py).

Each step is the real tool a user would run on the PILE; the commands are printed as they run.
Re-running reuses the corpus, vocabulary and preprocessed data; training resumes from the
checkpoint in ``--output-dir`` unless ``--fresh`` is given.
"""

import argparse
import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_documents(min_chars=200):
    """Python's own documentation: the language-reference topics that ``pydoc`` ships
    (pydoc_data.topics), then one document per standard-library module (its docstrings)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        if len(topics[name]) >= min_chars:
            yield {"text": topics[name].strip(), "meta": {"source": f"pydoc_data:{name}"}}
    stdlib = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("test", "tests", "idle_test", "site-packages")
                             and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        docs.append(doc.strip())
            text = "\n\n".join(docs)
            if len(text) >= min_chars:
                yield {"text": text, "meta": {"source": os.path.relpath(path, stdlib)}}


def run(cmd, **kwargs):
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def demo_args(description, default_dir):
    """The demos' common flags -> (args, the output directory, created if missing)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, default_dir))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--train-iters", type=int, default=200)
    parser.add_argument("--fresh", action="store_true", help="Delete earlier demo output first.")
    args = parser.parse_args()
    out = os.path.abspath(args.output_dir)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return args, out


def build_corpus(out):
    """``out/stdlib_docs.jsonl`` (written once, atomically); returns its path."""
    corpus = os.path.join(out, "stdlib_docs.jsonl")
    if os.path.exists(corpus):
        print(f"[1/5] corpus: reusing {corpus}")
        return corpus
    n, size = 0, 0
    with open(corpus + ".tmp", "w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            line = json.dumps(doc, ensure_ascii=False)
            f.write(line + "\n")
            n, size = n + 1, size + len(line)
    os.replace(corpus + ".tmp", corpus)
    print(f"[1/5] corpus: {n} documents, {size / 1e6:.1f} MB of Python docstrings -> {corpus}")
    return corpus


def main():
    args, out = demo_args(__doc__.splitlines()[0], "demo_output")
    py = sys.executable
    t0 = time.time()
    corpus = build_corpus(out)

    vocab_dir = os.path.join(out, "vocab")
    vocab, merges = os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt")
    if not os.path.exists(merges):
        print("[2/5] training a byte-level BPE vocabulary")
        run([py, "tools/train_bpe_vocab.py", "--input", corpus, "--vocab-size",
             str(args.vocab_size), "--output-dir", vocab_dir])
    else:
        print(f"[2/5] vocabulary: reusing {vocab_dir}")

    prefix = os.path.join(out, "data", "stdlib")
    data = prefix + "_text_document"
    if not os.path.exists(data + ".idx"):
        print("[3/5] preprocessing into Megatron's .bin/.idx format")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file",
             merges, "--append-eod", "--workers", "2", "--log-interval", "500"])
    else:
        print(f"[3/5] data: reusing {data}.bin/.idx")

    ckpt = os.path.join(out, "checkpoints")
    ramp = max(1, int(0.7 * args.train_iters))
    print("[4/5] pretraining a small GPT (4 layers, hidden 256, seq 256) on CPU with random-LTD: "
          f"the middle layers keep 64 of 256 tokens at first, +16 every {ramp // 12 or 1} "
          f"iterations, all 256 after {ramp} (watch 'random ltd reserved length')")
    run([py, "pretrain_gpt.py",
         "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
         "--seq-length", "256", "--max-position-embeddings", "256",
         "--micro-batch-size", "8", "--global-batch-size", "16",
         "--train-iters", str(args.train_iters), "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-decay-style", "cosine", "--lr-warmup-iters", "20", "--weight-decay", "0.1",
         "--adam-beta2", "0.95", "--clip-grad", "1.0",
         "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
         "--random-ltd", "--random-ltd-start", "64", "--random-ltd-step", "16",
         "--random-ltd-schedule-steps", str(ramp),
         "--data-path", data, "--split", "98,2,0",
         "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
         "--make-vocab-size-divisible-by", "64",
         "--log-interval", "10", "--eval-interval", "100", "--eval-iters", "5",
         "--save", ckpt, "--load", ckpt, "--save-interval", "100",
         "--tensorboard-dir", os.path.join(out, "tensorboard"),
         "--num-workers", "0", "--device", "cpu"])

    print("[5/5] sampling from the trained model")
    for mode in (["--greedy"], ["--top-p", "0.9", "--temperature", "0.8"]):
        run([py, "tools/generate_text.py", "--load", ckpt, "--prompt",
             "Return a new list containing", "--max-new-tokens", "40", "--seed", "1"] + mode)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out} "
          f"(tensorboard --logdir {os.path.join(out, 'tensorboard')})")


if __name__ == "__main__":
    main()
