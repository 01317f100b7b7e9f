"""BERT benchmarks: the two scripts run in --quick mode (slow). The padding-mask attention
kernel they led to is tested in tests/test_attention.py."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(script, *extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick",
                           *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_bert_train_step_quick():
    out = run_quick("bench_bert_train_step.py")
    assert "padding" in out
    for dtype in ("fp32", "bf16"):
        assert f"{dtype}  HF/ours" in out and f"{dtype}  paired" in out


@pytest.mark.slow
def test_bench_bert_random_ltd_quick():
    out = run_quick("bench_bert_random_ltd.py")
    assert "ratio" in out and "ceiling" in out
    assert "r=16" in out and "dense" in out
