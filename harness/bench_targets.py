"""The performance targets `vwn bench` checks, and the confidence interval its overhead verdicts rest on.

Targets (issue 6; this machine, tiny reference config, fp32, 2 threads, but checked for every config benched):

    r = 1 MFU            at least 50 % of the measured matmul rate
    width overhead       at most 1.3 × the FLOP-predicted overhead + 3 points, at every width
    MoE layer            at most 1.3 × the time of a dense SwiGLU of equal active FLOPs

A width's overhead is the median of its paired step-time ratios (`bench.time_paired`). Its verdict compares the
median's 95 % confidence interval with the allowed overhead: `met` if the whole interval is within it, `missed`
if the whole interval is above it, `undecided` if the interval straddles it (more pairs, `--rounds`, narrow it).
The interval covers the pairs' sampling only: a slower or faster sitting of the machine moves every ratio.
"""

from __future__ import annotations

from scipy import stats

R1_MFU = 0.50
OVERHEAD_FACTOR = 1.3
OVERHEAD_NOISE = 0.03
MOE_RATIO = 1.3
CONFIDENCE = 0.95


def median_interval(samples: list[float], confidence: float = CONFIDENCE) -> list[float]:
    """A distribution-free confidence interval for the median of `samples`: the order statistics x(k) and
    x(n + 1 - k) (1-based, sorted) with the largest k whose coverage, 1 - 2 · P(Binomial(n, 1/2) < k), reaches
    `confidence`; the full range [min, max] when even that falls short (fewer than 6 samples at 95 %)."""
    ordered = sorted(samples)
    n = len(ordered)
    k = 1
    while k < (n + 1) // 2 and 1 - 2 * stats.binom.cdf(k, n, 0.5) >= confidence:
        k += 1  # x(k + 1) .. x(n - k) still covers the median with the confidence asked
    return [ordered[k - 1], ordered[n - k]]


def allowed_overhead(predicted: float) -> float:
    """The largest measured overhead the target accepts for a FLOP-predicted one (fractions: 0.20 = +20 %)."""
    return OVERHEAD_FACTOR * predicted + OVERHEAD_NOISE


def verdict(interval: list[float], allowed: float) -> str:
    low, high = interval
    return "met" if high <= allowed else "missed" if low > allowed else "undecided"


def check_targets(result: dict) -> dict:
    """Per config benched: the r = 1 MFU, each width's overhead and the MoE check against their targets."""
    checks = {}
    for config in dict.fromkeys(run["config"] for run in result["runs"]):
        runs = [run for run in result["runs"] if run["config"] == config]
        base = next(run for run in runs if run["m"] == run["n"] == 1)
        widths = []
        for run in runs:
            if run is base:
                continue
            allowed = allowed_overhead(run["overhead_predicted"])
            widths.append({"m": run["m"], "n": run["n"], "measured": run["overhead_measured"],
                           "interval": run["overhead_measured_interval"], "allowed": allowed,
                           "verdict": verdict(run["overhead_measured_interval"], allowed)})
        check = {"r1_mfu": {"value": base["mfu"], "target": R1_MFU, "met": base["mfu"] >= R1_MFU}, "widths": widths}
        moe = result["moe_vs_dense"].get(config)
        if moe is not None:
            check["moe"] = {"ratio": moe["ratio"], "interval": moe["ratio_interval"], "target": MOE_RATIO,
                            "verdict": verdict(moe["ratio_interval"], MOE_RATIO)}
        checks[config] = check
    return checks


def format_targets(checks: dict) -> str:
    """The checks as text lines, one per config and target."""
    lines = [f"\ntargets (overhead verdicts on the median's {CONFIDENCE:.0%} interval; allowed = "
             f"{OVERHEAD_FACTOR:g} × predicted + {OVERHEAD_NOISE:.0%}):"]
    for config, check in checks.items():
        mfu = check["r1_mfu"]
        lines.append(f"  {config}: r = 1 MFU {mfu['value']:.1%} (target ≥ {mfu['target']:.0%}): "
                     f"{'met' if mfu['met'] else 'missed'}")
        for w in check["widths"]:
            low, high = w["interval"]
            lines.append(f"  {config} ({w['m']}, {w['n']}): overhead {w['measured']:+.1%} ({low:+.1%} to {high:+.1%})"
                         f" vs allowed {w['allowed']:+.1%}: {w['verdict']}")
        if "moe" in check:
            moe = check["moe"]
            low, high = moe["interval"]
            lines.append(f"  {config}: MoE / dense x{moe['ratio']:.2f} (x{low:.2f} to x{high:.2f}) vs "
                         f"x{moe['target']:g}: {moe['verdict']}")
    return "\n".join(lines)
