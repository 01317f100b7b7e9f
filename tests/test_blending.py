"""BlendableDataset and the compiled blending helper (vs the Python fallback)."""

import os
import warnings

import numpy as np
import pytest

from megatron.data import helpers
from megatron.data.blendable_dataset import BlendableDataset


def quiet(*_):
    pass


class Listed:
    """A child dataset whose samples record where they came from."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"text": np.array([self.tag, i], dtype=np.int64)}


def test_reference_vector_c_and_python():
    expected_index = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    expected_sample = [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]
    assert helpers.compiled_library() is not None, "cc should be available here"
    for use_c in (True, False):
        index, sample = helpers.build_blending_indices([0.3, 0.7], 10, use_c=use_c)
        assert index.dtype == np.uint8 and sample.dtype == np.int64
        assert index.tolist() == expected_index and sample.tolist() == expected_sample


@pytest.mark.parametrize("trial", range(20))
def test_c_matches_python_on_random_weights(trial):
    rng = np.random.RandomState(trial)
    num = rng.randint(1, 9)
    weights = rng.rand(num) + 1e-3
    if trial % 4 == 0:
        weights[:] = 1.0  # all ties: the lowest index wins
    weights /= weights.sum()
    size = rng.randint(0, 3000)
    c_index, c_sample = helpers.build_blending_indices(weights, size)
    py_index, py_sample = helpers.build_blending_indices_py(weights, size)
    np.testing.assert_array_equal(c_index, py_index)
    np.testing.assert_array_equal(c_sample, py_sample)
    # each dataset's samples are used in order 0, 1, 2, ...
    for i in range(num):
        mine = c_sample[c_index == i]
        assert mine.tolist() == list(range(len(mine)))


def test_blendable_dataset_items_and_ratios():
    lines = []
    children = [Listed(0, 40), Listed(1, 80)]
    blend = BlendableDataset(children, [1, 2], 90, log=lines.append)
    assert len(blend) == 90
    assert " > sample ratios:" in lines
    assert any(line.startswith("   dataset 1, input: 0.666") for line in lines)
    item = blend[0]
    assert set(item) == {"dataset_idx", "text"}
    counts = [0, 0]
    for s in range(90):
        item = blend[s]
        assert item["text"].tolist() == [item["dataset_idx"], counts[item["dataset_idx"]]]
        counts[item["dataset_idx"]] += 1
    assert counts == [30, 60]


def test_child_too_short_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset 1 has 10 samples.*needs 70"):
        BlendableDataset([Listed(0, 100), Listed(1, 10)], [0.3, 0.7], 100, log=quiet)


def test_compiles_into_cache_dir_and_falls_back_without_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_LTD_CACHE", str(tmp_path / "cache"))
    helpers._reset_for_tests()
    try:
        assert helpers.compiled_library() is not None
        built = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".so")]
        assert len(built) == 1 and built[0].startswith("helpers_")

        monkeypatch.setenv("MEGATRON_LTD_CACHE", str(tmp_path / "empty"))
        monkeypatch.setenv("CC", "no-such-compiler-xyz")
        helpers._reset_for_tests()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            index, _ = helpers.build_blending_indices([0.3, 0.7], 10)
            helpers.build_blending_indices([0.3, 0.7], 10)
        assert index.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
        assert len([w for w in caught if "Python fallback" in str(w.message)]) == 1
    finally:
        helpers._reset_for_tests()
