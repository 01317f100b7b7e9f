import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory):
    """Prefix of a small preprocessed GPT corpus (see training_helpers.make_corpus)."""
    from training_helpers import make_corpus

    return make_corpus(tmp_path_factory.mktemp("data"))
