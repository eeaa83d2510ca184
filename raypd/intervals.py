"""Intervals that hold their coverage: split-conformal calibration on held-out series.

Model-only: the nonconformity score of a held-out series is |y - y_hat| per target; the
interval at level L is y_hat +- the ceil((N+1) L)-th smallest of the N scores (split
conformal: covers a new exchangeable series with probability >= L). Refined (raypd.refine):
the score is |y - y_fit| / se, se the fit's Gauss-Newton standard error (studentized
conformal), over the identified series.

Observation noise changes both the model's errors and the fit's: a noise-free series is fitted
to the solver's precision, a noisy one to its noise. So calibration is Mondrian by noise: the
held-out series are scored clean and with Gaussian noise of NOISE_LEVELS (relative to each
channel's std), and a series takes the quantiles of the level nearest its own estimated noise
(noise_level). Quantiles are kept on LEVEL_GRID; a level between grid points
takes the next one up (never narrower than asked).
"""

from __future__ import annotations

import functools
import math

import numpy as np

DEFAULT_LEVEL = 0.9
NOISE_LEVELS = (0.0, 0.01, 0.02, 0.05)
LEVEL_GRID = tuple([round(0.01 * k, 2) for k in range(1, 100)] + [0.995, 0.999])
CALIBRATION_FORMAT = "raypd-conformal/1"


def check_level(level) -> float:
    """A coverage level in (0, 1) that the calibrations hold (at most LEVEL_GRID's highest),
    or a ValueError saying so: a higher level is refused, not served as the highest one."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < 1:
        raise ValueError(f"interval level must be a number in (0, 1), e.g. 0.9 (got {level!r})")
    if value > LEVEL_GRID[-1] + 1e-12:
        raise ValueError(f"interval level {level!r} is above the highest calibrated level, {LEVEL_GRID[-1]} "
                         "(the calibration holds quantiles up to it)")
    return value


NOISIER = 2.0  # a series noisier than this x the highest calibrated noise level is beyond the calibration


def beyond_calibration(noise: np.ndarray, calibration: dict) -> np.ndarray:
    """Which series are noisier than the calibration covers (they take its noisiest bin, whose
    intervals may be too narrow for them)."""
    return np.asarray(noise, dtype=np.float64) > NOISIER * max(calibration["noise_levels"])


def add_noise(series: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """series (N, C, T) plus Gaussian noise of sd `level` x each channel's std."""
    series = np.asarray(series, dtype=np.float64)
    if level == 0:
        return series.copy()
    return series + rng.normal(size=series.shape) * level * series.std(axis=-1, keepdims=True)


def conformal_quantiles(scores: np.ndarray) -> list[list[float]]:
    """(len(LEVEL_GRID), q) split-conformal quantiles of scores (N, q), per target over its
    scores that are not NaN (N_j of them): for level L the ceil((N_j+1) L)-th smallest score;
    beyond N_j (too few series for that level) the largest, and +inf (unbounded) where there is
    no score at all."""
    scores = np.sort(np.asarray(scores, dtype=np.float64), axis=0)  # NaN last
    counts = (~np.isnan(scores)).sum(axis=0)
    out = []
    for level in LEVEL_GRID:
        row = []
        for j, count in enumerate(counts):
            k = min(int(count), math.ceil((count + 1) * level))
            row.append(float(scores[k - 1, j]) if count else math.inf)
        out.append(row)
    return out


NOISE_LAGS = 16  # noise_level's second differences span lags 1..NOISE_LAGS


def noise_level(series: np.ndarray) -> np.ndarray:
    """Estimated observation noise of series (..., 2n, T), relative to each channel's std, as
    one RMS number per series: per channel, a robust (median absolute deviation) estimate from
    the second differences x(t) - 2 x(t - P) + x(t - 2P) at the lag P = 1..NOISE_LAGS that
    gives the smallest (white noise makes each of them 6 sigma^2 in variance; a smooth
    trajectory makes the lag-1 ones small, and an oscillation sampled a few times a period,
    which the lag-1 ones take for noise (n=3: 31% of clean fresh series above 0.1), those at
    its period), divided by that minimum's mean on white noise of the series' length (the
    smallest of several estimates is low: 0.85 at 201 points). A clean series gives ~0 (its
    settled stretches dominate the median)."""
    series = np.asarray(series, dtype=np.float64)
    flat = series.reshape(-1, *series.shape[-2:])
    # 32 series at a time: a chunk's differences stay in cache (1.4-1.6x faster than all at once)
    sigma = np.concatenate([_smallest_lag_sigma(flat[i:i + 32]) for i in range(0, len(flat), 32)]
                           ).reshape(series.shape[:-1]) if len(flat) else np.zeros(series.shape[:-1])
    return np.sqrt(np.mean((sigma / _white_noise_mean(series.shape[-1]) / channel_scale(series)) ** 2, axis=-1))


def _smallest_lag_sigma(series: np.ndarray) -> np.ndarray:
    """Per channel, the smallest over the lags of 1.4826 MAD(second differences) / sqrt(6),
    each lag's over all its points (an odd number: one fewer where even; its median is one
    partition)."""
    steps = series.shape[-1]
    if steps < 3:  # no second difference
        return np.full(series.shape[:-1], np.nan)
    smallest = None
    for lag in range(1, max(1, min(NOISE_LAGS, (steps - 1) // 4)) + 1):  # >= 2 lag-spans of points
        span = steps - 2 * lag
        span -= 1 - span % 2
        second = series[..., 2 * lag:2 * lag + span] - 2.0 * series[..., lag:lag + span] + series[..., :span]
        middle = span // 2
        deviation = np.abs(second - np.partition(second, middle, axis=-1)[..., middle:middle + 1])
        sigma = np.partition(deviation, middle, axis=-1)[..., middle]
        smallest = sigma if smallest is None else np.minimum(smallest, sigma)
    return (1.4826 / np.sqrt(6.0)) * smallest


@functools.lru_cache(maxsize=None)
def _white_noise_mean(steps: int) -> float:
    """_smallest_lag_sigma's mean on unit white noise of `steps` points (256 seeded draws: to 0.4%);
    1 below 9 points (one lag: the estimate is the lag-1 one, which is not biased)."""
    if steps < 9:
        return 1.0
    return float(_smallest_lag_sigma(np.random.default_rng(0).normal(size=(256, steps))).mean())


def channel_scale(series: np.ndarray) -> np.ndarray:
    """What a channel's residual is divided by: its std, floored at 1e-3 of the series' largest
    channel std (a channel that stays at 0 still counts, without dominating)."""
    std = np.asarray(series, dtype=np.float64).std(axis=-1)
    return np.maximum(std, np.maximum(1e-3 * std.max(axis=-1, keepdims=True), 1e-12))


def nearest_bin(noise: np.ndarray, noise_levels) -> np.ndarray:
    """For each estimated noise level, the position of the nearest calibrated one."""
    levels = np.asarray(noise_levels, dtype=np.float64)
    return np.abs(np.asarray(noise, dtype=np.float64)[:, None] - levels[None, :]).argmin(axis=1)


def level_index(calibration: dict, level: float) -> int:
    """The position in the calibration's level grid of `level`, or of the grid level just
    above it (an interval is never narrower than asked)."""
    grid = np.asarray(calibration["levels"])
    return min(int(np.searchsorted(grid, check_level(level) - 1e-12)), len(grid) - 1)


def half_widths(calibration: dict, noise: np.ndarray, level: float) -> np.ndarray:
    """(N, q) quantile per series (its noise bin) and target at `level`."""
    table = np.asarray(calibration["quantiles"], dtype=np.float64)  # (bins, levels, q)
    return table[nearest_bin(noise, calibration["noise_levels"]), level_index(calibration, level)]


def unidentified_half_widths(calibration: dict, noise: np.ndarray, level: float, model_widths: np.ndarray):
    """Half-widths of the model-only intervals of series refinement did not identify: the
    calibration's quantiles for such series (per noise level) where it had enough of them
    (raypd.refine.MIN_FALLBACK_SERIES), else the model's own (model_widths)."""
    out = model_widths.copy()
    tables = calibration.get("unidentified_quantiles") or []
    if not tables:
        return out
    at = level_index(calibration, level)
    bins = nearest_bin(noise, calibration["noise_levels"])
    for i, b in enumerate(bins):
        if tables[b] is not None:
            out[i] = np.asarray(tables[b][at], dtype=np.float64)
    return out


def calibrate_model(predict, series: np.ndarray, targets: np.ndarray, seed: int = 0,
                    noise_levels=NOISE_LEVELS) -> dict:
    """Model-only calibration for `predict` (raw series -> raw targets) on held-out raw
    series (N, C, T) and their true targets (N, q): what model_meta keeps as "intervals"."""
    rng = np.random.default_rng(seed)
    quantiles = []
    for level in noise_levels:
        # a chunk at a time (the same noise draws, in the same order, as the whole at once):
        # a noisy float64 copy of 20,000 n=2 series alone is 130 MB
        scores = [np.abs(predict(add_noise(series[i : i + 4096], level, rng).astype(np.float32))
                         - targets[i : i + 4096]) for i in range(0, len(series), 4096)]
        quantiles.append(conformal_quantiles(np.concatenate(scores) if scores else np.zeros((0, targets.shape[1]))))
    return {"format": CALIBRATION_FORMAT, "kind": "model", "levels": list(LEVEL_GRID),
            "noise_levels": list(noise_levels), "quantiles": quantiles, "n_calibration": int(len(series))}


def model_intervals(calibration: dict, series: np.ndarray, estimate: np.ndarray, level: float = DEFAULT_LEVEL):
    """(lower, upper) (N, q) model-only intervals for raw series and the model's estimates."""
    width = half_widths(calibration, noise_level(series), level)
    return estimate - width, estimate + width


def metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """Test metrics in raw units: overall mse/rmse/mae (over all targets), r2 (mean over the
    targets that vary), and per-target mse/mae/r2 (r2 is None for a constant target)."""
    err = y_pred - y_true
    per_mse = (err**2).mean(axis=0)
    per_mae = np.abs(err).mean(axis=0)
    var = y_true.var(axis=0)
    per_r2 = [None if v <= 1e-24 else float(1 - m / v) for m, v in zip(per_mse, var)]
    r2_values = [r for r in per_r2 if r is not None]
    return {
        "mse": float(per_mse.mean()),
        "rmse": float(np.sqrt(per_mse.mean())),
        "mae": float(per_mae.mean()),
        "r2": float(np.mean(r2_values)) if r2_values else None,
        "target_names": list(names),
        "per_target": {name: {"mse": float(m), "mae": float(a), "r2": r}
                       for name, m, a, r in zip(names, per_mse, per_mae, per_r2)},
        "n_test": int(y_true.shape[0]),
    }


def coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray, names: list[str]) -> dict:
    """Share of true values inside their intervals, per target (None for a constant target,
    whose interval is a point) and over all varying targets."""
    inside = (truth >= lower) & (truth <= upper)
    varying = truth.std(axis=0) > 0
    per = {name: (float(inside[:, j].mean()) if varying[j] else None) for j, name in enumerate(names)}
    return {"all": float(inside[:, varying].mean()) if varying.any() else None, "per_target": per}
