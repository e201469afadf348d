"""The log-linear width law with bootstrap intervals, and the power-law fit."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import fit_log_linear, fit_power_law

WIDTHS = np.array([2.0, 4.0, 8.0, 16.0])
SLOPE, INTERCEPT = -0.0069, 1.6212  # the paper's next-token law


def noisy_grid(rng: np.random.Generator, seeds: int, noise: float = 0.002) -> tuple[np.ndarray, np.ndarray]:
    r = np.repeat(WIDTHS, seeds)
    return r, INTERCEPT + SLOPE * np.log2(r) + noise * rng.standard_normal(r.size)


def test_exact_points_give_the_exact_law() -> None:
    fit = fit_log_linear([2, 4, 8], INTERCEPT + SLOPE * np.log2([2, 4, 8]), n_boot=50)
    assert fit.slope == pytest.approx(SLOPE, abs=1e-12)
    assert fit.intercept == pytest.approx(INTERCEPT, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit.predict([1, 32]), [INTERCEPT, INTERCEPT + 5 * SLOPE])


def test_known_slope_recovered_with_covering_interval_over_seeds() -> None:
    r, loss = noisy_grid(np.random.default_rng(3), seeds=3)
    fit = fit_log_linear(r, loss, n_boot=500)
    assert fit.method == "seeds" and fit.n_widths == 4 and fit.n_points == 12
    assert fit.slope_ci[0] < SLOPE < fit.slope_ci[1]
    assert fit.intercept_ci[0] < INTERCEPT < fit.intercept_ci[1]
    assert fit.slope_ci[1] - fit.slope_ci[0] < 0.006  # informative: narrower than the slope itself
    assert fit.r2 > 0.9
    lo, hi = fit.band(WIDTHS)
    assert np.all(lo < fit.predict(WIDTHS)) and np.all(fit.predict(WIDTHS) < hi)


def test_seed_bootstrap_intervals_cover_the_true_slope_most_of_the_time() -> None:
    rng = np.random.default_rng(11)
    covered = [fit_log_linear(*noisy_grid(rng, seeds=3), n_boot=200).slope_ci for _ in range(100)]
    rate = np.mean([lo < SLOPE < hi for lo, hi in covered])
    # nominal 95 %; a percentile bootstrap over 3 seeds undercovers somewhat (~88 % here), not wildly
    # (without the small-sample adjustment it would be ~80 %)
    assert 0.8 <= rate <= 0.99


def test_single_seed_bootstraps_over_points() -> None:
    r, loss = noisy_grid(np.random.default_rng(5), seeds=1, noise=0.001)
    fit = fit_log_linear(r, loss, n_boot=300)
    assert fit.method == "points" and np.all(np.isfinite(fit.slope_ci))
    assert fit.slope_ci[0] <= SLOPE <= fit.slope_ci[1]


def test_two_single_points_have_no_interval() -> None:
    fit = fit_log_linear([2, 4], [1.0, 0.9], n_boot=100)
    assert fit.method == "none" and fit.slope == pytest.approx(-0.1)
    assert np.isnan(fit.slope_ci).all() and np.isnan(fit.band([2, 4])[0]).all()


def test_bootstrap_is_deterministic_and_seeded() -> None:
    r, loss = noisy_grid(np.random.default_rng(1), seeds=2)
    first, again = fit_log_linear(r, loss, n_boot=100), fit_log_linear(r, loss, n_boot=100)
    other = fit_log_linear(r, loss, n_boot=100, seed=1)
    assert first.slope_ci == again.slope_ci and first.intercept_ci == again.intercept_ci
    assert other.slope_ci != first.slope_ci and other.slope == first.slope


def test_base_changes_the_slope_units_only() -> None:
    r, loss = noisy_grid(np.random.default_rng(2), seeds=2)
    fit2, fit10 = fit_log_linear(r, loss, n_boot=20), fit_log_linear(r, loss, base=10, n_boot=20)
    assert fit10.slope == pytest.approx(fit2.slope * np.log2(10))
    np.testing.assert_allclose(fit10.predict(WIDTHS), fit2.predict(WIDTHS))


def test_needs_two_widths() -> None:
    with pytest.raises(ValueError, match="two distinct widths"):
        fit_log_linear([2, 2, 2], [1.0, 1.1, 0.9])


def test_power_law_recovered_from_the_tail_of_a_curve() -> None:
    tokens = np.geomspace(1e4, 1e7, 30)
    law = fit_power_law(tokens, 1.6 + 30.0 * tokens**-0.3)
    assert law is not None
    assert (law.E, law.A, law.alpha) == pytest.approx((1.6, 30.0, 0.3), rel=1e-3)
    np.testing.assert_allclose(law.tokens(law.loss(tokens)), tokens, rtol=1e-9)
    assert np.isnan(law.tokens(1.5))
    assert fit_power_law(tokens[:2], [2.0, 1.9]) is None
