"""Smoothing of a series against x = ln(tokens) (checkpoints at 0 tokens are dropped).

`local_linear` fits, around every point of a uniform grid in x, a straight line by weighted
least squares with Gaussian weights exp(-d^2 / 2h^2) (d = distance in ln tokens). Its intercept
is the smoothed value and its slope the derivative d y / d ln(tokens). The bandwidth h (the
phase detector's default 0.12, i.e. about +-12 % in tokens, train/core/phase.py PhaseParams) is
widened locally to the distance of the `min_neighbors`-th nearest checkpoint where checkpoints
are sparse. Noise level sigma = standard deviation of the residuals of the raw points around the
smooth curve. With `spacing_weights` (the phase detector turns it on for runs under adaptive
checkpoint density, whose rows say why each checkpoint was taken) each checkpoint's weight is also
multiplied by the stretch of x it stands for (`spacing`: half the distance to each neighbour), so
that a cluster of checkpoints counts for the stretch it covers, not for its number; and sigma is
measured only at the checkpoints whose kernel was not widened (`resolved`: the `min_neighbors`-th
nearest checkpoint, itself included, lies within the bandwidth), each against the fit without
spacing weights (all checkpoints if fewer than MIN_POINTS are resolved). Where the kernel had to be
widened, as on a sparse base schedule across the initial loss descent, a residual measures how far
the curve bends between checkpoints rather than their noise, and the weights of a sparse
neighbour pull the fit at a dense cluster's points away from them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def clean_xy(tokens, values) -> tuple[np.ndarray, np.ndarray]:
    """ln(tokens) and values, keeping finite values at tokens > 0, sorted by tokens."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0)
    order = np.argsort(t[keep], kind="stable")
    return np.log(t[keep][order]), y[keep][order]


def kernel_widths(x, grid, bandwidth: float, min_neighbors: int = 4) -> np.ndarray:
    """The kernel's width at each grid point: the bandwidth, widened to the distance of the
    `min_neighbors`-th nearest point (at least the 2nd, at most the last) where points are sparse."""
    d = np.abs(np.asarray(x, dtype=float)[None, :] - np.asarray(grid, dtype=float)[:, None])
    k = min(max(min_neighbors, 2), d.shape[1]) - 1
    return np.maximum(bandwidth, np.sort(d, axis=1)[:, k])


def local_linear(x, y, grid, bandwidth: float, min_neighbors: int = 4,
                 weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted local linear regression: (smoothed value, slope) at each grid point;
    `weights`: each point's weight besides the kernel's (None: all 1)."""
    x, y, grid = (np.asarray(a, dtype=float) for a in (x, y, grid))
    d = x[None, :] - grid[:, None]  # [G, N]
    h = kernel_widths(x, grid, bandwidth, min_neighbors)
    w = np.exp(-0.5 * (d / h[:, None]) ** 2)
    if weights is not None:
        w = w * np.asarray(weights, dtype=float)[None, :]
    s0, s1, s2 = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    t0, t1 = (w * y).sum(1), (w * d * y).sum(1)
    det = s0 * s2 - s1 * s1
    det = np.where(np.abs(det) < 1e-300, np.nan, det)
    return (s2 * t0 - s1 * t1) / det, (s0 * t1 - s1 * t0) / det


@dataclass
class Smooth:
    x: np.ndarray       # raw ln tokens
    y: np.ndarray       # raw values
    grid: np.ndarray    # uniform grid in ln tokens
    value: np.ndarray   # smoothed value on the grid
    slope: np.ndarray   # d value / d ln tokens on the grid
    sigma: float        # residual noise of the raw points


MIN_POINTS = 5  # usable checkpoints (tokens > 0, finite value) a series needs to be smoothed


def spacing(x: np.ndarray) -> np.ndarray:
    """The stretch of sorted x each point stands for: half the distance to each neighbour (the
    first and last points: half the distance to their one neighbour)."""
    return np.diff(np.concatenate([[x[0]], (x[1:] + x[:-1]) / 2, [x[-1]]]))


def smooth_xy(tokens, values, bandwidth: float, min_neighbors: int, grid_points: int,
              spacing_weights: bool = False) -> Smooth | None:
    """Smooth a series against ln(tokens) on `grid_points` points, each point weighted by its
    `spacing` if `spacing_weights`; None if fewer than MIN_POINTS usable checkpoints."""
    x, y = clean_xy(tokens, values)
    if len(x) < MIN_POINTS or x[-1] - x[0] <= 0:
        return None
    grid = np.linspace(x[0], x[-1], grid_points)
    weights = spacing(x) if spacing_weights else None
    value, slope = local_linear(x, y, grid, bandwidth, min_neighbors, weights)
    at_points, _ = local_linear(x, y, x, bandwidth, min_neighbors)  # the fit at each point, unweighted
    resid = y - at_points
    if spacing_weights:
        resolved = kernel_widths(x, x, bandwidth, min_neighbors) <= bandwidth
        resid = resid[resolved] if resolved.sum() >= MIN_POINTS else resid
    sigma = float(np.sqrt(np.nanmean(resid ** 2))) if len(resid) else 0.0
    return Smooth(x, y, grid, value, slope, sigma)
