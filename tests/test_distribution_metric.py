"""Distribution metric with measured noise (training/evaluation/distribution.py), on synthetic
Gaussian features (small D keeps it fast)."""
import numpy as np
import pytest
import torch

from training.evaluation.distribution import (
    NOT_SEPARABLE, ReferenceStats, above_band, average_speedup, bootstrap_indices, fd, fd_with_ci,
    label_share, noise_band, separated, speedup_with_ci, strip_private)

D = 8
N = 400
REPS = 200
DIRECTION = np.ones(D) / np.sqrt(D)  # unit vector: a shift s adds s**2 to the FD


@pytest.fixture(scope="module")
def ref():
    return ReferenceStats.from_features(np.random.default_rng(100).standard_normal((20000, D)))


@pytest.fixture(scope="module")
def noise():
    """The shared noise seeds: sample k of every run starts from row k."""
    return np.random.default_rng(1).standard_normal((N, D))


@pytest.fixture(scope="module")
def idx():
    return bootstrap_indices(N, REPS, seed=7)


@pytest.fixture(scope="module")
def band(ref, noise, idx):
    # set_a is the converged run on the shared noise; set_b is a disjoint converged set
    return noise_band(noise, np.random.default_rng(2).standard_normal((N, D)), ref, idx)


def run(noise, shift, ref, idx, lsd):
    return {"lsd": lsd, **fd_with_ci(noise + shift * DIRECTION, ref, idx)}


def test_fd_is_zero_against_own_stats_and_grows_with_a_mean_shift():
    x = np.random.default_rng(0).standard_normal((500, D))
    own = ReferenceStats.from_features(torch.from_numpy(x))  # torch input is accepted
    assert own.n == 500
    assert fd(x, own.mu, own.cov) == pytest.approx(0.0, abs=1e-8)
    values = [fd(x + s * DIRECTION, own.mu, own.cov) for s in (0.5, 1.0, 2.0)]
    assert values == pytest.approx([0.25, 1.0, 4.0], rel=1e-6)


def test_bootstrap_indices_are_seeded_and_shaped():
    a, b = bootstrap_indices(50, 30, seed=3), bootstrap_indices(50, 30, seed=3)
    assert a.shape == (30, 50) and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, bootstrap_indices(50, 30, seed=4))
    assert any(len(np.unique(row)) < 50 for row in a)  # with replacement


def test_ci_contains_the_value_and_narrows_with_n(ref):
    widths = []
    for n in (200, 2000):
        x = np.random.default_rng(n).standard_normal((n, D)) + 0.7 * DIRECTION
        p = fd_with_ci(x, ref, bootstrap_indices(n, REPS, seed=0))
        assert p["lo"] <= p["value"] <= p["hi"] and p["_boot"].shape == (REPS,)
        assert p["value"] == pytest.approx(0.49, abs=0.25)
        widths.append(p["hi"] - p["lo"])
    assert widths[1] < 0.5 * widths[0]


def test_ci_is_centred_on_the_value_near_the_floor():
    # resampling biases every replicate's FD up; the raw percentiles can miss the value entirely
    rng = np.random.default_rng(5)
    d, n = 32, 300
    r = ReferenceStats.from_features(rng.standard_normal((20000, d)))
    p = fd_with_ci(rng.standard_normal((n, d)), r, bootstrap_indices(n, 100, seed=0))
    assert np.quantile(p["_boot"], 0.05) > p["value"]
    assert p["lo"] <= p["value"] <= p["hi"]


def test_noise_band_has_a_floor_and_flags_only_shifted_points(ref, band, idx):
    assert band["floor"] > 0 and band["spread"] > 0 and band["fd_between"] > 0
    assert band["band"][0] < band["floor"] < band["band"][1]
    assert len(band["value"]) == 2
    shifted = fd_with_ci(np.random.default_rng(3).standard_normal((N, D)) + 0.6 * DIRECTION, ref, idx)
    same = fd_with_ci(np.random.default_rng(4).standard_normal((N, D)), ref, idx)
    assert above_band(shifted, band)
    assert not above_band(same, band)
    assert not above_band(same, band["band"])  # a plain [lo, hi] band works too


def test_separated_uses_the_paired_bootstrap(ref, noise, idx):
    a = run(noise, 0.5, ref, idx, 1)
    b = run(noise, 0.6, ref, idx, 1)  # a small real shift on the same noise
    assert separated(b, a) and separated(a, b)
    # the intervals of a and b overlap: unpaired, the shift would not be visible
    assert b["lo"] < a["hi"]
    null = run(np.random.default_rng(9).standard_normal((N, D)), 0.5, ref, idx, 1)
    assert not separated(a, null)
    with pytest.raises(ValueError):
        separated(a, fd_with_ci(noise, ref, bootstrap_indices(N, 10, seed=0)))


@pytest.fixture(scope="module")
def plain(ref, noise, idx):
    # values from far above the band down into it
    return [run(noise, s, ref, idx, lsd) for lsd, s in ((4, 2.0), (8, 1.2), (16, 0.6), (32, 0.0))]


@pytest.fixture(scope="module")
def rows(ref, noise, idx, plain, band):
    points = [run(noise, 0.9, ref, idx, 6), run(noise, 0.8, ref, idx, 5),
              run(noise, 0.0, ref, idx, 3), run(noise, 3.0, ref, idx, 2)]
    return [speedup_with_ci(plain, p, band) for p in points]


def test_speedup_inside_the_plain_range_is_separable(plain, rows, band):
    assert not above_band(plain[-1], band) and above_band(plain[0], band)
    row = rows[0]
    assert row["status"] == "separable"
    assert 8 / 6 < row["speedup"] < 16 / 6
    assert row["lo"] <= row["speedup"] <= row["hi"] and row["lo"] < row["hi"]
    assert row["_boot"].shape == (REPS,)


def test_speedup_inside_the_band_is_not_separable(rows):
    assert rows[2]["status"] == NOT_SEPARABLE
    assert rows[2]["speedup"] is None and rows[2]["lo"] is None and rows[2]["hi"] is None


def test_speedup_worse_than_all_plain_is_an_upper_bound(rows):
    assert rows[3]["status"] == "upper bound"
    assert rows[3]["speedup"] == pytest.approx(4 / 2) and rows[3]["hi"] == pytest.approx(2.0)


def test_speedup_better_than_all_plain_beyond_noise_is_a_lower_bound(ref, noise, idx, band):
    plain = [run(noise, s, ref, idx, lsd) for lsd, s in ((4, 2.0), (8, 1.6), (16, 1.3))]
    row = speedup_with_ci(plain, run(noise, 0.7, ref, idx, 4), band)
    assert row["status"] == "lower bound" and row["speedup"] == pytest.approx(16 / 4)
    # better than the best plain point but within its noise (fresh noise: on the shared noise
    # even a tiny shift separates): still interpolated, capped at plain's largest LSD
    other = run(np.random.default_rng(11).standard_normal((N, D)), 1.2, ref, idx, 4)
    assert other["value"] < plain[-1]["value"] and not separated(other, plain[-1])
    row = speedup_with_ci(plain, other, band)
    assert row["status"] == "separable" and row["speedup"] == pytest.approx(16 / 4)


def test_average_speedup_uses_only_separable_rows(rows):
    avg = average_speedup(rows)
    assert avg["status"] == "separable" and avg["n_separable"] == 2
    assert avg["counts"] == {"separable": 2, NOT_SEPARABLE: 1, "upper bound": 1}
    assert avg["speedup"] == pytest.approx((rows[0]["speedup"] + rows[1]["speedup"]) / 2)
    assert avg["lo"] <= avg["speedup"] <= avg["hi"]
    assert "_boot" not in strip_private(avg) and "speedup" in strip_private(avg)
    none = average_speedup([rows[2], rows[3]])
    assert none["speedup"] is None and none["status"] == NOT_SEPARABLE


def test_label_share_with_a_wilson_interval():
    labels = np.arange(100) % 10
    pred = labels.copy()
    pred[:30] = (pred[:30] + 1) % 10  # 70 of 100 right
    share = label_share(pred, labels)
    assert share["value"] == pytest.approx(0.7) and share["n"] == 100
    assert 0.61 < share["lo"] < 0.7 < share["hi"] < 0.78
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 10).float()
    assert label_share(logits, torch.from_numpy(labels))["value"] == pytest.approx(0.7)
    all_right = label_share(np.full(20, 3), 3)
    assert all_right["value"] == 1.0 and all_right["hi"] == 1.0 and all_right["lo"] < 1.0
