"""Smoke test of benchmarks/study_random_ltd.py's plumbing with tiny settings (a few seconds)."""

import csv
import importlib.util
import json
import os

import pytest

from training_helpers import MERGES, ROOT, VOCAB, make_corpus


def load_study():
    spec = importlib.util.spec_from_file_location(
        "study_random_ltd", os.path.join(ROOT, "benchmarks", "study_random_ltd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_runs_all_protocols_and_measures_layer_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    study_mod = load_study()
    data = make_corpus(tmp_path)
    out = tmp_path / "results"
    study = study_mod.main([
        "--output-dir", str(out), "--data-path", data, "--vocab-file", VOCAB,
        "--merge-file", MERGES, "--num-layers", "4", "--hidden-size", "16", "--num-heads", "2",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "6", "--warmup-iters", "1", "--eval-interval", "3",
        "--eval-batches", "1", "--ltd-start", "4", "--ltd-step", "4", "--split", "80,20,0"])
    for name in ("random_ltd_study.json", "random_ltd_study.csv", "random_ltd_study.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "random_ltd_study.json").read_text())
    assert saved["command"].startswith("python benchmarks/study_random_ltd.py")
    a = {r["name"]: r for r in study["runs"]["a"]}
    b = {r["name"]: r for r in study["runs"]["b"]}
    assert set(a) == {"baseline", "mslg_ltlr", "mslg_iterlr", "constant", "baseline_seed2"}
    assert set(b) == {"mslg_ltlr", "mslg_iterlr", "constant"}
    dense = 6 * 4 * 16 * 4  # iterations x batch x seq x layers
    assert a["baseline"]["layer_tokens"] == dense
    # (a): same iterations, fewer layer tokens for every dropping run; MSLG runs drop alike.
    for name in ("mslg_ltlr", "mslg_iterlr", "constant"):
        assert a[name]["iterations"] == 6
        assert a[name]["layer_tokens"] < dense
    assert a["mslg_ltlr"]["layer_tokens"] == a["mslg_iterlr"]["layer_tokens"]
    # the constant kept length was chosen for the MSLG run's saving (up to rounding of r)
    rows = {r["run"]: r for r in study["tables"]["a"]}
    per_token = 2 / (4 * 16)  # saving of one kept token less in the 2 middle layers
    assert abs(rows["constant"]["layer_token_saving"]
               - rows["mslg_ltlr"]["layer_token_saving"]) <= per_token / 2 + 1e-9
    # (b): the baseline's budget is met with more iterations, never overshot by a whole step
    for name, rec in b.items():
        assert rec["iterations"] > 6
        assert dense <= rec["layer_tokens"] < dense + 4 * 16 * 4
    # the iteration LR and the LayerToken LR differ when tokens are dropped
    lr = lambda rec: [e["lr"] for e in rec["evals"]]  # noqa: E731
    assert lr(a["mslg_ltlr"])[0] != lr(a["mslg_iterlr"])[0]
    # an evaluation after the last iteration; every evaluation reads the same samples
    assert a["baseline"]["evals"][-1]["iteration"] == 6
    fixed = study_mod.FixedSamples(list(range(10)), 3, 12)
    assert len(fixed) == 12 and [fixed[i] for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with open(out / "random_ltd_study.csv") as f:
        lines = list(csv.DictReader(f))
    assert {l["protocol"] for l in lines} == {"a", "b"}
    assert len(lines) == sum(len(r["evals"]) for p in study["runs"].values() for r in p)
    # --replot redoes the tables and figure from the JSON alone
    (out / "random_ltd_study.png").unlink()
    again = study_mod.main(["--output-dir", str(out), "--replot"])
    assert again["tables"] == json.loads(json.dumps(study["tables"]))
    assert (out / "random_ltd_study.png").stat().st_size > 0
