"""NVIDIA's megatron-core in the same environment: both packages import, and megatron-core's own
IndexedDataset reads the sentence-level (BERT) and document-level (GPT) files our tools write.

megatron-core is a test extra (``pip install -e ".[test]"``); these tests are skipped where it is
not installed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERT_VOCAB = os.path.join(ROOT, "tests", "assets", "tokenizers", "bert-vocab.txt")


def _has_megatron_core():
    try:
        import megatron.core.datasets.indexed_dataset  # noqa: F401
    except ImportError:
        return False
    return True


needs_core = pytest.mark.skipif(not _has_megatron_core(),
                                reason="megatron-core is not installed")


@pytest.mark.slow
@needs_core
def test_both_packages_import_from_the_repository_root():
    """Scripts run from the repository root, where our regular ``megatron`` package is found
    first: megatron-core's ``megatron.core`` must stay importable next to it."""
    code = ("import megatron.model, megatron.data.indexed_dataset\n"
            "import megatron.core.datasets.indexed_dataset\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


_BOTH = ("from megatron import training\n"
         "import megatron.model, megatron.data.indexed_dataset\n"
         "import megatron.core.datasets.indexed_dataset as core\n"
         "print(training.__file__.startswith(%r), 'site-packages' in core.__file__)\n")


@pytest.mark.slow
@needs_core
@pytest.mark.parametrize("how", ["installed", "pythonpath", "script-by-path"])
def test_both_packages_import_from_anywhere(tmp_path, how):
    """Outside the repository root megatron-core's namespace ``megatron`` is found first on
    sys.path; ours must still resolve (through the installed package, PYTHONPATH, or a script
    run by its path from another directory), and megatron-core next to it."""
    code = _BOTH % os.path.join(ROOT, "megatron")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-W", "ignore", "-c", code]
    if how == "pythonpath":
        env["PYTHONPATH"] = ROOT
    elif how == "script-by-path":  # as `python /repo/tools/x.py` from a job's directory
        script = tmp_path / "repo_script.py"
        script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + code)
        cmd = [sys.executable, "-W", "ignore", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stderr


@pytest.mark.slow
def test_extend_path_adds_another_megatron_portion(tmp_path):
    """Without megatron-core installed: a ``megatron/core`` portion elsewhere on sys.path is
    reachable through our package (what extend_path gives)."""
    portion = tmp_path / "megatron" / "core"
    portion.mkdir(parents=True)
    (portion / "__init__.py").write_text("MARKER = 'other portion'\n")
    code = ("import sys; sys.path.append(%r)\n"
            "import megatron.model\n"
            "import megatron.core\n"
            "print(getattr(megatron.core, 'MARKER', 'installed megatron-core'))\n"
            ) % str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    expected = "installed megatron-core" if _has_megatron_core() else "other portion"
    assert proc.stdout.strip() == expected, proc.stderr


def _preprocess(tmp_path, docs, *extra):
    from tools import preprocess_data

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = str(tmp_path / "out")
    preprocess_data.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-type",
                          "BertWordPieceLowerCase", "--vocab-file", BERT_VOCAB,
                          "--workers", "1", *extra])
    return prefix


@needs_core
@pytest.mark.parametrize("level,extra", [("sentence", ("--split-sentences",
                                                       "--sentence-splitter", "simple")),
                                         ("document", ())])
def test_megatron_core_reads_what_preprocess_writes(tmp_path, level, extra):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as CoreIndexedDataset

    from megatron.data.indexed_dataset import IndexedDataset

    docs = ["The cat sat. The dog ran away quickly.", "", "One sentence only here.",
            "First part. Second part. Third part!"]
    prefix = _preprocess(tmp_path, docs, *extra) + f"_text_{level}"
    ours, core = IndexedDataset(prefix), CoreIndexedDataset(prefix)
    assert len(core) == len(ours) > 0
    np.testing.assert_array_equal(core.sequence_lengths, ours.sizes)
    np.testing.assert_array_equal(core.document_indices, ours.doc_idx)
    for i in range(len(ours)):
        np.testing.assert_array_equal(core[i], ours[i])
    if level == "sentence":
        assert len(core.document_indices) - 1 == len(docs)  # the empty one marks a document
        assert len(core) > len(docs) - 1  # several sentences per document
