"""Least squares for `epdctl calibrate`: the sim's cost coefficients from probe timings.

Every role's cost is linear in what a probe varies (items encoded, prompt tokens, running
requests), and no cost can be negative: a negative coefficient is noise, so the fit is
non-negative least squares, exact for the two or three columns a role has (every subset of
columns is tried; numpy has no NNLS of its own and this is not worth scipy).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearFit:
    coefficients: tuple[float, ...]
    rmse: float
    r2: float | None  # None when the data has no spread to explain

    def predict(self, row: list[float]) -> float:
        return float(np.dot(self.coefficients, row))


def fit_nonnegative(rows: list[list[float]], ys: list[float]) -> LinearFit:
    """Minimise |X c - y| over c >= 0. `rows` are X's rows (put a 1 first for an intercept)."""
    x = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.ndim != 2 or len(x) != len(y) or not len(y):
        raise ValueError("one row per measurement, at least one")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("measurements must be finite numbers")
    columns = x.shape[1]
    best: tuple[float, np.ndarray] | None = None
    for size in range(columns, 0, -1):
        for subset in itertools.combinations(range(columns), size):
            sub = x[:, subset]
            solution, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if (solution < 0).any():
                continue
            coefficients = np.zeros(columns)
            coefficients[list(subset)] = solution
            residual = float(np.sum((x @ coefficients - y) ** 2))
            if best is None or residual < best[0] - 1e-12:
                best = (residual, coefficients)
    if best is None:  # every column pulls negative: nothing explains the data better than zero
        best = (float(np.sum(y ** 2)), np.zeros(columns))
    residual, coefficients = best
    spread = float(np.sum((y - y.mean()) ** 2))
    return LinearFit(tuple(float(c) for c in coefficients), (residual / len(y)) ** 0.5,
                     1.0 - residual / spread if spread > 1e-12 else None)
