"""BERT token-dropping study and the paper's ablations (GPT and BERT) at equal layer tokens.

    python benchmarks/study_bert_ltd.py --jobs 2 [--output-dir benchmarks/results]

Everything runs on the demo corpus (the documentation Python ships): BERT on the sentence-level
WordPiece data of examples/tiny_bert_demo.py (built into --bert-data-dir where missing), GPT on
the document-level BPE data of examples/tiny_cpu_demo.py (--gpt-data-dir), with the GPT study's
(benchmarks/study_random_ltd.py) model and measurements: one torch thread per run, dropout 0,
validation loss every --eval-interval iterations on the SAME --eval-batches batches (built with
the first seed whatever the run's seed), layer tokens counted by forward hooks on the layers and
checked against the framework's "consumed layer tokens".

Equal compute: the dense baseline trains --train-iters iterations; every other run gets the
baseline's layer-token budget (--train-layer-tokens), uses the LayerToken LR (--layer-token-lr)
and so takes as many iterations as the budget lasts. MSLG runs reach the full length at
--ramp-fraction of their own run (solved so that the budget is met).

Parts (--parts):

- ``arms`` (BERT, --seeds each): ``baseline`` (dense), ``random_ltd`` (MSLG), ``random_ltd_real``
  (MSLG, --random-ltd-real-tokens-only), ``tokenbypass`` and ``sctd`` (their published
  defaults: half the tokens, constant);
- ``tab5`` (Tab. 5, GPT and BERT): MSLG in the middle layers (the default) against dropping in
  all layers / all but the first / all but the last (--random-ltd-allow-edge-layers);
- ``tab6`` (Tab. 6): MSLG against constant dropping with the same layer-token saving;
- ``fig5`` (Fig. 5): constant dropping (kept --sweep-kept) in one layer at a time, every layer.

The baseline and the MSLG run are trained with every seed for both families (they are the
reference of every comparison and give the seed spread); the ablation runs use the first
--ablation-seeds seeds. An arm whose method this build refuses (a UserError such as
NotImplementedYet from pretrain_bert.py, or an unknown --random-ltd-method choice) is reported
as "not available in this build" with the refusal; it is checked at run time, so the same
script runs it once the method lands.

Writes ``<output-dir>/bert_ltd_study.json`` (settings, commands, every curve),
``bert_ltd_study.csv`` (one row per evaluation), ``bert_ltd_study.png``; prints markdown tables
and the claims section (each of the paper's claims: supported / contradicted / cannot resolve,
the last when the difference is within the seed spread).
"""

import argparse
import concurrent.futures
import contextlib
import csv
import io
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import interpolate, train_run  # noqa: E402

FAMILY_MODULE = {"bert": "pretrain_bert", "gpt": "pretrain_gpt"}
ARMS = ("baseline", "random_ltd", "random_ltd_real", "tokenbypass", "sctd")
PARTS = ("arms", "tab5", "tab6", "fig5")
LABELS = {
    "baseline": "baseline (dense)",
    "random_ltd": "random-LTD (MSLG, middle layers)",
    "random_ltd_real": "random-LTD real-tokens-only (MSLG)",
    "tokenbypass": "TokenBypass (50%)",
    "sctd": "SCTD (50%, full pass every 10)",
    "all_layers": "MSLG in all layers",
    "all_but_first": "MSLG in all but the first",
    "all_but_last": "MSLG in all but the last",
    "constant": "constant drop, same saving",
}
COLORS = {"baseline": "black", "random_ltd": "tab:blue", "random_ltd_real": "tab:cyan",
          "tokenbypass": "tab:green", "sctd": "tab:purple", "all_layers": "tab:red",
          "all_but_first": "tab:orange", "all_but_last": "tab:brown", "constant": "tab:pink"}


# ----------------------------------------------------------------------------------------------
# data


def ensure_bert_data(data_dir, vocab_size=4096, log=print):
    """tiny_bert_demo's corpus, WordPiece vocabulary and sentence-level .bin/.idx under
    ``data_dir`` (built by the demo's own steps where missing). Returns (prefix, vocab.txt)."""
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from tiny_cpu_demo import build_corpus
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    with contextlib.redirect_stdout(io.StringIO()):
        corpus = build_corpus(data_dir)
    py = sys.executable
    vocab = os.path.join(data_dir, "vocab", "vocab.txt")
    if not os.path.exists(vocab):
        subprocess.run([py, "tools/train_wordpiece_vocab.py", "--input", corpus, "--vocab-size",
                        str(vocab_size), "--output-dir", os.path.dirname(vocab)], check=True,
                       cwd=ROOT)
    prefix = os.path.join(data_dir, "data", "stdlib")
    if not os.path.exists(prefix + "_text_sentence.idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        subprocess.run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
                        prefix, "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                        vocab, "--split-sentences", "--workers", "2", "--log-interval",
                        "100000"], check=True, cwd=ROOT)
        log(f"built {prefix}_text_sentence")
    return prefix + "_text_sentence", vocab


# ----------------------------------------------------------------------------------------------
# planning


def family_argv(opts, family, data):
    """The flags every run of ``family`` shares (model, optimizer, data, evaluation)."""
    argv = ["--num-layers", str(opts.num_layers), "--hidden-size", str(opts.hidden_size),
            "--num-attention-heads", str(opts.num_heads), "--seq-length", str(opts.seq_length),
            "--max-position-embeddings", str(opts.seq_length),
            "--micro-batch-size", str(opts.global_batch_size),
            "--global-batch-size", str(opts.global_batch_size),
            "--lr", str(opts.lr), "--min-lr", str(opts.lr / 10),
            "--lr-warmup-iters", str(opts.warmup_iters), "--clip-grad", "1.0",
            "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
            "--data-path", data["path"], "--split", opts.split,
            "--make-vocab-size-divisible-by", "64",
            "--log-interval", str(opts.eval_interval),
            "--eval-interval", str(opts.eval_interval), "--eval-iters", str(opts.eval_batches),
            "--num-workers", "0", "--device", "cpu"]
    if family == "bert":
        return argv + ["--lr-decay-style", "linear", "--weight-decay", "0.01",
                       "--tokenizer-type", "BertWordPieceLowerCase",
                       "--vocab-file", data["vocab"]]
    return argv + ["--lr-decay-style", "cosine", "--weight-decay", "0.1", "--adam-beta2", "0.95",
                   "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", data["vocab"],
                   "--merge-file", data["merges"]]


def _ltd_parser():
    from megatron.arguments import build_parser
    from megatron.ltd.config import add_random_ltd_args

    parser = build_parser()
    if "--random-ltd" not in parser._option_string_actions:
        add_random_ltd_args(parser)
    return parser


def scheduler_for(opts, flags):
    """The framework's kept-length scheduler for these random-LTD flags (for planning)."""
    from megatron.ltd.config import random_ltd_config_from_args
    from megatron.ltd.schedule import RandomLTDScheduler

    keep = []
    it = iter(range(len(flags)))
    for i in it:  # only the random-LTD flags matter here
        if flags[i].startswith("--random-ltd"):
            keep.append(flags[i])
            j = i + 1
            while j < len(flags) and not flags[j].startswith("--"):
                keep.append(flags[j])
                j += 1
    args = _ltd_parser().parse_args(keep + ["--num-layers", str(opts.num_layers),
                                            "--seq-length", str(opts.seq_length)])
    cfg = random_ltd_config_from_args(args)
    return RandomLTDScheduler.from_config(cfg, opts.num_layers, opts.seq_length)


def mslg_flags(opts, layer_ids=None):
    """MSLG flags (horizon filled in by ``solve_horizon``) for the given dropping layers."""
    flags = ["--random-ltd", "--random-ltd-start", str(opts.ltd_start),
             "--random-ltd-step", str(opts.ltd_step), "--random-ltd-schedule", "fixed_linear"]
    if layer_ids is not None:
        flags += ["--random-ltd-layer-ids", *map(str, layer_ids)]
        if 0 in layer_ids or opts.num_layers - 1 in layer_ids:
            flags.append("--random-ltd-allow-edge-layers")
    return flags


def solve_horizon(opts, flags, budget):
    """MSLG reaching the full length at --ramp-fraction of its own run, whose length is how
    long the layer-token budget lasts under that horizon (a fixed point). Returns
    (flags with the horizon, planned iterations)."""
    from megatron.ltd.layer_tokens import iterations_for_layer_tokens

    T, gbs = opts.train_iters, opts.global_batch_size
    iters = T
    for _ in range(50):
        horizon = max(1, round(opts.ramp_fraction * iters))
        sched = scheduler_for(opts, flags + ["--random-ltd-schedule-steps", str(horizon)])
        nxt = iterations_for_layer_tokens(sched, budget, gbs, 6 * T + 10)
        if nxt == iters:
            break
        iters = nxt
    horizon = max(1, round(opts.ramp_fraction * iters))
    return flags + ["--random-ltd-schedule-steps", str(horizon)], iters


def plan(opts, families):
    """Every run: dicts with family, part(s), config, seed, name, flags."""
    from megatron.ltd.layer_tokens import run_layer_token_saving

    s, L, gbs, T = opts.seq_length, opts.num_layers, opts.global_batch_size, opts.train_iters
    budget = T * gbs * s * L
    eq = ["--train-layer-tokens", str(budget), "--layer-token-lr"]
    runs, info = [], {"budget_layer_tokens": budget}
    ab_seeds = opts.seeds[:opts.ablation_seeds]
    for family in families:
        mslg, iters = solve_horizon(opts, mslg_flags(opts), budget)
        info[f"{family}_mslg_iterations"] = iters
        configs = {"baseline": ["--train-iters", str(T)], "random_ltd": mslg + eq}
        ref_seeds = {"baseline": opts.seeds, "random_ltd": opts.seeds}
        if family == "bert" and "arms" in opts.parts:
            configs.update({
                "random_ltd_real": mslg + ["--random-ltd-real-tokens-only"] + eq,
                "tokenbypass": ["--random-ltd", "--random-ltd-method", "tokenbypass"] + eq,
                "sctd": ["--random-ltd", "--random-ltd-method", "sctd"] + eq})
            for arm in ("random_ltd_real", "tokenbypass", "sctd"):
                ref_seeds[arm] = opts.seeds
        if "tab5" in opts.parts:
            for name, ids in (("all_layers", range(L)), ("all_but_first", range(1, L)),
                              ("all_but_last", range(L - 1))):
                flags, _ = solve_horizon(opts, mslg_flags(opts, list(ids)), budget)
                configs[name] = flags + eq
                ref_seeds[name] = ab_seeds
        if "tab6" in opts.parts:
            saving = run_layer_token_saving(scheduler_for(opts, mslg), iters, gbs)
            kept = max(1, min(s, round(s - saving * L * s / (L - 2))))
            info[f"{family}_constant_kept"] = kept
            info[f"{family}_mslg_saving"] = saving
            configs["constant"] = ["--random-ltd", "--random-ltd-schedule", "constant",
                                   "--random-ltd-start", str(kept)] + eq
            ref_seeds["constant"] = ab_seeds
        if "fig5" in opts.parts:
            for layer in range(L):
                flags = ["--random-ltd", "--random-ltd-schedule", "constant",
                         "--random-ltd-start", str(opts.sweep_kept),
                         "--random-ltd-layer-ids", str(layer)]
                if layer in (0, L - 1):
                    flags.append("--random-ltd-allow-edge-layers")
                configs[f"layer{layer}"] = flags + eq
                ref_seeds[f"layer{layer}"] = ab_seeds
        for config, flags in configs.items():
            for seed in ref_seeds[config]:
                runs.append({"family": family, "config": config, "seed": seed,
                             "name": f"{family}:{config}@{seed}",
                             "flags": ["--seed", str(seed)] + flags})
    return runs, info


# ----------------------------------------------------------------------------------------------
# running


def availability(family, argv):
    """None if this build accepts the flags for ``family``; else its one-line refusal."""
    import importlib

    from megatron.arguments import parse_args
    from megatron.errors import UserError
    from megatron.ltd.config import random_ltd_config_from_args

    module = importlib.import_module(FAMILY_MODULE[family])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parse_args(argv)
            provider = getattr(module, "PROVIDER", None)
            if provider is not None and provider.check_args is not None:
                provider.check_args(args)
            random_ltd_config_from_args(args)
    except UserError as e:
        return f"{type(e).__name__}: {e}"
    except SystemExit:  # argparse: e.g. an unknown --random-ltd-method choice
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return lines[-1] if lines else "refused by the argument parser"
    return None


def run_one(task):
    """Train one planned run (in this process or a worker); returns its record or its status."""
    import importlib

    from megatron.errors import UserError

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    family = importlib.import_module(FAMILY_MODULE[task["family"]])
    refused = availability(task["family"], task["argv"])
    base = {k: task[k] for k in ("family", "config", "seed", "name")}
    if refused:
        return dict(base, status="not available in this build", reason=refused)
    lines = []
    try:
        rec = train_run(task["name"], task["argv"], task["eval_batches"], log=lines.append,
                        labels=LABELS, family=family, eval_seed=task["eval_seed"])
    except UserError as e:  # accepted by the flag checks, refused when building the run
        return dict(base, status="not available in this build", reason=f"{type(e).__name__}: {e}")
    rec.update(base, status="ok", log=lines)
    rec["label"] = LABELS.get(task["config"], task["config"])
    return rec


def execute(tasks, jobs, log=print):
    results = {}

    def done(rec):
        results[rec["name"]] = rec
        if rec["status"] == "ok":
            for line in rec.get("log", []):
                log(line)
        else:
            log(f"  {rec['name']:24s} {rec['status']}: {rec['reason']}")

    if jobs <= 1:
        for task in tasks:
            done(run_one(task))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(run_one, t) for t in tasks]):
                done(fut.result())
    return [results[t["name"]] for t in tasks]


# ----------------------------------------------------------------------------------------------
# analysis


def group(study, family, config):
    return [r for r in study["records"] if r["family"] == family and r["config"] == config]


def stats(recs):
    """Final validation loss over seeds: n, mean, std, min, max (None without runs)."""
    vals = [r["final_valid_loss"] for r in recs if r["status"] == "ok"]
    if not vals:
        return None
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals),
            "iterations": statistics.fmean(r["iterations"] for r in recs if r["status"] == "ok"),
            "layer_tokens": statistics.fmean(r["layer_tokens"] for r in recs
                                             if r["status"] == "ok")}


def seed_spread(study, family):
    """The noise level: the largest max-min range over seeds among the baseline and MSLG
    (None with a single seed)."""
    ranges = [st["max"] - st["min"] for c in ("baseline", "random_ltd")
              for st in [stats(group(study, family, c))] if st and st["n"] > 1]
    return max(ranges) if ranges else None


def verdict(delta, spread, better_if_negative=True):
    """'supported' / 'contradicted' / 'cannot resolve' for a claimed improvement ``-delta``."""
    if delta is None:
        return "cannot resolve (runs missing)"
    if spread is None:
        return "cannot resolve (one seed: no spread to compare with)"
    d = delta if better_if_negative else -delta
    if abs(d) <= spread:
        return f"cannot resolve (difference {d:+.4f} within the seed spread {spread:.4f})"
    return (f"supported ({d:+.4f}, beyond the seed spread {spread:.4f})" if d < 0
            else f"contradicted ({d:+.4f}, beyond the seed spread {spread:.4f})")


def summarize(study):
    """Per family and config: statistics and the baseline's loss at equal layer tokens."""
    table = []
    for family in study["families"]:
        base = [r for r in group(study, family, "baseline") if r["status"] == "ok"]
        base_stats = stats(base)
        for config in study["configs"][family]:
            recs = group(study, family, config)
            st = stats(recs)
            row = {"family": family, "config": config,
                   "label": LABELS.get(config, config.replace("layer", "only layer ")),
                   "seeds": [r["seed"] for r in recs]}
            if st is None:
                row.update(status=recs[0]["status"], reason=recs[0].get("reason"))
            else:
                row.update(status="ok", **st)
                row["delta_vs_baseline"] = (st["mean"] - base_stats["mean"]
                                            if base_stats else None)
                ats = [interpolate(b["evals"], "layer_tokens", st["layer_tokens"]) for b in base]
                ats = [a for a in ats if a is not None]
                row["baseline_at_same_layer_tokens"] = statistics.fmean(ats) if ats else None
            table.append(row)
    return table


def claims(study):
    """Each of the paper's claims, judged against the seed spread."""
    out = []
    rows = {(r["family"], r["config"]): r for r in study["table"]}
    mean = lambda fam, cfg: (rows.get((fam, cfg)) or {}).get("mean")  # noqa: E731

    def diff(fam, a, b):
        ma, mb = mean(fam, a), mean(fam, b)
        return None if ma is None or mb is None else ma - mb

    for fam in study["families"]:
        spread = seed_spread(study, fam)
        F = fam.upper()
        if mean(fam, "random_ltd") is not None:
            d = diff(fam, "random_ltd", "baseline")
            v = verdict(d, spread)
            if v.startswith("cannot resolve (difference"):
                v = "supported for 'matches' (" + v[len("cannot resolve ("):]
            out.append({"family": fam, "claim": f"{F}: random-LTD (MSLG) matches or beats the "
                        "dense baseline at equal layer tokens", "verdict": v})
        for arm in ("random_ltd_real", "tokenbypass", "sctd"):
            r = rows.get((fam, arm))
            if r is None:
                continue
            if r["status"] != "ok":
                out.append({"family": fam, "claim": f"{F}: random-LTD vs {LABELS[arm]}",
                            "verdict": f"{arm} not available in this build"})
                continue
            out.append({"family": fam, "claim": f"{F}: random-LTD (MSLG) beats "
                        f"{LABELS[arm]} at equal layer tokens",
                        "verdict": verdict(diff(fam, "random_ltd", arm), spread)})
        for cfg in ("all_layers", "all_but_first", "all_but_last"):
            if (fam, cfg) in rows:
                r = rows[(fam, cfg)]
                v = (verdict(diff(fam, "random_ltd", cfg), spread) if r["status"] == "ok"
                     else f"not available in this build: {r.get('reason')}")
                out.append({"family": fam, "claim": f"{F}: keeping the first and last layers "
                            f"full beats {LABELS[cfg]} (Tab. 5)", "verdict": v})
        if (fam, "constant") in rows:
            out.append({"family": fam, "claim": f"{F}: MSLG beats constant dropping at equal "
                        "saving (Tab. 6)",
                        "verdict": verdict(diff(fam, "random_ltd", "constant"), spread)})
        layers = [(int(c[5:]), rows[(fam, c)]["mean"]) for (f, c) in rows
                  if f == fam and c.startswith("layer") and rows[(f, c)].get("mean") is not None]
        if layers:
            L = study["settings"]["num_layers"]
            edge = [v for i, v in layers if i in (0, L - 1)]
            middle = [v for i, v in layers if i not in (0, L - 1)]
            if edge and middle:
                d = statistics.fmean(middle) - statistics.fmean(edge)
                out.append({"family": fam, "claim": f"{F}: middle layers tolerate dropping "
                            "better than the first/last (Fig. 5; mean final loss of one-layer "
                            "dropping in a middle layer minus in an edge layer)",
                            "verdict": verdict(d, spread)})
    return out


# ----------------------------------------------------------------------------------------------
# outputs


def tokens(n):
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:.0f}"


def markdown(study):
    lines = []
    for fam in study["families"]:
        spread = seed_spread(study, fam)
        lines += [f"**{fam.upper()}** (equal layer tokens "
                  f"{tokens(study['plan']['budget_layer_tokens'])}; seed spread (largest "
                  f"min-max range of the baseline and MSLG over seeds) "
                  f"{'-' if spread is None else f'{spread:.4f}'})", "",
                  "| run | seeds | iterations | layer tokens (hooks) | final valid loss mean "
                  "| std | min | max | vs baseline mean |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in study["table"]:
            if r["family"] != fam:
                continue
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | - | - | - | {r['status']} | | | | |")
                continue
            dv = r["delta_vs_baseline"]
            lines.append(
                f"| {r['label']} | {r['n']} | {r['iterations']:.0f} | "
                f"{tokens(r['layer_tokens'])} | {r['mean']:.4f} | {r['std']:.4f} | "
                f"{r['min']:.4f} | {r['max']:.4f} | {'-' if dv is None else f'{dv:+.4f}'} |")
        lines.append("")
    unavailable = [r for r in study["table"] if r["status"] != "ok"]
    for r in unavailable:
        lines.append(f"- {r['family']} {r['config']}: {r['status']} ({r.get('reason')})")
    lines += ["", "**Claims (from these runs)**", ""]
    for c in study["claims"]:
        lines.append(f"- {c['claim']}: {c['verdict']}")
    return "\n".join(lines)


def write_csv(study, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["family", "config", "seed", "status", "iteration", "layer_tokens",
                    "train_wall_s", "train_cpu_s", "valid_loss", "lr", "kept_length"])
        for r in study["records"]:
            if r["status"] != "ok":
                w.writerow([r["family"], r["config"], r["seed"], r["status"]] + [""] * 7)
                continue
            for e in r["evals"]:
                w.writerow([r["family"], r["config"], r["seed"], "ok", e["iteration"],
                            e["layer_tokens"], f"{e['wall_s']:.3f}", f"{e['cpu_s']:.3f}",
                            f"{e['loss']:.6f}", "" if e["lr"] is None else f"{e['lr']:.4e}",
                            "" if e["kept"] is None else e["kept"]])


def plot(study, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = study["families"]
    fig, axes = plt.subplots(len(fams), 3, figsize=(19, 4.8 * len(fams)), squeeze=False)
    for row, fam in enumerate(fams):
        ok = [r for r in study["records"] if r["family"] == fam and r["status"] == "ok"]
        if not ok:
            continue
        lows = min(min(e["loss"] for e in r["evals"]) for r in ok)
        top = max(r["evals"][len(r["evals"]) // 4]["loss"] for r in ok)
        panels = (("curves: mean over seeds (band: min-max)",
                   [c for c in study["configs"][fam] if not c.startswith("layer")
                    and c not in ("all_layers", "all_but_first", "all_but_last", "constant")]),
                  ("ablations (Tab. 5/6)", ["baseline", "random_ltd", "all_layers",
                                            "all_but_first", "all_but_last", "constant"]))
        for col, (title, configs) in enumerate(panels):
            ax = axes[row][col]
            for cfg in configs:
                recs = [r for r in ok if r["config"] == cfg]
                if not recs:
                    continue
                n = min(len(r["evals"]) for r in recs)
                xs = [statistics.fmean(r["evals"][i]["layer_tokens"] for r in recs) / 1e6
                      for i in range(n)]
                ys = [[r["evals"][i]["loss"] for r in recs] for i in range(n)]
                ax.plot(xs, [statistics.fmean(y) for y in ys], color=COLORS.get(cfg), lw=1.3,
                        label=f"{LABELS.get(cfg, cfg)} (n={len(recs)})")
                if len(recs) > 1:
                    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys],
                                    color=COLORS.get(cfg), alpha=0.15)
            ax.set_ylim(lows - 0.05 * (top - lows), top)
            ax.set_xlabel("consumed layer tokens (millions)")
            ax.set_ylabel("validation MLM loss" if fam == "bert" else "validation LM loss")
            ax.set_title(f"{fam.upper()} {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        ax = axes[row][2]
        sweep = [r for r in study["table"] if r["family"] == fam
                 and r["config"].startswith("layer") and r["status"] == "ok"]
        if sweep:
            ax.bar([int(r["config"][5:]) for r in sweep], [r["mean"] for r in sweep],
                   color="tab:gray")
            base = next((r for r in study["table"] if r["family"] == fam
                         and r["config"] == "baseline" and r["status"] == "ok"), None)
            if base:
                ax.axhline(base["mean"], color="black", lw=1, label="baseline mean")
                ax.axhspan(base["min"], base["max"], color="black", alpha=0.1,
                           label="baseline seed range")
            vals = [r["mean"] for r in sweep] + ([base["min"], base["max"]] if base else [])
            pad = 0.2 * (max(vals) - min(vals) + 1e-3)
            ax.set_ylim(min(vals) - pad, max(vals) + pad)
            ax.legend(fontsize=7)
        ax.set_xlabel("the one dropping layer (constant kept length)")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"{fam.upper()} single-layer sensitivity (Fig. 5)", fontsize=10)
    fig.suptitle(study["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(study, output_dir):
    study["table"] = summarize(study)
    study["claims"] = claims(study)
    study["markdown"] = markdown(study)
    json_path = os.path.join(output_dir, "bert_ltd_study.json")
    with open(json_path, "w") as f:
        json.dump(study, f, indent=1)
    write_csv(study, os.path.join(output_dir, "bert_ltd_study.csv"))
    png = os.path.join(output_dir, "bert_ltd_study.png")
    plot(study, png)
    print("\n" + study["markdown"] + "\n")
    print(f"command: {study['command']}\nwrote {json_path}, {png} "
          f"({study['elapsed_s']:.0f} s of training runs)")
    return study


# ----------------------------------------------------------------------------------------------
# command line


QUICK = dict(num_layers=4, hidden_size=16, num_heads=2, seq_length=32, global_batch_size=4,
             train_iters=6, warmup_iters=1, eval_interval=3, eval_batches=1, ltd_start=8,
             ltd_step=8, sweep_kept=8, split="90,10,0")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--bert-data-dir", default=os.path.join(ROOT, "demo_bert_output"),
                   help="tiny_bert_demo's corpus/vocab/data directory (built where missing)")
    p.add_argument("--gpt-data-dir", default=os.path.join(ROOT, "demo_output"),
                   help="tiny_cpu_demo's corpus/vocab/data directory (built where missing)")
    p.add_argument("--bert-data-path", default=None, help="a sentence-level .bin/.idx prefix "
                   "instead (with --bert-vocab-file; tests)")
    p.add_argument("--bert-vocab-file", default=None)
    p.add_argument("--gpt-data-path", default=None, help="a document-level .bin/.idx prefix "
                   "instead (with --gpt-vocab-file/--gpt-merge-file; tests)")
    p.add_argument("--gpt-vocab-file", default=None)
    p.add_argument("--gpt-merge-file", default=None)
    p.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    p.add_argument("--families", default="bert,gpt",
                   help="families of the ablations (the arms are BERT's)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"BERT arms of the 'arms' part, of {', '.join(ARMS)} (baseline and "
                        "random_ltd always run: every comparison needs them)")
    p.add_argument("--seeds", default="1234,1235,1236")
    p.add_argument("--ablation-seeds", type=int, default=1,
                   help="how many of --seeds the ablation runs use")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=120,
                   help="the dense baseline's iterations (its layer tokens are every run's "
                        "budget)")
    p.add_argument("--warmup-iters", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--split", default="95,5,0")
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--ltd-start", type=int, default=32)
    p.add_argument("--ltd-step", type=int, default=8)
    p.add_argument("--ramp-fraction", type=float, default=0.7)
    p.add_argument("--sweep-kept", type=int, default=32,
                   help="the kept length of the single-layer sweep (Fig. 5)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel (processes; one torch thread each)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and run lengths (seconds per run; tests)")
    p.add_argument("--replot", action="store_true",
                   help="only redo the tables, claims, CSV and figure from the JSON")
    opts = p.parse_args(argv)
    if opts.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])
                 if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(opts, key, value)
    opts.seeds = [int(x) for x in opts.seeds.split(",") if x.strip()]
    opts.parts = [x.strip() for x in opts.parts.split(",") if x.strip()]
    opts.families = [x.strip() for x in opts.families.split(",") if x.strip()]
    opts.arms = [x.strip() for x in opts.arms.split(",") if x.strip()]
    for name, values, allowed in (("--parts", opts.parts, PARTS), ("--arms", opts.arms, ARMS),
                                  ("--families", opts.families, tuple(FAMILY_MODULE))):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: {bad} not in {', '.join(allowed)}")
    if not opts.seeds or opts.ablation_seeds < 1:
        p.error("--seeds needs at least one seed and --ablation-seeds at least 1")
    return opts


def main(argv=None):
    opts = parse(argv)
    if opts.replot:
        with open(os.path.join(opts.output_dir, "bert_ltd_study.json")) as f:
            return finish(json.load(f), opts.output_dir)
    command = "python benchmarks/study_bert_ltd.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    os.makedirs(opts.output_dir, exist_ok=True)
    families = list(opts.families)
    if "arms" in opts.parts and "bert" not in families:
        families.insert(0, "bert")
    data = {}
    for fam in families:
        if fam == "bert":
            if opts.bert_data_path:
                data[fam] = {"path": opts.bert_data_path, "vocab": opts.bert_vocab_file}
            else:
                path, vocab = ensure_bert_data(opts.bert_data_dir)
                data[fam] = {"path": path, "vocab": vocab}
        else:
            if opts.gpt_data_path:
                data[fam] = {"path": opts.gpt_data_path, "vocab": opts.gpt_vocab_file,
                             "merges": opts.gpt_merge_file}
            else:
                from benchmarks.study_random_ltd import ensure_demo_data

                path, vocab, merges = ensure_demo_data(opts.gpt_data_dir)
                data[fam] = {"path": path, "vocab": vocab, "merges": merges}
    runs, info = plan(opts, families)
    runs = [r for r in runs if not (r["family"] == "bert" and r["config"] in ARMS
                                    and r["config"] not in ("baseline", "random_ltd")
                                    and r["config"] not in opts.arms)]
    print(f"planned {len(runs)} runs: {json.dumps(info)}", flush=True)
    tasks = [dict(r, argv=family_argv(opts, r["family"], data[r["family"]]) + r["flags"],
                  eval_batches=opts.eval_batches, eval_seed=opts.seeds[0], threads=1)
             for r in runs]
    configs = {}
    for r in runs:
        configs.setdefault(r["family"], [])
        if r["config"] not in configs[r["family"]]:
            configs[r["family"]].append(r["config"])
    t0 = time.time()
    records = execute(tasks, opts.jobs)
    settings = {k: v for k, v in vars(opts).items()}
    study = {
        "title": (f"BERT/GPT token-dropping study: {opts.num_layers} layers, hidden "
                  f"{opts.hidden_size}, seq {opts.seq_length}, global batch "
                  f"{opts.global_batch_size}, equal layer tokens = {opts.train_iters} dense "
                  f"iterations, seeds {opts.seeds}; MSLG {opts.ltd_start}+{opts.ltd_step} to "
                  f"{opts.seq_length} at {opts.ramp_fraction:.0%} of each run"),
        "command": command, "settings": settings, "plan": info, "families": families,
        "configs": configs, "data": data,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "load_avg_after": os.getloadavg()},
        "records": records, "elapsed_s": time.time() - t0}
    return finish(study, opts.output_dir)


if __name__ == "__main__":
    main()
