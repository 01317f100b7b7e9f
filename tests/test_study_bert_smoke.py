"""Smoke test of benchmarks/study_bert_ltd.py --quick on the demo corpus (built into a temporary
directory by the demos' own steps): every arm runs at the baseline's layer-token budget;
outputs, claims and --replot."""

import csv
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location(
        "study_bert_ltd", os.path.join(ROOT, "benchmarks", "study_bert_ltd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_study_bert_quick(tmp_path):
    pytest.importorskip("matplotlib")
    study_mod = load_study()
    out = tmp_path / "results"
    study = study_mod.main(["--quick", "--output-dir", str(out), "--seeds", "1234,1235",
                            "--bert-data-dir", str(tmp_path / "bert"),
                            "--gpt-data-dir", str(tmp_path / "gpt")])
    for name in ("bert_ltd_study.json", "bert_ltd_study.csv", "bert_ltd_study.png"):
        assert (out / name).stat().st_size > 0
    rows = {(r["family"], r["config"]): r for r in study["table"]}
    # every BERT arm trains, each at the baseline's layer-token budget (the hooks' count, which
    # train_run checks against the framework's; SCTD's full passes included)
    for arm in study_mod.ARMS:
        row = rows[("bert", arm)]
        assert row["status"] == "ok", row
    assert "not available in this build" not in study["markdown"]
    bert_budget = rows[("bert", "baseline")]["layer_tokens"]
    for arm in ("random_ltd_real", "tokenbypass", "sctd"):
        assert rows[("bert", arm)]["layer_tokens"] >= bert_budget
        assert rows[("bert", arm)]["iterations"] > 6
    for fam in ("bert", "gpt"):
        for cfg in ("baseline", "random_ltd", "all_layers", "all_but_first", "all_but_last",
                    "constant", "layer0", "layer1", "layer2", "layer3"):
            assert rows[(fam, cfg)]["status"] == "ok", (fam, cfg, rows[(fam, cfg)])
        base = rows[(fam, "baseline")]
        assert base["n"] == 2 and base["iterations"] == 6
        assert base["layer_tokens"] == 6 * 4 * 32 * 4  # iterations x batch x seq x layers
        # equal compute: every dropping run meets the budget with more iterations
        for cfg in ("random_ltd", "all_layers", "constant", "layer0"):
            assert rows[(fam, cfg)]["iterations"] > 6
            assert rows[(fam, cfg)]["layer_tokens"] >= base["layer_tokens"]
    verdicts = [c["verdict"] for c in study["claims"]]
    assert verdicts and all(v.split(" ")[0] in ("supported", "contradicted", "cannot")
                            or "not available" in v for v in verdicts)
    with open(out / "bert_ltd_study.csv") as f:
        lines = list(csv.DictReader(f))
    assert {l["family"] for l in lines} == {"bert", "gpt"}
    saved = json.loads((out / "bert_ltd_study.json").read_text())
    assert saved["command"].startswith("python benchmarks/study_bert_ltd.py")
    (out / "bert_ltd_study.png").unlink()
    again = study_mod.main(["--output-dir", str(out), "--replot"])
    assert again["claims"] == json.loads(json.dumps(study["claims"]))
    assert (out / "bert_ltd_study.png").stat().st_size > 0


def test_unavailable_method_is_detected():
    """A method this build refuses is detected from the flags alone (no training)."""
    study_mod = load_study()
    bogus = study_mod.availability("bert", ["--random-ltd-method", "no-such-method"])
    assert bogus
    assert study_mod.availability("gpt", ["--num-layers", "2", "--hidden-size", "8",
                                          "--num-attention-heads", "2", "--seq-length", "8",
                                          "--max-position-embeddings", "8",
                                          "--micro-batch-size", "1", "--train-iters", "1",
                                          "--lr", "1e-3", "--device", "cpu",
                                          "--mock-data"]) is None
