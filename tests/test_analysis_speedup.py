"""Token-efficiency ratios and loss gaps on synthetic curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import token_speedup, token_speedup_details
from analysis.speedup import ema, smooth_curve


def law(tokens: np.ndarray, floor: float = 1.6) -> np.ndarray:
    """Baseline loss curve L(T) = floor + 30·T^(−0.3)."""
    return floor + 30.0 * np.asarray(tokens, dtype=float) ** -0.3


GEOMETRIC = 1e4 * 2 ** (np.arange(41) / 4)  # four points per doubling, 1e4 .. 1.024e7
LINEAR = np.arange(1, 101) * 20_000.0  # an evaluation every 20k tokens, 20k .. 2M


def test_k_times_fewer_tokens_gives_k_exactly() -> None:
    k = 2.0  # on a grid with four points per doubling, k·T is a grid point: no interpolation error
    ratio = token_speedup(GEOMETRIC, law(GEOMETRIC), GEOMETRIC, law(k * GEOMETRIC), smooth=0)
    reachable = k * GEOMETRIC <= GEOMETRIC[-1]
    assert reachable.sum() == 37
    np.testing.assert_allclose(ratio[reachable], k, rtol=1e-9)
    assert np.isnan(ratio[~reachable]).all()


@pytest.mark.parametrize("k", [1.3, 3.0])
def test_k_off_grid_on_a_linear_grid(k: float) -> None:
    ratio = token_speedup(LINEAR, law(LINEAR), LINEAR, law(k * LINEAR), smooth=0)
    defined = np.isfinite(ratio)
    assert defined.sum() >= 100 / k - 2
    # interpolation error only: below 2 % where the grid is coarsest in log tokens, then tiny
    np.testing.assert_allclose(ratio[defined], k, rtol=0.02)
    np.testing.assert_allclose(ratio[defined][5:], k, rtol=0.002)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_smoothing_does_not_bias_the_ratio(beta: float) -> None:
    """An EMA lags; attributing each smoothed loss to its EMA-weighted mean tokens removes the lag,
    so a heavily smoothed constant speedup is still k (a naive EMA gives ~1.2 instead of 1.5 here)."""
    k = 1.5
    details = token_speedup_details(LINEAR, law(LINEAR), LINEAR, law(k * LINEAR), smooth=beta)
    defined = np.isfinite(details.ratio)
    assert defined.sum() > 50
    np.testing.assert_allclose(details.ratio[defined][5:], k, rtol=0.02)
    assert np.all(details.x <= LINEAR) and np.all(np.diff(details.x) > 0)


def test_growing_advantage_gives_growing_ratio() -> None:
    advantage = 1 + 2 * LINEAR / LINEAR[-1]  # 1.02 at the start, 3 at the end
    details = token_speedup_details(LINEAR, law(LINEAR), LINEAR, law(advantage * LINEAR), smooth=0)
    defined = np.isfinite(details.ratio)
    assert defined.sum() > 30
    assert np.all(np.diff(details.ratio[defined]) > 0)
    np.testing.assert_allclose(details.ratio[defined], advantage[defined], rtol=0.01)


@pytest.mark.parametrize(("k", "sign"), [(1.25, 1), (0.8, -1)])
def test_noise_does_not_flip_the_sign(k: float, sign: int) -> None:
    rng = np.random.default_rng(7)
    noise = 0.01  # per point; the curves are ~0.03 apart at the end
    base = law(LINEAR) + noise * rng.standard_normal(LINEAR.size)
    cand = law(k * LINEAR) + noise * rng.standard_normal(LINEAR.size)
    details = token_speedup_details(LINEAR, base, LINEAR, cand, smooth=0.9)
    defined = np.isfinite(details.ratio)
    assert defined.sum() > 50
    assert np.all(np.sign(np.log(details.ratio[defined])) == sign)
    assert np.all(np.sign(details.gap[np.isfinite(details.gap)][10:]) == sign)
    assert abs(np.median(details.ratio[defined]) / k - 1) < 0.1


def test_running_minimum_and_interpolation_in_log_tokens() -> None:
    base_tokens, base_loss = [1.0, 2.0, 4.0, 8.0], [4.0, 3.0, 3.5, 2.0]  # a bump at T = 4
    ratio = token_speedup(base_tokens, base_loss, [1.0, 1.5], [3.0, 2.5], smooth=0)
    # loss 3 is first reached at T = 2; loss 2.5 between (4, 3) on the running minimum and (8, 2):
    # halfway in loss is halfway in log T, i.e. sqrt(4 · 8)
    np.testing.assert_allclose(ratio, [2.0, np.sqrt(32) / 1.5])


def test_out_of_range_is_nan_or_flagged_extrapolation() -> None:
    base = GEOMETRIC[:21]  # the baseline stops at 1.024e7 / 2^5
    k = 4.0
    plain = token_speedup_details(base, law(base), GEOMETRIC[:21], law(k * GEOMETRIC[:21]), smooth=0)
    assert not plain.extrapolated.any() and plain.power_law is None
    inside = k * base <= base[-1]
    np.testing.assert_allclose(plain.ratio[inside], k, rtol=1e-9)
    assert np.isnan(plain.ratio[~inside]).all()

    extra = token_speedup_details(base, law(base), base, law(k * base), smooth=0, extrapolate=True)
    np.testing.assert_array_equal(extra.extrapolated, ~inside)
    np.testing.assert_allclose(extra.ratio, k, rtol=1e-3)  # exact power law: the fit recovers it
    assert extra.power_law is not None and abs(extra.power_law.alpha - 0.3) < 1e-3


def test_losses_no_power_law_can_reach_stay_nan() -> None:
    base = GEOMETRIC[:21]
    # above the baseline's first loss: the baseline passed it before its first evaluation
    above = token_speedup(base, law(base), [1e4], [law(1e4) + 1.0], smooth=0, extrapolate=True)
    # below the fitted floor E = 1.6: the baseline never gets there
    below = token_speedup_details(base, law(base), [1e4], [1.5], smooth=0, extrapolate=True)
    assert np.isnan(above).all() and np.isnan(below.ratio).all() and not below.extrapolated.any()


def test_flops_give_compute_normalised_ratios() -> None:
    k, base_cost, cand_cost = 2.0, 1.0e6, 1.6e6
    by_tokens = token_speedup(GEOMETRIC, law(GEOMETRIC), GEOMETRIC, law(k * GEOMETRIC), smooth=0.5)
    by_flops = token_speedup(GEOMETRIC * base_cost, law(GEOMETRIC), GEOMETRIC * cand_cost, law(k * GEOMETRIC),
                             smooth=0.5)
    defined = np.isfinite(by_tokens)
    assert defined.sum() > 30
    np.testing.assert_allclose(by_flops[defined], by_tokens[defined] * base_cost / cand_cost, rtol=1e-9)


def test_loss_gap_of_parallel_curves() -> None:
    base = LINEAR[:50]
    details = token_speedup_details(base, law(base), LINEAR, law(LINEAR) - 0.05, smooth=0, extrapolate=True)
    np.testing.assert_allclose(details.gap[:50], 0.05, atol=1e-12)
    assert not details.gap_extrapolated[:50].any() and details.gap_extrapolated[50:].all()
    np.testing.assert_allclose(details.gap[50:], 0.05, atol=1e-3)  # from the recovered power law
    plain = token_speedup_details(base, law(base), LINEAR, law(LINEAR) - 0.05, smooth=0)
    assert np.isnan(plain.gap[50:]).all()


def test_missing_candidate_losses_stay_missing() -> None:
    cand = law(2 * LINEAR)
    cand[[3, 10]] = np.nan
    ratio = token_speedup(LINEAR, law(LINEAR), LINEAR, cand, smooth=0.5)
    assert np.isnan(ratio[[3, 10]]).all() and np.isfinite(ratio[[4, 11]]).all()


def test_bias_corrected_ema() -> None:
    np.testing.assert_allclose(ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])  # no pull towards 0
    np.testing.assert_allclose(ema([1.0, 3.0], 0.5), [1.0, (0.25 + 1.5) / 0.75])
    np.testing.assert_array_equal(ema([1.0, 2.0], 0.0), [1.0, 2.0])
    x, y = smooth_curve([1.0, 4.0], [1.0, 3.0], 0.5)
    # log x is smoothed with the same weights: (0.5·log 4) / 0.75 = (2/3)·log 4
    np.testing.assert_allclose(x, [1.0, 4 ** (2 / 3)])
    np.testing.assert_allclose(y, [1.0, (0.25 + 1.5) / 0.75])
    with pytest.raises(ValueError, match="smooth"):
        ema([1.0], 1.0)


def test_rejects_unsorted_tokens() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        token_speedup([1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [1.0], [2.0])
