"""The bench's target checks: the median's confidence interval and the verdicts built on it."""

from __future__ import annotations

import math
import random

import pytest

from harness.bench_targets import allowed_overhead, check_targets, format_targets, median_interval, verdict


def test_median_interval_takes_the_order_statistics_of_the_binomial_rule():
    # n = 9: x(2)..x(8) covers the median with 1 - 2 · 10/512 = 96.1 %; x(3)..x(7) only 82 %
    assert median_interval(list(range(9, 0, -1))) == [2, 8]
    # n = 25: x(8)..x(18) (95.7 %)
    assert median_interval([float(i) for i in range(1, 26)]) == [8.0, 18.0]
    # five samples cannot reach 95 % (the full range covers 1 - 2 / 32 = 93.75 %): the full range
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == [1.0, 5.0]
    assert median_interval([1.25]) == [1.25, 1.25]


def test_median_interval_covers_the_true_median_at_least_95_percent_of_the_time():
    rng = random.Random(0)
    for n in (9, 24):
        trials, covered = 4000, 0
        for _ in range(trials):
            # skewed like step-time ratios: a floor plus exponential slowdowns of mean 0.05, median 0.05 ln 2
            samples = [1.1 + rng.expovariate(20.0) for _ in range(n)]
            low, high = median_interval(samples)
            covered += low <= 1.1 + 0.05 * math.log(2) <= high
        assert covered / trials >= 0.94  # 95 % and over by construction, less the trials' sampling error


def test_verdicts_compare_the_whole_interval_with_the_allowed_overhead():
    assert allowed_overhead(0.20) == pytest.approx(0.29)  # the example: +20 % predicted allows +29 %
    assert verdict([0.05, 0.06], 0.064) == "met"
    assert verdict([0.07, 0.09], 0.064) == "missed"
    assert verdict([0.06, 0.07], 0.064) == "undecided"


def test_check_targets_judges_each_config_and_width():
    def run(config, m, n, mfu, measured, interval, predicted):
        return {"config": config, "m": m, "n": n, "mfu": mfu, "overhead_measured": measured,
                "overhead_measured_interval": interval, "overhead_predicted": predicted}

    result = {
        "runs": [run("tiny", 1, 1, 0.52, 0.0, [0.0, 0.0], 0.0),
                 run("tiny", 2, 3, 0.50, 0.055, [0.05, 0.06], 0.026),
                 run("tiny", 2, 4, 0.48, 0.10, [0.09, 0.11], 0.040),
                 run("small", 1, 1, 0.49, 0.0, [0.0, 0.0], 0.0),
                 run("small", 8, 64, 0.45, 0.70, [0.65, 0.85], 0.567)],
        "moe_vs_dense": {"tiny": {"ratio": 1.2, "ratio_interval": [1.15, 1.24]}},
    }
    checks = check_targets(result)

    assert checks["tiny"]["r1_mfu"] == {"value": 0.52, "target": 0.5, "met": True}
    assert checks["small"]["r1_mfu"]["met"] is False
    tiny = {(w["m"], w["n"]): w for w in checks["tiny"]["widths"]}
    assert tiny[2, 3]["allowed"] == pytest.approx(1.3 * 0.026 + 0.03) and tiny[2, 3]["verdict"] == "met"
    assert tiny[2, 4]["verdict"] == "missed"
    assert checks["small"]["widths"][0]["verdict"] == "undecided"  # 0.65 .. 0.85 around 1.3 · 0.567 + 0.03
    assert checks["tiny"]["moe"]["verdict"] == "met" and "moe" not in checks["small"]
    text = format_targets(checks)
    assert "tiny (2, 4): overhead +10.0% (+9.0% to +11.0%) vs allowed +8.2%: missed" in text
    assert "small: r = 1 MFU 49.0% (target ≥ 50%): missed" in text
