"""Single-layer sensitivity sweep of token dropping on GPT finetuning (the random-LTD paper's
Fig. 5): for every layer l a finetuning run drops tokens in layer l ONLY, at a constant kept
length (--kept), with the same data, seed and number of iterations; plus the dense baseline.
The final validation loss per dropped layer against the baseline is the paper's U-shaped curve:
dropping in the first or the last layer hurts most, the middle layers little.

    python tasks/causal_lm/layer_sweep.py --train-text ptb/ptb.train.txt \\
        --valid-text ptb/ptb.valid.txt --format ptb \\
        --pretrained-checkpoint checkpoints/gpt2 --data-dir data/ptb \\
        --output-dir results/ptb-sweep --kept 128 --jobs 2 [-- extra pretrain_gpt.py flags]

Every run is ``tasks/causal_lm/finetune.py`` in its own process (``--jobs`` at a time, each
with ``cpus / jobs`` threads), saving under ``<output-dir>/runs/<name>`` with its log beside
it; the edge layers use --random-ltd-allow-edge-layers. The text is tokenized once, before the
runs. Rerunning the same command skips the finished runs and resumes unfinished ones from their
checkpoints; a run directory made with other settings is an error.

Writes ``<output-dir>/layer_sweep.csv`` (one row per run), ``layer_sweep.json`` (settings,
rows, which layers are most sensitive) and ``layer_sweep.png`` (matplotlib; skipped with a note
when it is not installed). --quick (tests, smoke checks): 4 iterations, no in-loop evaluation.
"""

import argparse
import concurrent.futures
import csv
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron.errors import UserError, run_main  # noqa: E402
from tasks.causal_lm import data as text_data  # noqa: E402
from tasks.causal_lm import finetune  # noqa: E402

FINETUNE = os.path.join(ROOT, "tasks", "causal_lm", "finetune.py")
COMMAND_FILE = "sweep_command.json"
QUICK_ITERS = 4


def build_parser():
    p = argparse.ArgumentParser(
        prog="tasks/causal_lm/layer_sweep.py", allow_abbrev=False,
        description="Fig. 5: constant token dropping in one layer at a time, GPT finetuning. "
                    "Flags after '--' go to pretrain_gpt.py.")
    p.add_argument("--train-text", required=True)
    p.add_argument("--valid-text", required=True)
    p.add_argument("--format", required=True, choices=text_data.FORMATS)
    p.add_argument("--pretrained-checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--kept", type=int, default=None,
                   help="constant kept length in the dropping layer (default: an eighth of "
                        "the sequence length, 128 for GPT-2)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="the layers to sweep (default: all)")
    p.add_argument("--epochs", type=float, default=None, help="finetune.py --epochs")
    p.add_argument("--train-iters", type=int, default=None, help="finetune.py --train-iters")
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--overlapping-eval", type=int, default=None)
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes for the one-time data preparation")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_ITERS} iterations per run, no in-loop evaluation (smoke test)")
    return p


def common_argv(opts):
    """finetune.py flags shared by every run (without --save and the dropping flags)."""
    argv = ["--train-text", opts.train_text, "--valid-text", opts.valid_text,
            "--format", opts.format, "--pretrained-checkpoint", opts.pretrained_checkpoint,
            "--data-dir", opts.data_dir, "--seed", str(opts.seed), "--workers", "1"]
    iters = opts.train_iters if opts.train_iters is not None else \
        (QUICK_ITERS if opts.quick and opts.epochs is None else None)
    for flag, value in (("--epochs", opts.epochs), ("--train-iters", iters),
                        ("--global-batch-size", opts.global_batch_size),
                        ("--micro-batch-size", opts.micro_batch_size), ("--lr", opts.lr),
                        ("--seq-length", opts.seq_length),
                        ("--overlapping-eval", opts.overlapping_eval),
                        ("--tokenizer-type", opts.tokenizer_type),
                        ("--vocab-file", opts.vocab_file), ("--merge-file", opts.merge_file)):
        if value is not None:
            argv += [flag, str(value)]
    if opts.quick:
        argv += ["--eval-iters", "0"]
    return argv


def sweep_runs(opts, num_layers, kept):
    """[(name, dropped layer or None, finetune.py flags of its dropping)]."""
    layers = list(range(num_layers)) if opts.layers is None else opts.layers
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise UserError(f"--layers: {bad} out of range [0, {num_layers - 1}] (the checkpoint "
                        f"has {num_layers} layers)")
    if len(set(layers)) != len(layers):
        raise UserError(f"--layers: repeated layer ids in {layers}")
    runs = [("baseline", None, [])]
    for layer in sorted(layers):
        flags = ["--random-ltd-start", str(kept), "--random-ltd-schedule", "constant",
                 "--random-ltd-layer-ids", str(layer)]
        if layer in (0, num_layers - 1):
            flags.append("--random-ltd-allow-edge-layers")
        runs.append((f"layer{layer:02d}", layer, flags))
    return runs


def run_one(name, command, run_dir, env):
    """One finetune.py run in a subprocess (log in ``<run_dir>.log``); its result dict."""
    log_path = run_dir + ".log"
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    result = text_data.read_json(os.path.join(run_dir, finetune.RESULT_FILE))
    if code != 0 or result is None or not result.get("finished"):
        tail = ""
        try:
            with open(log_path, "r", encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            tail = next((line for line in reversed(lines) if line.startswith("error:")),
                        lines[-1] if lines else "")
        except OSError:
            pass
        raise UserError(f"run {name} failed (exit {code}; log {log_path}): {tail}")
    result["wall_s"] = round(time.time() - start, 1)
    return result


def summarize(rows):
    """Delta of each layer's loss against the baseline; the most sensitive layers."""
    base = next((r for r in rows if r["run"] == "baseline"), None)
    layers = [r for r in rows if r["dropped_layer"] is not None]
    for r in rows:
        r["delta_vs_baseline"] = (r["valid_loss"] - base["valid_loss"]) if base else None
    if not layers:
        return {}
    ranked = sorted(layers, key=lambda r: r["valid_loss"], reverse=True)
    n = max(r["dropped_layer"] for r in layers) + 1
    edges = [r for r in layers if r["dropped_layer"] in (0, n - 1)]
    middle = [r for r in layers if r["dropped_layer"] not in (0, n - 1)]
    out = {"most_sensitive_layers": [r["dropped_layer"] for r in ranked[:2]],
           "least_sensitive_layer": ranked[-1]["dropped_layer"]}
    if edges and middle:
        edge_mean = sum(r["valid_loss"] for r in edges) / len(edges)
        mid_mean = sum(r["valid_loss"] for r in middle) / len(middle)
        out.update({"edge_mean_loss": edge_mean, "middle_mean_loss": mid_mean,
                    "edges_hurt_more": edge_mean > mid_mean})
    return out


CSV_FIELDS = ("run", "dropped_layer", "kept", "valid_loss", "valid_ppl", "delta_vs_baseline",
              "iterations", "layer_tokens", "layer_token_saving", "wall_s")


def write_outputs(out_dir, settings, rows, summary, log=print):
    csv_path = os.path.join(out_dir, "layer_sweep.csv")
    tmp = f"{csv_path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    plot, note = plot_curve(os.path.join(out_dir, "layer_sweep.png"), settings, rows)
    if note:
        log(f" > {note}")
    text_data.write_json(os.path.join(out_dir, "layer_sweep.json"),
                {"settings": settings, "rows": rows, "summary": summary, "plot": plot,
                 "plot_note": note})
    return csv_path


def plot_curve(path, settings, rows):
    """The U-shaped curve as a PNG: (path, None), or (None, why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed: layer_sweep.png not written"
    layers = [r for r in rows if r["dropped_layer"] is not None]
    base = next((r for r in rows if r["run"] == "baseline"), None)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["dropped_layer"] for r in layers], [r["valid_loss"] for r in layers], "o-",
            color="tab:blue", label=f"drop in this layer only (kept {settings['kept']})")
    if base is not None:
        ax.axhline(base["valid_loss"], color="black", lw=1, ls="--", label="no dropping")
    ax.set_xlabel("the dropping layer")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"single-layer sensitivity ({settings['format']}, "
                 f"{os.path.basename(settings['pretrained_checkpoint'].rstrip('/'))})",
                 fontsize=10)
    ax.set_xticks([r["dropped_layer"] for r in layers])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path, None


def main(argv=None, log=print):
    own, extra = finetune.split_argv(argv)
    opts = build_parser().parse_args(own)
    if opts.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {opts.jobs}")
    if text_data.global_rank() != 0 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("layer_sweep.py runs its finetunes as separate processes: start it "
                        "once (not under torchrun/srun); pass the launcher's flags per run")
    common = common_argv(opts)
    # finetune.py's own checks, once, before anything runs; then the data (cached for all runs)
    ft_parser = finetune.build_parser()
    ft_opts = ft_parser.parse_args(common + ["--save", os.path.join(opts.output_dir, "_")])
    finetune.check_extra(extra, ft_parser)
    source, saved, _ = finetune.resolve_model(ft_opts)
    spec = finetune.resolve_tokenizer(ft_opts, saved, source)
    finetune.check_vocab(spec, saved, source)
    num_layers = int(saved.num_layers)
    seq = opts.seq_length or getattr(saved, "seq_length", None) \
        or getattr(saved, "max_position_embeddings")
    kept = opts.kept if opts.kept is not None else max(1, int(seq) // 8)
    if not 0 < kept < int(seq):
        raise UserError(f"--kept {kept} must be in [1, the sequence length {seq}) (keeping "
                        f"all tokens drops nothing)")
    for path, flag in ((opts.train_text, "--train-text"), (opts.valid_text, "--valid-text")):
        text_data.prepare_text(path, opts.format, opts.data_dir, spec, workers=opts.workers,
                               flag=flag, log=log)
    runs = sweep_runs(opts, num_layers, kept)
    os.makedirs(os.path.join(opts.output_dir, "runs"), exist_ok=True)
    settings = {"train_text": opts.train_text, "valid_text": opts.valid_text,
                "format": opts.format, "pretrained_checkpoint": opts.pretrained_checkpoint,
                "kept": kept, "seq_length": int(seq), "num_layers": num_layers,
                "seed": opts.seed, "quick": opts.quick, "common_argv": common, "extra": extra}

    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // opts.jobs)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, str(threads))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    todo, results = [], {}
    for name, layer, flags in runs:
        run_dir = os.path.join(opts.output_dir, "runs", name)
        command = [sys.executable, FINETUNE, *common, *flags, "--save", run_dir]
        if extra:
            command += ["--", *extra]
        stamp = os.path.join(opts.output_dir, "runs", f"{name}.{COMMAND_FILE}")
        previous = text_data.read_json(stamp)
        if previous is not None and previous.get("command") != command[1:]:
            raise UserError(f"--output-dir {opts.output_dir}: run {name} was made with other "
                            f"settings ({stamp}); use another --output-dir or remove it")
        text_data.write_json(stamp, {"command": command[1:]})
        done = text_data.read_json(os.path.join(run_dir, finetune.RESULT_FILE))
        if done is not None and done.get("finished"):
            log(f" > {name}: finished before, skipped (valid loss {done['valid_loss']:.4f})")
            done.setdefault("wall_s", None)
            results[name] = done
        else:
            todo.append((name, command, run_dir))

    start = time.time()
    log(f" > layer sweep: {len(runs)} runs ({len(todo)} to do, {opts.jobs} at a time, "
        f"{threads} thread(s) each), kept {kept} of {seq} tokens in one of {num_layers} layers")
    with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
        futures = {pool.submit(run_one, name, command, run_dir, env): name
                   for name, command, run_dir in todo}
        errors = []
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            try:
                results[name] = future.result()
            except UserError as err:
                errors.append(str(err))
                log(f" > {name}: FAILED ({err})")
                continue
            r = results[name]
            log(f" > {name}: valid loss {r['valid_loss']:.4f} (ppl {r['valid_ppl']:.2f}), "
                f"{r['iterations']} iterations, {r['wall_s']:.0f} s  [{len(results)}/{len(runs)}"
                f" done, {time.time() - start:.0f} s]")
    if errors:
        raise UserError(f"{len(errors)} of {len(runs)} runs failed; first: {errors[0]} "
                        f"(rerun to retry; finished runs are kept)")

    rows = []
    for name, layer, _ in runs:
        r = results[name]
        rows.append({"run": name, "dropped_layer": layer, "kept": None if layer is None else kept,
                     "valid_loss": r["valid_loss"], "valid_ppl": r["valid_ppl"],
                     "iterations": r["iterations"], "layer_tokens": r["layer_tokens"],
                     "layer_token_saving": r["layer_token_saving"], "wall_s": r.get("wall_s")})
    summary = summarize(rows)
    csv_path = write_outputs(opts.output_dir, settings, rows, summary, log)
    log(f"{'run':10s} {'layer':>5s} {'valid loss':>10s} {'ppl':>10s} {'vs baseline':>12s}")
    for r in rows:
        delta = r["delta_vs_baseline"]
        log(f"{r['run']:10s} {'-' if r['dropped_layer'] is None else r['dropped_layer']:>5} "
            f"{r['valid_loss']:10.4f} {r['valid_ppl']:10.2f} "
            f"{'' if delta is None else f'{delta:+.4f}':>12s}")
    if "edges_hurt_more" in summary:
        log(f"edge layers (0, {num_layers - 1}) mean loss {summary['edge_mean_loss']:.4f} vs "
            f"middle {summary['middle_mean_loss']:.4f}: "
            f"{'U-shaped (edges hurt more)' if summary['edges_hurt_more'] else 'not U-shaped'}"
            f"; most sensitive layers {summary['most_sensitive_layers']}")
    log(f"wrote {csv_path}, layer_sweep.json"
        + (", layer_sweep.png" if os.path.exists(os.path.join(opts.output_dir,
                                                              "layer_sweep.png")) else ""))
    return {"settings": settings, "rows": rows, "summary": summary}


if __name__ == "__main__":
    run_main(main)
