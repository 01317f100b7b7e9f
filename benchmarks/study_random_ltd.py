"""random-LTD study on the demo corpus: validation loss against consumed layer tokens.

    python benchmarks/study_random_ltd.py [--output-dir benchmarks/results] [--train-iters 160]

Trains a small GPT (default 6 layers, so that the 4 middle layers drop; hidden 128, 4 heads,
seq 128, global batch 16, dropout 0, one torch thread) on the demo corpus (the documentation
Python ships; built with examples/tiny_cpu_demo.py's steps into ``--data-dir`` unless it is
already there), with the same seed, data order and hyper-parameters in every run:

1. ``baseline``: dense;
2. ``mslg_ltlr``: random-LTD, MSLG (fixed_linear from --ltd-start, +--ltd-step, full length at
   --ramp-fraction of the run, as the paper's ~70%) and the LayerToken LR (--layer-token-lr);
3. ``mslg_iterlr``: the same MSLG with the ordinary iteration LR;
4. ``constant``: constant dropping (--random-ltd-schedule constant) at the kept length whose
   layer-token saving equals run 2's (LayerToken LR, like run 2, so only the schedule differs);

and ``baseline_seed2`` (the baseline with another seed: a different initialisation and data
order) for the noise level.

Two protocols (--protocols):

- ``a`` (same data): every run takes --train-iters iterations (the same samples); the random-LTD
  runs then consume fewer layer tokens (the paper's data-saving framing, Tab. 6 style).
- ``b`` (same compute): the random-LTD runs get the baseline's layer-token budget through
  --train-layer-tokens and so take more iterations (more samples); their MSLG horizon is set to
  --ramp-fraction of *their* iteration count (solved so that the budget is met).

Measurements (all from the runs themselves, not from formulas):

- validation loss every --eval-interval iterations, always on the SAME --eval-batches global
  batches (the validation dataset is wrapped so that every evaluation reads the same samples);
- layer tokens: forward hooks on the transformer layers count the tokens each layer actually ran
  on in training (checked against the framework's own "consumed layer tokens" log field);
- training wall-clock and CPU seconds with evaluation time subtracted (the machine may be shared:
  CPU seconds of this process are less disturbed by other jobs than wall time).

Writes ``<output-dir>/random_ltd_study.json`` (settings, commands, every curve),
``random_ltd_study.csv`` (one row per evaluation) and ``random_ltd_study.png``; prints a markdown
table.
"""

import argparse
import csv
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import (FixedSamples, Probe, console_fields,  # noqa: E402,F401
                               interpolate)
from benchmarks.common import train_run as common_train_run  # noqa: E402

RUN_LABELS = {
    "baseline": "baseline (dense)",
    "baseline_seed2": "baseline, 2nd seed",
    "mslg_ltlr": "random-LTD MSLG + LayerToken LR",
    "mslg_iterlr": "random-LTD MSLG + iteration LR",
    "constant": "constant drop, same saving",
}
COLORS = {"baseline": "black", "baseline_seed2": "grey", "mslg_ltlr": "tab:blue",
          "mslg_iterlr": "tab:orange", "constant": "tab:red"}


# ----------------------------------------------------------------------------------------------
# data


def ensure_demo_data(data_dir, vocab_size=4096, log=print):
    """The demo's corpus, BPE vocabulary and .bin/.idx under ``data_dir`` (built by the demo's
    own steps where missing). Returns (data prefix, vocab.json, merges.txt)."""
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    corpus = os.path.join(data_dir, "stdlib_docs.jsonl")
    if not os.path.exists(corpus):
        spec = importlib.util.spec_from_file_location(
            "tiny_cpu_demo", os.path.join(ROOT, "examples", "tiny_cpu_demo.py"))
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)
        with open(corpus + ".tmp", "w", encoding="utf-8") as f:
            for doc in demo.stdlib_documents():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(corpus + ".tmp", corpus)
        log(f"built corpus {corpus}")
    vocab_dir = os.path.join(data_dir, "vocab")
    vocab, merges = os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt")
    py = sys.executable
    if not os.path.exists(merges):
        subprocess.run([py, "tools/train_bpe_vocab.py", "--input", corpus, "--vocab-size",
                        str(vocab_size), "--output-dir", vocab_dir], check=True, cwd=ROOT)
    prefix = os.path.join(data_dir, "data", "stdlib")
    data = prefix + "_text_document"
    if not os.path.exists(data + ".idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        subprocess.run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
                        prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                        "--merge-file", merges, "--append-eod", "--workers", "2",
                        "--log-interval", "100000"], check=True, cwd=ROOT)
    return data, vocab, merges


# ----------------------------------------------------------------------------------------------
# one run, measured


def train_run(name, argv, eval_batches, log=print):
    """Train one GPT configuration in-process; returns its measured record
    (``benchmarks.common.train_run``)."""
    return common_train_run(name, argv, eval_batches, log=log, labels=RUN_LABELS)


# ----------------------------------------------------------------------------------------------
# the study


def base_argv(opts, data, vocab, merges):
    return ["--num-layers", str(opts.num_layers), "--hidden-size", str(opts.hidden_size),
            "--num-attention-heads", str(opts.num_heads),
            "--seq-length", str(opts.seq_length),
            "--max-position-embeddings", str(opts.seq_length),
            "--micro-batch-size", str(opts.micro_batch_size),
            "--global-batch-size", str(opts.global_batch_size),
            "--lr", str(opts.lr), "--min-lr", str(opts.lr / 10), "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(opts.warmup_iters), "--weight-decay", "0.1",
            "--adam-beta2", "0.95", "--clip-grad", "1.0",
            "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
            "--data-path", data, "--split", opts.split,
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
            "--merge-file", merges, "--make-vocab-size-divisible-by", "64",
            "--log-interval", str(opts.eval_interval),
            "--eval-interval", str(opts.eval_interval),
            "--eval-iters", str(opts.eval_batches),
            "--num-workers", "0", "--device", "cpu"]


def ltd_scheduler(opts, *flags):
    """The framework's kept-length scheduler for the given random-LTD flags (for planning)."""
    from megatron.ltd.config import random_ltd_config_from_args
    from megatron.ltd.schedule import RandomLTDScheduler

    values = {"num_layers": opts.num_layers, "seq_length": opts.seq_length}
    i = 0
    while i < len(flags):
        key = flags[i].lstrip("-").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            values[key] = value if key == "random_ltd_schedule" else int(value)
            i += 2
        else:
            values[key] = True
            i += 1
    cfg = random_ltd_config_from_args(argparse.Namespace(**values))
    return RandomLTDScheduler.from_config(cfg, opts.num_layers, opts.seq_length)


def plan(opts):
    """Flags of every run per protocol, and the planned (formula) savings for the record."""
    from megatron.ltd.layer_tokens import (iterations_for_layer_tokens,
                                           run_layer_token_saving)

    T, s, L, gbs = opts.train_iters, opts.seq_length, opts.num_layers, opts.global_batch_size
    n = L - 2
    mslg = lambda horizon: ["--random-ltd", "--random-ltd-start", str(opts.ltd_start),  # noqa
                            "--random-ltd-step", str(opts.ltd_step),
                            "--random-ltd-schedule", "fixed_linear",
                            "--random-ltd-schedule-steps", str(horizon)]
    horizon_a = max(1, round(opts.ramp_fraction * T))
    saving = run_layer_token_saving(ltd_scheduler(opts, *mslg(horizon_a)), T, gbs)
    # constant kept length r with 1 - (2s + n r)/(L s) = saving (no rounding to the step)
    kept_const = max(1, min(s, round(s - saving * L * s / n)))
    const = ["--random-ltd", "--random-ltd-schedule", "constant",
             "--random-ltd-start", str(kept_const), "--layer-token-lr"]
    seed = ["--seed", str(opts.seed)]
    runs = {"a": [("baseline", seed + ["--train-iters", str(T)]),
                  ("mslg_ltlr", seed + ["--train-iters", str(T)] + mslg(horizon_a)
                   + ["--layer-token-lr"]),
                  ("mslg_iterlr", seed + ["--train-iters", str(T)] + mslg(horizon_a)),
                  ("constant", seed + ["--train-iters", str(T)] + const)]}
    if opts.seed2 is not None:
        runs["a"].append(("baseline_seed2", ["--seed", str(opts.seed2), "--train-iters", str(T)]))
    budget = T * gbs * s * L
    # protocol b: the MSLG horizon is ramp_fraction of the run's own iteration count, which in
    # turn is the number of iterations the budget lasts under that horizon: a fixed point.
    iters_b = T
    for _ in range(50):
        horizon_b = max(1, round(opts.ramp_fraction * iters_b))
        nxt = iterations_for_layer_tokens(ltd_scheduler(opts, *mslg(horizon_b)), budget, gbs,
                                          4 * T + 10)
        if nxt == iters_b:
            break
        iters_b = nxt
    horizon_b = max(1, round(opts.ramp_fraction * iters_b))
    b_flags = seed + ["--train-layer-tokens", str(budget)]
    runs["b"] = [("mslg_ltlr", b_flags + mslg(horizon_b) + ["--layer-token-lr"]),
                 ("mslg_iterlr", b_flags + mslg(horizon_b)),
                 ("constant", b_flags + const)]
    info = {"budget_layer_tokens": budget, "mslg_horizon_a": horizon_a,
            "mslg_horizon_b": horizon_b, "mslg_iterations_b": iters_b,
            "planned_mslg_saving_a": saving, "constant_kept_length": kept_const,
            "planned_constant_saving": 1 - (2 * s + n * kept_const) / (L * s)
            if L > 2 else 0.0}
    return runs, info


def summarize(records, baseline):
    rows = []
    for rec in records:
        rows.append({
            "run": rec["name"], "label": rec["label"], "iterations": rec["iterations"],
            "layer_tokens": rec["layer_tokens"],
            "layer_token_saving": 1 - rec["layer_tokens"] / baseline["layer_tokens"],
            "final_valid_loss": rec["final_valid_loss"],
            "delta_vs_baseline": rec["final_valid_loss"] - baseline["final_valid_loss"],
            # the baseline's curve read at this run's final layer tokens (equal compute)
            "baseline_at_same_layer_tokens": interpolate(baseline["evals"], "layer_tokens",
                                                         rec["layer_tokens"]),
            "train_wall_s": rec["train_wall_s"],
            "wall_saving": 1 - rec["train_wall_s"] / baseline["train_wall_s"],
            "train_cpu_s": rec["train_cpu_s"],
            "cpu_saving": 1 - rec["train_cpu_s"] / baseline["train_cpu_s"]})
    return rows


def markdown_table(rows, title):
    lines = [f"**{title}**", "",
             "| run | iterations | layer tokens | layer-token saving | final valid loss "
             "| vs baseline | baseline at same layer tokens | train wall s | wall saving "
             "| train CPU s | CPU saving |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        at = r["baseline_at_same_layer_tokens"]
        lines.append(f"| {r['label']} | {r['iterations']} | {r['layer_tokens'] / 1e6:.2f}M | "
                     f"{100 * r['layer_token_saving']:.1f}% | {r['final_valid_loss']:.4f} | "
                     f"{r['delta_vs_baseline']:+.4f} | "
                     f"{'-' if at is None else f'{at:.4f}'} | {r['train_wall_s']:.1f} | "
                     f"{100 * r['wall_saving']:.1f}% | {r['train_cpu_s']:.1f} | "
                     f"{100 * r['cpu_saving']:.1f}% |")
    return "\n".join(lines)


def plot(study, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in ("a", "b") if p in study["runs"]]
    titles = {"a": "(a) same iterations/data", "b": "(b) same layer-token budget"}
    fig, axes = plt.subplots(len(protocols), 3, figsize=(19, 4.8 * len(protocols)),
                             squeeze=False)
    for row, proto in enumerate(protocols):
        recs = study["runs"][proto]
        if proto == "b":  # the baseline (and its 2nd seed) of protocol a: same budget
            recs = [r for r in study["runs"]["a"] if r["name"].startswith("baseline")] + recs
        lows = min(min(e["loss"] for e in r["evals"]) for r in recs)
        half = [r["evals"][len(r["evals"]) // 4]["loss"] for r in recs]
        for col, (key, xlabel, scale) in enumerate(
                (("layer_tokens", "consumed layer tokens (millions)", 1e-6),
                 ("wall_s", "training wall-clock seconds (evaluation excluded)", 1.0),
                 ("cpu_s", "training CPU seconds of the process (evaluation excluded)", 1.0))):
            ax = axes[row][col]
            for r in recs:
                base = r["name"].split("@")[0]
                xs = [e[key] * scale for e in r["evals"]]
                ys = [e["loss"] for e in r["evals"]]
                ax.plot(xs, ys, color=COLORS.get(base), marker=".", ms=3, lw=1.3,
                        ls="--" if base == "baseline_seed2" else "-",
                        label=f"{r['label']} ({r['final_valid_loss']:.3f})")
            ax.set_ylim(lows - 0.05 * (max(half) - lows), max(half))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (same batches)")
            ax.set_title(f"{titles[proto]}: vs "
                         f"{('layer tokens', 'wall clock', 'CPU time')[col]}", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=8, title="run (final valid loss)", title_fontsize=8)
    fig.suptitle(study["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(study, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["protocol", "run", "iteration", "layer_tokens", "train_wall_s",
                    "train_cpu_s", "valid_loss", "lr", "kept_length"])
        for proto, recs in study["runs"].items():
            for r in recs:
                for e in r["evals"]:
                    w.writerow([proto, r["name"], e["iteration"], e["layer_tokens"],
                                f"{e['wall_s']:.3f}", f"{e['cpu_s']:.3f}", f"{e['loss']:.6f}",
                                "" if e["lr"] is None else f"{e['lr']:.4e}",
                                "" if e["kept"] is None else e["kept"]])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--data-dir", default=os.path.join(ROOT, "demo_output"),
                   help="demo corpus/vocab/data directory (built there when missing)")
    p.add_argument("--data-path", default=None, help="use this .bin/.idx prefix instead "
                   "(with --vocab-file/--merge-file; tests)")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=160)
    p.add_argument("--warmup-iters", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--split", default="95,5,0")
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=4,
                   help="global batches in every evaluation (always the same ones)")
    p.add_argument("--ltd-start", type=int, default=32)
    p.add_argument("--ltd-step", type=int, default=8)
    p.add_argument("--ramp-fraction", type=float, default=0.7,
                   help="MSLG reaches the full length at this fraction of the run")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seed2", type=int, default=1235,
                   help="second baseline seed for the noise level (-1: skip)")
    p.add_argument("--protocols", default="a,b")
    p.add_argument("--replot", action="store_true",
                   help="only redo the tables, CSV and figure from <output-dir>'s JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1: robust on a shared machine; 0: torch's default)")
    opts = p.parse_args(argv)
    if opts.seed2 is not None and opts.seed2 < 0:
        opts.seed2 = None
    return opts


def main(argv=None):
    opts = parse(argv)
    if opts.replot:  # tables, CSV and figure again from the saved JSON (no training)
        with open(os.path.join(opts.output_dir, "random_ltd_study.json")) as f:
            return finish(json.load(f), opts.output_dir)
    command = "python benchmarks/study_random_ltd.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.makedirs(opts.output_dir, exist_ok=True)
    if opts.data_path:
        data, vocab, merges = opts.data_path, opts.vocab_file, opts.merge_file
    else:
        data, vocab, merges = ensure_demo_data(opts.data_dir)
    runs, info = plan(opts)
    protocols = [p.strip() for p in opts.protocols.split(",") if p.strip()]
    if "b" in protocols and "a" not in protocols:
        raise SystemExit("protocol b compares with the baseline of protocol a: run a too")
    common = base_argv(opts, data, vocab, merges)
    print(f"planned: {json.dumps(info)}", flush=True)
    study = {
        "title": (f"random-LTD study: GPT {opts.num_layers} layers, hidden {opts.hidden_size}, "
                  f"seq {opts.seq_length}, global batch {opts.global_batch_size}, "
                  f"{opts.train_iters} baseline iterations, demo corpus; MSLG "
                  f"{opts.ltd_start}+{opts.ltd_step} to {opts.seq_length} at "
                  f"{opts.ramp_fraction:.0%} of each run; constant kept length "
                  f"{info['constant_kept_length']}"),
        "command": command, "settings": vars(opts), "plan": info,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "common_argv": common, "runs": {}, "tables": {}}
    t0 = time.time()
    for proto in protocols:
        print(f"protocol {proto}:", flush=True)
        recs = []
        for name, flags in runs[proto]:
            rec = train_run(name, common + flags, opts.eval_batches)
            rec["load_avg_after"] = os.getloadavg()
            recs.append(rec)
        study["runs"][proto] = recs
    study["elapsed_s"] = time.time() - t0
    return finish(study, opts.output_dir)


def finish(study, output_dir):
    """Tables (into the study), JSON, CSV, figure; prints the tables."""
    baselines = [r for r in study["runs"]["a"] if r["name"].startswith("baseline")]
    baseline = baselines[0]
    for proto, recs in study["runs"].items():
        study["tables"][proto] = summarize((baselines if proto == "b" else []) + recs, baseline)
    json_path = os.path.join(output_dir, "random_ltd_study.json")
    with open(json_path, "w") as f:
        json.dump(study, f, indent=1)
    write_csv(study, os.path.join(output_dir, "random_ltd_study.csv"))
    png = os.path.join(output_dir, "random_ltd_study.png")
    plot(study, png)
    titles = {"a": "(a) same iterations (same data): random-LTD uses fewer layer tokens",
              "b": "(b) same layer-token budget as the baseline (--train-layer-tokens)"}
    print()
    for proto in study["runs"]:
        print(markdown_table(study["tables"][proto], titles[proto]) + "\n")
    print(f"command: {study['command']}\nwrote {json_path}, {png} "
          f"({study['elapsed_s']:.0f} s of training runs)")
    return study


if __name__ == "__main__":
    main()
