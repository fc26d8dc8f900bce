"""DeepSpeed-Chat's data_split: disjoint, covering, deterministic phase shares."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from rlhf_tasks.data import blend, parse_data_split, phase_indices


@pytest.mark.parametrize("n", [0, 1, 7, 10, 1001])
@pytest.mark.parametrize("data_split", ["2,4,4", "10,0,0", "1, 1, 1", [0, 3, 1], "0.2,0.3,0.5"])
def test_phases_are_disjoint_and_cover_everything(n, data_split):
    shares = [phase_indices(n, data_split, p, seed=7) for p in (1, 2, 3)]
    together = np.concatenate(shares)
    assert sorted(together.tolist()) == list(range(n))


def test_share_sizes_follow_the_weights():
    assert [len(phase_indices(10, "2,4,4", p, 0)) for p in (1, 2, 3)] == [2, 4, 4]
    assert [len(phase_indices(1000, "2,4,4", p, 0)) for p in (1, 2, 3)] == [200, 400, 400]
    assert [len(phase_indices(5, "10,0,0", p, 0)) for p in (1, 2, 3)] == [5, 0, 0]
    np.testing.assert_allclose(parse_data_split("2,4,4"), [0.2, 0.4, 0.4])


def test_deterministic_per_seed():
    a = phase_indices(100, "2,4,4", 2, seed=1)
    assert np.array_equal(a, phase_indices(100, "2,4,4", 2, seed=1))
    assert not np.array_equal(a, phase_indices(100, "2,4,4", 2, seed=2))
    # The shares are a shuffled permutation, not the first rows in file order.
    assert not np.array_equal(phase_indices(100, "2,4,4", 1, seed=1), np.arange(20))


@pytest.mark.parametrize("bad", ["", "2,4", "2,4,4,1", "-1,5,5", "0,0,0", "a,b,c", "2;4;4", "nan,1,1"])
def test_bad_data_split_is_refused_naming_the_value(bad):
    with pytest.raises(ValueError) as e:
        phase_indices(10, bad, 1, 0)
    assert repr(bad) in str(e.value)


def test_bad_phase_is_refused():
    with pytest.raises(ValueError, match="phase=4"):
        phase_indices(10, "2,4,4", 4, 0)


def test_blend_keeps_sources_and_takes_each_share():
    a = datasets.Dataset.from_dict({"prompt": [f"a{i}" for i in range(10)]})
    b = datasets.Dataset.from_dict({"prompt": [f"b{i}" for i in range(20)]})
    out = blend([("A", a), ("B", b)], "2,4,4", phase=2, seed=0)
    assert len(out) == 4 + 8
    assert out["source"] == ["A"] * 4 + ["B"] * 8
    expected = [f"a{i}" for i in phase_indices(10, "2,4,4", 2, 0)] + [f"b{i}" for i in phase_indices(20, "2,4,4", 2, 0)]
    assert out["prompt"] == expected


def test_blend_with_an_empty_share():
    a = datasets.Dataset.from_dict({"prompt": ["x", "y"]})
    out = blend([("A", a), ("B", a)], "10,0,0", phase=3, seed=0)
    assert len(out) == 0 and out.column_names == ["prompt", "source"]
