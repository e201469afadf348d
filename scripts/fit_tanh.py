"""Fit the rational tanh of the fused CPU kernels (`harness/model/csrc/vector_math.h`, `tanh_approx`).

tanh(x) ≈ x · P(x²) / Q(x²) on [0, 9] (odd, so on [-9, 9]; tanh rounds to 1 in fp32 beyond 9), P and Q of
degree 4 with P(0) = Q(0) = 1, minimising the largest relative error: linearised least squares
x P(t) − tanh(x) Q(t) ≈ 0, reweighted by 1 / Q (Sanathanan–Koerner) and then by the error itself (Lawson)
towards the minimax fit. The kernel clamps x to ± the smallest fp32 value where its evaluation reaches 1, so
that |tanh| ≤ 1 (beyond it the rational function would pass 1). Prints the coefficients and that clamp as C++
literals and the errors, in float64 and evaluated in fp32 the way the kernel does (Horner with fused
multiply-adds, then x · P / Q).

    python scripts/fit_tanh.py
"""

from __future__ import annotations

import numpy as np

DEGREE = 4
LIMIT = 9.0


def fit(degree: int = DEGREE, limit: float = LIMIT, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (p, q), lowest power first, p[0] = q[0] = 1."""
    x = np.concatenate([np.linspace(1e-4, limit, 100_000), np.geomspace(1e-6, 1e-4, 200)])
    t, y = x * x, np.tanh(x)
    powers = t[:, None] ** np.arange(degree + 1)
    q_values, lawson = np.ones_like(x), np.ones_like(x)
    for iteration in range(iterations):
        # unknowns p_1.. p_deg, q_1.. q_deg; p_0 = q_0 = 1 moved to the right-hand side
        system = np.concatenate([x[:, None] * powers[:, 1:], -y[:, None] * powers[:, 1:]], axis=1)
        rhs = y - x
        weight = lawson / (y * q_values)
        columns = np.abs(system * weight[:, None]).max(axis=0)
        solution = np.linalg.lstsq(system * weight[:, None] / columns, rhs * weight, rcond=None)[0] / columns
        p = np.concatenate([[1.0], solution[:degree]])
        q = np.concatenate([[1.0], solution[degree:]])
        q_values = powers @ q
        error = np.abs((x * (powers @ p) / q_values - y) / y)
        if iteration >= 10:
            lawson = lawson * error
            lawson = lawson / lawson.mean() + 1e-12
    return p, q


def fp32_tanh(p: np.ndarray, q: np.ndarray, x: np.ndarray, clamp: float = np.inf) -> np.ndarray:
    """The kernel's evaluation in fp32, each fused multiply-add rounded once (exact products in float64)."""
    f32 = np.float32
    x = np.clip(x.astype(f32), -clamp, clamp)
    t = x * x

    def horner(c: np.ndarray) -> np.ndarray:
        acc = np.full_like(x, f32(c[-1]))
        for coefficient in c[-2::-1]:
            acc = (acc.astype(np.float64) * t + f32(coefficient)).astype(f32)
        return acc

    return x * horner(p) / horner(q)


def saturation(p: np.ndarray, q: np.ndarray) -> np.float32:
    """The smallest fp32 x in [7, 9] where the fp32 evaluation reaches 1; it stays below 1 on [0, x)."""
    x = np.arange(np.float32(7.0).view(np.int32), np.float32(LIMIT).view(np.int32) + 1, dtype=np.int32).view(np.float32)
    value = fp32_tanh(p, q, x)
    first = int(np.argmax(value >= 1.0))
    below = fp32_tanh(p, q, np.linspace(0, x[first], 1_000_001, dtype=np.float32)[:-1])
    assert value[first] == 1.0 and below.max() < 1.0
    return x[first]


def main() -> None:
    p, q = fit()
    clamp = saturation(p, q)
    x = np.linspace(0, LIMIT, 200_001)
    relative = np.abs(x[1:] * np.polyval(p[::-1], x[1:] ** 2) / np.polyval(q[::-1], x[1:] ** 2) / np.tanh(x[1:]) - 1)
    grid = np.concatenate([np.linspace(0, 12, 4_000_001), np.geomspace(1e-30, 0.1, 100_000)]).astype(np.float32)
    want = np.tanh(grid.astype(np.float64))
    got = fp32_tanh(p, q, grid, clamp)
    small = (grid > 0) & (grid < 0.1)
    print("P:", ", ".join(f"{c:.9g}f" for c in p.astype(np.float32)))
    print("Q:", ", ".join(f"{c:.9g}f" for c in q.astype(np.float32)))
    print(f"clamp: {clamp:.9g}f")
    print(f"float64 relative error {relative.max():.2e}; fp32: |error| {np.abs(got - want).max():.2e}, "
          f"relative below 0.1 {np.abs((got - want)[small] / want[small]).max():.2e}, largest {np.abs(got).max()}")


if __name__ == "__main__":
    main()
