"""Refinement: the network proposes, the ODE decides.

Each observed series is fitted through raypd's own solver by bounded least squares
(scipy's trust-region reflective `least_squares`, ported to numba in raypd.lsq so that a
whole fit is one compiled call), started at the model's estimate:

    residual = (solve(params, ic) - series) / scale,   scale = each channel's std

over the free targets (a target that is constant in the training data, mu with mu_range
[0, 0], stays fixed), bounded to the study's sampling ranges (initial conditions widened by
half their range on each side: v and m are not bounded by the physics). The Jacobian is
exact: the forward sensitivity equations are integrated with the state (ode.
solve_with_jacobian), one integration per accepted step where finite differences need one
per target, and without their noise; a trial step needs the state's solve alone.

Multistart: the model's estimate first, then any other starts given (the study's next-best
models), then perturbed restarts around the model's estimate; the first start whose fit
explains the series to its noise level wins. A series is `identified` when its fit does
(relative RMS residual <= max(1e-4, NOISE_FACTOR x the series' estimated noise)) and the
fitted targets are determined by the series (the Jacobian has full column rank); otherwise
the start with the smallest residual is kept, and the model's estimate where no start
explains the series better. A fit that diverges or hits the step limit is just a start that
did not identify.

Per target, a fit says whether the series determines it (`determined`): every target of an
identified series; in a series the fit explains with a rank-deficient Jacobian, the targets
whose whole range moves the residual, both up and down (probed by steps of KINK_STEP of the
range each way, the smaller move counting: the fit often sits on a kink of max(), where J's
columns are one-sided), at least WEAK of what the most telling one does and by more than the
tolerance the fit is held to, and that are not only seen together with others; none of the
free targets of a series no start explains. A target the data kept constant is always
determined: its value is known.

Intervals (`refine_with_intervals`): a determined target's refined estimate is the fit's, and
its interval the Gauss-Newton one (covariance s^2 (J^T J)^-1, s^2 the residual variance; in a
rank-deficient fit, over the determined targets' columns, the others held), scaled per
target by a factor calibrated on held-out identified series (`calibrate_refined`): the
residual of a noise-free series is the solver's and optimiser's error, not noise, and only a
calibration can say how far that moves the estimate. A target the fit did not determine
keeps the model's estimate and a model-only interval around it, calibrated on the held-out
series that refinement did not identify (they are the hard ones, where the model errs more
than on average; raypd.intervals' own calibration when too few): the fit's value there is
wherever the optimiser stopped, not a measurement.

Many series run as Ray Data tasks in blocks (`refine`), as generation does: the cluster's
CPUs share them and the dashboard shows `MapBatches(refine_block)` tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raypd import lsq, ode
from raypd.intervals import channel_scale, noise_level  # noqa: F401 (noise_level: raypd.refine.noise_level too)

IDENTIFIED_RESIDUAL = 1e-4  # relative RMS residual that counts as an exact fit of a clean series
NOISE_FACTOR = 1.3  # a noisy series is explained when its residual is within this of its noise
RESTARTS = 8  # perturbed restarts after the given starts
RESTART_DRAWS = 16  # draws per perturbed restart to find stable ones among
MAX_NFEV = 60  # residual evaluations per least-squares fit
FTOL = 1e-6  # a fit stops when a step lowers the cost by less than this of itself (least_squares' ftol)
# ... and, on a noisy series, a continuation's fit of a window short of the whole series at this:
# it only starts the next window's, and each such fit of a noisy n=3 series ran ~40 evaluations
# polishing its fit to the noise. With 2% noise: 150 + 150 n=3 series 130 + 134 -> 132 + 134
# identified, n=2 (300) 282 -> 281, in 9-19% less time. (On clean series, where a window's fit
# mostly ends at the exact-fit stop, it cost identification, 150 n=3 series 133 -> 131, for 4%
# of the time: they keep FTOL.)
WINDOW_FTOL = 1e-4
STOP_RMS = 1e-6  # a fit stops once its relative RMS residual is this small (an exact fit: IDENTIFIED_RESIDUAL / 100)
GIVE_UP_AFTER, GIVE_UP_RMS = 15, 0.05  # a whole-series fit still above this after so many evaluations gives way
# From this n, a whole-series fit gives up (above) and perturbed restarts skip it: at n=1 the
# restarts' whole fits identify series (4 of 1,500 fresh ones were lost without them), at n=2
# and n=3 they identified 1 of 36 and 0 of 189 series for 5-15% of all fitting time
SHORTCUTS_FROM = 2
WINDOWS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # continuation: the first 32nd of the series, then a 16th, ...
# From SHORTCUTS_FROM, continuation stops at a window of at least a quarter of the series that
# its fit leaves above this relative RMS residual (or 4x the series' threshold, noisy series):
# of 138 continuations on 150 fresh n=3 series, no fit that ended exact had been above 0.02
# there, and the 66 that failed spent 40% of all fitting time on the windows after it
ABANDON_FROM, ABANDON_RMS = 1 / 4, 0.1
WHITE_LAGS, WHITE_CHI2 = 5, 20.5  # a residual is noise-like below chi2(5)'s 0.999 quantile (white)
RANK_TOLERANCE = 1e-8  # smallest singular value of the scaled Jacobian, relative to the largest
WEAK = 1e-3  # a target whose range moves the residual less than this (relative) is not determined
KINK_STEP = 1e-4  # a rank-deficient fit's targets are probed by steps of this (of their range) each way
MAX_BLOCK_SIZE = 256  # series per Ray Data task
MIN_BLOCK_SIZE = 8
BLOCKS_PER_CPU = 8


@dataclass(frozen=True)
class FitProblem:
    """What fitting a series needs besides the series: its times, the bounds of every target
    (params then initial conditions), which targets the fit moves, the solver tolerances."""

    n: int
    times: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    free: np.ndarray  # (q,) bool
    rtol: float = 1e-8
    atol: float = 1e-10

    @classmethod
    def from_data_config(cls, data, times=None) -> "FitProblem":
        """Bounds from a DataConfig's sampling ranges; a target whose range is one value is fixed."""
        lo, hi = data.bounds()
        n, n_p = data.n_actions, ode.num_params(data.n_actions)
        free = hi > lo
        widen = 0.5 * (hi[n_p:] - lo[n_p:])
        lo, hi = lo.copy(), hi.copy()
        lo[n_p:] -= widen
        hi[n_p:] += widen
        return cls(n=n, times=np.asarray(data.times() if times is None else times, dtype=np.float64),
                   lower=lo, upper=hi, free=free, rtol=data.rtol, atol=data.atol)


@dataclass
class Fit:
    estimate: np.ndarray  # (q,) params then ic
    residual: float  # relative RMS residual of the estimate
    identified: bool
    starts: int  # starts tried
    se: np.ndarray  # (q,) Gauss-Newton standard errors of the determined targets (NaN for the others; 0 fixed)
    determined: np.ndarray  # (q,) bool: the series determines the target (fixed targets: True, their value is known)
    status: str = "identified"  # or "undetermined" (explained, not every target determined) or "not fitted"
    reason: str = ""  # why a series is not identified, in words (_why_undetermined, _why_not_fitted)


def fit_series(observed: np.ndarray, starts: np.ndarray, problem: FitProblem, restarts: int = RESTARTS,
               seed: int = 0) -> Fit:
    """Fit one series (2n, T) from starts (S, q) (the first is the model's estimate, kept when
    no start explains the series better), then `restarts` perturbed restarts around it.

    Each start is first fitted to the whole series; if that does not explain it, again by
    continuation in time: fitted to the first WINDOWS[0] of the series, that fit to the next
    window, and so on to the whole. Long oscillating transients (small Gamma) put local minima
    one period apart in the whole series' residual; over a short window the phase cannot
    slip, and each longer window starts from a fit that is already in phase."""
    ctx = _FitContext.of(observed, starts, problem)
    best_x, best_rms, tried, moved = _multistart(ctx, _start_points(ctx, starts, restarts, seed), len(starts))
    free = problem.free
    se = np.full(ctx.base.size, np.nan)
    se[~free] = 0.0  # a fixed target's value is known
    determined = ~free  # the free targets the series determines are set below
    identified, status = False, "not fitted"
    if best_x is not None and _explains(ctx, best_x, best_rms):
        r, J = ctx.whole(best_x)
        if _full_rank(J):
            identified, status = True, "identified"
            se[free] = _standard_errors(r, J)
            determined = np.ones(ctx.base.size, dtype=bool)
        else:
            status = "undetermined"
            best_x, best_rms, weak = _hold_weak_targets_at_the_model(ctx, best_x, best_rms)
            se[free], determined[free] = _determined_targets(ctx, best_x, weak)
    theta = ctx.theta(best_x)
    reason = {"identified": "", "undetermined": _why_undetermined(problem, theta, determined),
              "not fitted": _why_not_fitted(ctx, theta, best_rms, tried, moved)}[status]
    return Fit(estimate=theta, residual=best_rms, identified=identified, starts=tried, se=se,
               determined=determined, status=status, reason=reason)


def _why_undetermined(problem: FitProblem, theta: np.ndarray, determined: np.ndarray) -> str:
    """Why a series the fit explains leaves targets undetermined: the desires that never rise
    above mu and the efforts that never switch on in the fitted solution (what they hide:
    g_i, Pi_i. and v(0)_i; Pi_.j and Gamma_.j), then the targets it did not determine."""
    n, n_p = problem.n, ode.num_params(problem.n)
    series, ok = ode.solve(theta[None, :n_p], theta[None, n_p:], problem.times, n, problem.rtol, problem.atol)
    names = ode.param_names(n) + ode.ic_names(n)
    parts = []
    if ok[0]:
        mu = theta[n:2 * n]
        parts += [f"v_{i + 1} never above mu_{i + 1}" for i in range(n) if not (series[0, i] > mu[i]).any()]
        parts += [f"m_{j + 1} never above 0" for j in range(n) if not (series[0, n + j] > 0.0).any()]
    missing = [name for name, d in zip(names, determined) if not d]
    parts.append("not determined: " + ", ".join(missing) if missing else "a rank-deficient Jacobian at the fit")
    return "; ".join(parts)


SENSITIVE = 0.02  # a solution that moves this much (relative RMS) with the solver's tolerance is chaotic


def _why_not_fitted(ctx: _FitContext, theta: np.ndarray, rms: float, tried: int, moved: float | None) -> str:
    """Why no start explains a series: its dynamics at the best fit are sensitive (the ODE's
    solution there moves by more than SENSITIVE, relative RMS, between the solver's tolerance
    and one 10,000 times tighter: chaotic, the residual jumps with the smallest change of a
    target, and no fit settles; a start 1e-3 of each range off the truth ends O(1) off the
    series), or the fits found nothing better (an optimiser's failure, or a series the model
    cannot have made). moved: _sensitivity at theta where _multistart measured it."""
    moved, rtol = _sensitivity(ctx, theta) if moved is None else moved, ctx.problem.rtol
    if moved > SENSITIVE:
        return (f"sensitive: at the best fit the solution moves by {moved:.2g} (relative RMS) between solver "
                f"tolerances {rtol:g} and {rtol * 1e-4:g}; best residual {rms:.2g}")
    return f"no start explains the series: best relative RMS residual {rms:.2g} after {tried} starts"


def _sensitivity(ctx: _FitContext, theta: np.ndarray) -> float:
    """How far (relative RMS, the fit's channel weights) the ODE's solution at theta moves
    between the solver's tolerance and one 10,000 times tighter (0 where either solve fails)."""
    problem = ctx.problem
    n, n_p = problem.n, ode.num_params(problem.n)
    args = (theta[None, :n_p], theta[None, n_p:], problem.times, n)
    loose, ok_loose = ode.solve(*args, problem.rtol, problem.atol)
    tight, ok_tight = ode.solve(*args, problem.rtol * 1e-4, problem.atol * 1e-4)
    if not (ok_loose[0] and ok_tight[0]):
        return 0.0
    return float(np.sqrt(np.mean(((loose[0] - tight[0]) * ctx.weights) ** 2)))


@dataclass(frozen=True)
class _FitContext:
    """What every fit of one series shares: the series (2n, T), its channel weights, the RMS
    residual that explains it (`threshold`), the free targets' bounds (lo, hi), the model's
    estimate of every target (`base`, clipped to the bounds: the fixed targets stay there)
    and the weighted residual over the whole series (`whole`: free targets -> (residual,
    Jacobian), _residuals)."""

    observed: np.ndarray
    problem: FitProblem
    weights: np.ndarray
    threshold: float
    lo: np.ndarray
    hi: np.ndarray
    base: np.ndarray
    whole: object

    @classmethod
    def of(cls, observed: np.ndarray, starts: np.ndarray, problem: FitProblem) -> _FitContext:
        observed = np.asarray(observed, dtype=np.float64)
        weights = 1.0 / channel_scale(observed)[:, None]
        base = np.clip(np.asarray(starts[0], dtype=np.float64), problem.lower, problem.upper)
        return cls(observed=observed, problem=problem, weights=weights,
                   threshold=max(IDENTIFIED_RESIDUAL, NOISE_FACTOR * float(noise_level(observed))),
                   lo=problem.lower[problem.free], hi=problem.upper[problem.free], base=base,
                   whole=_residuals(observed, weights, problem, base, observed.shape[1]))

    def theta(self, x: np.ndarray | None) -> np.ndarray:
        """Every target: the model's estimate with the free targets x (none: the model's)."""
        theta = self.base.copy()
        if x is not None:
            theta[self.problem.free] = x
        return theta


def _start_points(ctx: _FitContext, starts: np.ndarray, restarts: int, seed: int) -> list[np.ndarray]:
    """The starts' free targets (clipped to the bounds), then `restarts` perturbed restarts
    around the model's estimate (normal, a quarter of each range; seeded), each drawn again
    (up to RESTART_DRAWS times) until its parameters pass the stability filter that every
    series' truth passed (docs/science.md §4): a restart at an unstable system mostly
    diverges at once and fits nothing."""
    free = ctx.problem.free
    rng = np.random.default_rng(seed)
    spread = 0.25 * (ctx.problem.upper - ctx.problem.lower)[free]
    points = [np.clip(np.asarray(s, dtype=np.float64)[free], ctx.lo, ctx.hi) for s in starts]
    if restarts <= 0:
        return points
    draws = np.clip(ctx.base[free] + rng.normal(size=(restarts * RESTART_DRAWS, ctx.lo.size)) * spread, ctx.lo, ctx.hi)
    theta = np.repeat(ctx.base[None], len(draws), axis=0)
    theta[:, free] = draws
    n = ctx.problem.n
    stable = ode.is_stable(ode.Params.unpack(theta[:, :ode.num_params(n)], n))
    order = np.concatenate([np.flatnonzero(stable), np.flatnonzero(~stable)])  # stable ones first, in draw order
    return points + [draws[i] for i in order[:restarts]]


def _multistart(ctx: _FitContext, points: list[np.ndarray], given: int
                ) -> tuple[np.ndarray | None, float, int, float | None]:
    """Fit from each start in turn until a fit explains the series: the `given` starts (the
    models') to the whole series and, if that does not explain it, by continuation; from
    n = SHORTCUTS_FROM the perturbed restarts after them by continuation alone (a restart's
    whole-series fit explained 1 of 36 n=2 series and 0 of 189 n=3 ones that the models'
    starts left, and cost 5-15% of all fitting), unless the dynamics at the best fit so far
    are chaotic (_sensitivity above SENSITIVE: no fit settles there, and the restarts cost
    1-2 s per n=3 series for nothing). Returns the fit with the smallest RMS residual (None
    where none beats the model's estimate), that residual, the starts tried and the
    sensitivity measured at the best fit (None where it was not)."""
    # the model's estimate, kept unless a fit does better
    best_rms, best_x = _rms(ctx, ctx.base[ctx.problem.free]), None
    tried, moved = 0, None
    for start in points:
        tried, moved = tried + 1, None  # (a further start may move the best fit)
        whole = tried <= given or ctx.problem.n < SHORTCUTS_FROM
        for attempt in (_fit_whole, _fit_by_continuation) if whole else (_fit_by_continuation,):
            x = attempt(ctx, start)
            rms = _rms(ctx, x)
            if rms < best_rms:
                best_rms, best_x = rms, x
            if _explains(ctx, x, rms):
                break
        if best_x is not None and _explains(ctx, best_x, best_rms):
            break
        if tried == given and best_x is not None:  # the models' starts failed: restarts, unless chaotic
            moved = _sensitivity(ctx, ctx.theta(best_x))
            if moved > SENSITIVE:
                break
    return best_x, best_rms, tried, moved


def _fit_whole(ctx: _FitContext, start: np.ndarray) -> np.ndarray:
    """The least-squares fit of the whole series from `start`; from n = SHORTCUTS_FROM one
    that is still far off after GIVE_UP_AFTER evaluations (a start out of phase:
    continuation's case) stops there."""
    return _fitted(ctx, start, ctx.observed.shape[1], give_up=ctx.problem.n >= SHORTCUTS_FROM)[0]


def _fit_by_continuation(ctx: _FitContext, start: np.ndarray) -> np.ndarray:
    """The fit of the first WINDOWS[0] of the series from `start`, that fit's to the next
    window, and so on to the whole series (windows of at least 8 points); from n =
    SHORTCUTS_FROM it stops early where a window of ABANDON_FROM of the series or more stays
    above ABANDON_RMS."""
    steps = ctx.observed.shape[1]
    windows = [max(8, int(round(w * steps))) for w in WINDOWS if round(w * steps) < steps]
    abandon = max(ABANDON_RMS, 4 * ctx.threshold) if ctx.problem.n >= SHORTCUTS_FROM else np.inf
    x = start
    for window in windows + [steps]:
        x, rms = _fitted(ctx, x, window, partial=window < steps and ctx.threshold > IDENTIFIED_RESIDUAL)
        if window >= ABANDON_FROM * steps and rms > abandon:
            break
    return x


def _fitted(ctx: _FitContext, start: np.ndarray, window: int, give_up: bool = False, partial: bool = False
            ) -> tuple[np.ndarray, float]:
    """The least-squares fit of the first `window` time points from `start` (free targets,
    nudged inside the bounds): raypd.lsq's compiled trust-region reflective fit. It stops at the
    first point whose relative RMS residual is STOP_RMS or less (an exact fit: more
    iterations would polish the solver's error), when a step gains less than FTOL of the cost
    (WINDOW_FTOL for a `partial` window of a noisy series' continuation: its fit only starts
    the next), and with `give_up` when after GIVE_UP_AFTER evaluations the residual is still
    above GIVE_UP_RMS. Returns the fit and its relative RMS residual over the window."""
    lo, hi = ctx.lo, ctx.hi
    x0 = np.clip(start, lo, hi)
    x0 = np.where(x0 <= lo, lo + 1e-9 * (hi - lo), np.where(x0 >= hi, hi - 1e-9 * (hi - lo), x0))
    problem = ctx.problem
    x, rms, _, _ = lsq.fit(ctx.base, problem.free, lo, hi, ctx.observed[:, :window], ctx.weights, problem.times[:window],
                           problem.n, x0, problem.rtol, problem.atol, max_nfev=MAX_NFEV, stop_rms=STOP_RMS,
                           give_up_after=GIVE_UP_AFTER if give_up else 0, give_up_rms=GIVE_UP_RMS,
                           ftol=WINDOW_FTOL if partial else FTOL)
    return x, rms


def _rms(ctx: _FitContext, x: np.ndarray) -> float:
    """The RMS residual over the whole series at x (free targets); inf where the solve fails."""
    r = ctx.whole(x, False)[0]
    return float(np.sqrt(np.mean(r**2))) if np.isfinite(r).all() else np.inf


def _explains(ctx: _FitContext, x: np.ndarray, rms: float) -> bool:
    """Fitted exactly, or to the series' noise level with a residual that looks like noise."""
    return rms <= IDENTIFIED_RESIDUAL or (rms <= ctx.threshold and white(ctx.whole(x, False)[0], ctx.observed.shape))


def _full_rank(J: np.ndarray) -> bool:
    """J's smallest singular value is above RANK_TOLERANCE of its largest."""
    _, singular, _ = np.linalg.svd(J, full_matrices=False)
    return bool(singular.size and singular[-1] > RANK_TOLERANCE * singular[0])


def _hold_weak_targets_at_the_model(ctx: _FitContext, x: np.ndarray, rms: float
                                    ) -> tuple[np.ndarray, float, np.ndarray]:
    """A fit that explains the series with a rank-deficient Jacobian: the series fixes some
    targets and says (next to) nothing of others (v(0), g and Pi while the desire stays below
    mu, Pi and Gamma while the effort stays at 0). Where the optimiser left those is arbitrary
    (v(0) = 0 fits a desire that never shows as well as -4 does); the model's estimate has seen
    many such series. Each weak target, least telling first, takes the model's value, one at
    a time, while the fit still explains the series. Returns the fit, its RMS residual and
    which free targets are weak.

    Weak: its whole range moves the residual less than WEAK of what the most telling target's
    does, or moves the relative RMS residual less than the tolerance the fit is held to (a
    series that shows nothing: every target). The fit often sits on a kink of max(): the
    optimiser pushed the desire down until it just stays below mu, and J's columns are
    one-sided there (g, Pi and v(0) seem to matter, as does anything that raises the desire,
    Gamma and m(0) included): a target moves the residual both ways or it is weak
    (_two_sided_reach)."""
    reach = _two_sided_reach(ctx, x)
    weak = (reach <= WEAK * reach.max()) | (reach / np.sqrt(ctx.observed.size) <= ctx.threshold)
    model = ctx.base[ctx.problem.free]
    for j in np.argsort(reach, kind="stable"):
        if not weak[j]:
            break
        candidate = x.copy()
        candidate[j] = min(max(model[j], ctx.lo[j]), ctx.hi[j])
        candidate_rms = _rms(ctx, candidate)
        if _explains(ctx, candidate, candidate_rms):
            rms, x = candidate_rms, candidate
    return x, rms, weak


def _two_sided_reach(ctx: _FitContext, x: np.ndarray) -> np.ndarray:
    """Per free target: how far its whole range moves the residual, from a step of
    KINK_STEP of its range each way, the smaller of the two: where the fit sits on a kink
    of max() (v(0) = mu while the desire never shows: raising it shows at t = 0, lowering
    it changes nothing), the side that moves nothing says what the series can tell. A side
    whose step lowers the residual moves nothing either: the fit stopped on the kink a little
    off (an exact fit to the stop rule's 1e-6, a desire that shows by 1e-12 where the
    series is all 0), and the series would let the target go on that way."""
    r0 = ctx.whole(x, False)[0].copy()
    size = float(np.linalg.norm(r0))
    out = np.zeros(x.size)
    for j in range(x.size):
        moved = []
        for sign in (1.0, -1.0):
            y = x.copy()
            y[j] += sign * KINK_STEP * (ctx.hi[j] - ctx.lo[j])
            r = ctx.whole(y, False)[0]
            # a step to a smaller residual is one the series does not hold it back from
            moved.append(float(np.linalg.norm(r - r0)) if not np.linalg.norm(r) < size else 0.0)
        out[j] = min(moved) / KINK_STEP if np.isfinite(moved).all() else 0.0
    return out


def _determined_targets(ctx: _FitContext, x: np.ndarray, weak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The free targets a rank-deficient fit determines, and their standard errors (NaN for
    the others): the targets that are not weak, unless they only move the residual together
    (a direction of their columns the series cannot see, _independent); their standard
    errors are the Gauss-Newton ones of the fit with the weak targets held where they are."""
    r, J = ctx.whole(x)
    kept = _independent(J * (ctx.hi - ctx.lo), ~weak)
    se = np.full(kept.size, np.nan)
    if kept.any():
        se[kept] = _standard_errors(r, J[:, kept])
        kept &= np.isfinite(se)
    return np.where(kept, se, np.nan), kept


def _standard_errors(r: np.ndarray, J: np.ndarray) -> np.ndarray:
    """Gauss-Newton standard errors of a fit with residual r and Jacobian J (full column
    rank): the square roots of the diagonal of s^2 (J^T J)^-1, s^2 = r.r / (len(r) - columns)."""
    _, singular, vt = np.linalg.svd(J, full_matrices=False)
    dof = max(1, r.size - J.shape[1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cov = (vt.T / singular**2) @ vt * (float(r @ r) / dof)  # s^2 (J^T J)^-1
        return np.sqrt(np.diag(cov))


def _independent(J: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """`columns` (bool) less those that make J[:, columns] rank-deficient: while its smallest
    singular value is below RANK_TOLERANCE of its largest, the column with the largest share
    of that direction is dropped (J's columns scaled by each target's range)."""
    kept = columns.copy()
    while kept.any():
        _, singular, vt = np.linalg.svd(J[:, kept], full_matrices=False)
        if singular[0] > 0 and singular[-1] > RANK_TOLERANCE * singular[0]:
            break
        kept[np.flatnonzero(kept)[int(np.argmax(np.abs(vt[-1])))]] = False
    return kept


def white(residual: np.ndarray, shape) -> bool:
    """Whether a residual looks like noise: the Box-Pierce statistic of its first WHITE_LAGS
    autocorrelations (pooled over channels), N x sum(rho_k^2), is below the chi-square
    quantile that white noise exceeds once in a thousand series. A fit that misses a fast
    oscillation (which the noise estimate, from second differences, can mistake for noise)
    leaves a periodic, strongly correlated residual."""
    r = residual.reshape(shape)
    denominator = float((r * r).sum())
    if not denominator > 0:
        return False
    rho = np.array([(r[:, k:] * r[:, :-k]).sum() / denominator for k in range(1, WHITE_LAGS + 1)])
    return float(r.size * (rho**2).sum()) <= WHITE_CHI2


def _residuals(observed: np.ndarray, weights: np.ndarray, problem: FitProblem, base: np.ndarray, window: int):
    """(x, jacobian=True) -> (weighted residual, its Jacobian or None) over the first `window`
    times, x the free targets: what the decisions after a fit look at (the residual's size
    and whiteness, the Jacobian's rank, standard errors). A solve that diverges or hits the
    step limit gives the flat residual the fit saw (lsq.FAILED_RESIDUAL). The residual is
    always the state's solve (ode.solve, the solver the series were simulated with, as in the
    fit), the Jacobian the sensitivities' (ode.solve_with_jacobian: the regimes' exact
    propagators, whose state differs from the solver's by its error); both are kept for the
    last x."""
    n, n_p, free = problem.n, ode.num_params(problem.n), problem.free
    times = problem.times[:window]
    last: dict = {}

    def evaluate(x, jacobian=True):
        key = x.tobytes()
        if last.get("key") != key:
            last.clear()
            last["key"] = key
        if "r" in last and (not jacobian or "J" in last):
            return last["r"], last.get("J")
        theta = base.copy()
        theta[free] = x
        params, ic = theta[None, :n_p], theta[None, n_p:]
        if jacobian and "J" not in last:
            _, jac, ok = ode.solve_with_jacobian(params, ic, times, n, problem.rtol, problem.atol,
                                                 targets=np.flatnonzero(free))  # the free targets' alone
            last["J"] = ((jac[0] * weights[:, :, None]).reshape(observed.size, -1) if ok[0]
                         else np.zeros((observed.size, int(free.sum()))))
        if "r" not in last:
            series, ok = ode.solve(params, ic, times, n, problem.rtol, problem.atol)
            last["r"] = (((series[0] - observed) * weights).ravel() if ok[0]
                         else np.full(observed.size, lsq.FAILED_RESIDUAL))
        return last["r"], last.get("J")

    return evaluate


def fit_many(series: np.ndarray, starts: np.ndarray, problem: FitProblem, seeds: np.ndarray,
             restarts: int = RESTARTS) -> dict[str, np.ndarray]:
    """fit_series over (N, 2n, T) series with starts (N, S, q): the columns refine writes.

    BLAS and LAPACK run on one thread here: a fit's matrices are small (at most 1,206 x 27),
    so threads gain nothing, and on a machine whose cores are busy (a local fit beside a
    training run) OpenBLAS's waiting threads made a fit 28x slower (n=3, 2 cores). Ray's
    workers already run with OMP_NUM_THREADS=1."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        fits = [fit_series(s, st, problem, restarts, int(seed)) for s, st, seed in zip(series, starts, seeds)]
    q = starts.shape[2]
    return {"estimate": np.array([f.estimate for f in fits]).reshape(-1, q),
            "residual": np.array([f.residual for f in fits], dtype=np.float64),
            "identified": np.array([f.identified for f in fits], dtype=bool),
            "starts": np.array([f.starts for f in fits], dtype=np.int64),
            "se": np.array([f.se for f in fits]).reshape(-1, q),
            "determined": np.array([f.determined for f in fits], dtype=bool).reshape(-1, q),
            "status": np.array([f.status for f in fits], dtype=object),
            "reason": np.array([f.reason for f in fits], dtype=object)}


def refine_block(batch: dict, problem: FitProblem, restarts: int) -> dict:
    """Ray Data map_batches body: fit every series of the block (one task)."""
    ode.warm_up(problem.n)  # loads the compiled solver and fit from numba's cache (once per worker)
    lsq.warm_up(problem.n)
    count = len(batch["row"])
    series = np.stack(list(batch["series"])).reshape(count, 2 * problem.n, -1)
    starts = np.stack(list(batch["starts"]))
    out = fit_many(series, starts, problem, batch["seed"], restarts)
    return {"row": np.asarray(batch["row"], dtype=np.int64), **out}


def block_size(count: int, cpus: float) -> int:
    """Series per task: at least BLOCKS_PER_CPU tasks per CPU while blocks stay >=
    MIN_BLOCK_SIZE. Series cost from milliseconds (n=1) to seconds (n=3, unidentified ones
    most), so many small tasks keep the cluster's CPUs busy to the end (5 blocks on 2 CPUs
    left one idle for the last block's minutes)."""
    blocks = max(BLOCKS_PER_CPU * max(1, int(cpus)), -(-count // MAX_BLOCK_SIZE))
    return max(1, min(MAX_BLOCK_SIZE, max(MIN_BLOCK_SIZE, -(-count // blocks))))


def refine(series: np.ndarray, starts: np.ndarray, problem: FitProblem, seeds: np.ndarray | None = None,
           restarts: int = RESTARTS, address: str | None = None, progress: bool = True,
           local: bool | None = None) -> dict[str, np.ndarray]:
    """Fit N series (N, 2n, T) from their starts (N, S, q) (starts[:, 0]: the model's
    estimates). Returns estimate (N, q), residual, identified, starts tried, se (N, q),
    determined (N, q), status and reason (Fit's fields; status and reason as str objects).

    Runs as Ray Data tasks (joining the cluster at `address`/$RAY_ADDRESS or starting a local
    Ray) unless the series fit in one block, or local=True: then in this process.
    seeds: one per series for its perturbed restarts (default: its position), so a series'
    result does not depend on its block."""
    series = np.asarray(series, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.float64)
    count = len(series)
    assert starts.ndim == 3 and starts.shape[0] == count, starts.shape
    seeds = np.arange(count) if seeds is None else np.asarray(seeds)
    ode.warm_up(problem.n)
    lsq.warm_up(problem.n)
    if local is None:
        local = count <= MIN_BLOCK_SIZE
    if local or count == 0:
        return fit_many(series, starts, problem, seeds, restarts)

    import ray

    from raypd.cli import init_ray, progress_bar
    from raypd.cluster import cluster_cpus

    init_ray(address)
    size = block_size(count, cluster_cpus())
    rows = [{"row": i, "series": series[i].ravel(), "starts": starts[i], "seed": int(seeds[i])}
            for i in range(count)]
    ds = ray.data.from_items(rows, override_num_blocks=-(-count // size))
    ds = ds.map_batches(refine_block, batch_size=None, num_cpus=1, zero_copy_batch=True,
                        fn_kwargs={"problem": problem, "restarts": restarts})
    ds.context.enable_progress_bars = False  # one bar, in series, below
    ds.context.op_resource_reservation_enabled = False  # one map operator: nothing to starve
    q = starts.shape[2]
    out = {"estimate": np.empty((count, q)), "residual": np.empty(count), "identified": np.empty(count, bool),
           "starts": np.empty(count, np.int64), "se": np.empty((count, q)),
           "determined": np.empty((count, q), bool), "status": np.empty(count, object),
           "reason": np.empty(count, object)}
    bar = progress_bar(count, "refine", progress, unit="series")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows_done = batch["row"]
            for key in out:
                out[key][rows_done] = np.stack(list(batch[key])) if batch[key].dtype == object else batch[key]
            bar.update(len(rows_done))
    finally:
        bar.close()
    return out


# --------------------------------------------------------------------------- intervals

CALIBRATION_SERIES = 1000  # held-out series (per noise level) that calibrate the refined intervals
MIN_FALLBACK_SERIES = 20  # unidentified calibration series needed for their own model-only quantiles


def calibrate_refined(predict, series: np.ndarray, targets: np.ndarray, problem: FitProblem, seed: int = 0,
                      address: str | None = None, progress: bool = True) -> dict:
    """Calibration of the refined intervals (raypd.intervals, studentized split conformal):
    held-out raw series (N, 2n, T), clean and with each calibrated noise level, are refined
    from `predict`'s estimates; the scores |y - y_fit| / se of every target a fit determined
    (every target of an identified series; the determined ones of a series fitted with a
    rank-deficient Jacobian, whose intervals are made the same way) set each noise level's
    quantiles, per target. Also records the identified share per noise level."""
    from raypd.intervals import CALIBRATION_FORMAT, LEVEL_GRID, NOISE_LEVELS, add_noise, conformal_quantiles

    rng = np.random.default_rng(seed)
    noisy = np.concatenate([add_noise(series, level, rng) for level in NOISE_LEVELS])
    truth = np.concatenate([targets] * len(NOISE_LEVELS))
    estimates = predict(noisy.astype(np.float32))
    out = refine(noisy, estimates[:, None, :], problem, seeds=np.arange(len(noisy)) + seed, address=address,
                 progress=progress)
    quantiles, fallback, identified = [], [], []
    for k, rows in enumerate(np.array_split(np.arange(len(noisy)), len(NOISE_LEVELS))):
        ok = out["identified"][rows]
        se, err = out["se"][rows], np.abs(out["estimate"][rows] - truth[rows])
        with np.errstate(invalid="ignore"):
            scores = np.where(se > 0, err / np.where(se > 0, se, 1.0), 0.0)  # a fixed target: 0 / 0
        # the targets a fit determined, identified series or not: what refine_with_intervals
        # gives a Gauss-Newton interval (a score NaN where the fit did not determine the target)
        quantiles.append(conformal_quantiles(np.where(out["determined"][rows], scores, np.nan)))
        # The series refinement could not identify are the hard ones, where the model errs
        # more than on average: their model-only intervals are calibrated on their own kind.
        missed = np.abs(estimates[rows][~ok] - truth[rows][~ok])
        fallback.append(conformal_quantiles(missed) if len(missed) >= MIN_FALLBACK_SERIES else None)
        identified.append(float(ok.mean()) if ok.size else 0.0)
    return {"format": CALIBRATION_FORMAT, "kind": "refined", "levels": list(LEVEL_GRID),
            "noise_levels": list(NOISE_LEVELS), "quantiles": quantiles, "n_calibration": int(len(series)),
            "identified": identified, "unidentified_quantiles": fallback}


def refine_with_intervals(models: list, series: np.ndarray, problem: FitProblem, calibration: dict,
                          level: float, seeds: np.ndarray | None = None, address: str | None = None,
                          progress: bool = True) -> dict[str, np.ndarray]:
    """The whole refinement of raw series (N, 2n, T): models[0]'s estimates and model-only
    intervals, a fit from them (then from the other models' estimates, then perturbed
    restarts), and per series and target the refined estimate and its interval:

    - a target the fit determined (`determined`, from fit_series; every target of an
      identified series, a constant target always): the fit's value, and its Gauss-Newton
      interval scaled by the calibrated factor of the noise level nearest the fit's residual.
      In a series that is fitted but not identified (rank-deficient: v(0), g and Pi while the
      desire stays below mu), the determined targets' standard errors are those of the fit
      with the undetermined targets held where they are, scaled by the same calibration (which
      identified series made);
    - a target it did not determine (the weak ones of such a series; every free target of a
      series no start explains): the model's estimate (models[0]) and its model-only interval,
      calibrated on the held-out series refinement did not identify (unidentified_half_widths).

    So a refined estimate always lies inside its own interval. Returns refine's columns, with
    `estimate`, `lower`, `upper` those refined ones (the fit's own values in `fit_estimate`),
    plus model_estimate, model_lower, model_upper and noise. models: raypd.serve.SavedModel,
    best first."""
    from raypd.intervals import half_widths, unidentified_half_widths

    series = np.asarray(series)
    estimate, lower, upper = models[0].predict_with_intervals(series, level)
    starts = np.stack([estimate] + [m.predict(series) for m in models[1:]], axis=1)
    out = refine(series, starts, problem, seeds=seeds, address=address, progress=progress)
    noise = noise_level(series)
    # a fitted series' residual is its noise level: it picks the calibration
    se = np.nan_to_num(out["se"])
    factor = half_widths(calibration, out["residual"], level)
    with np.errstate(invalid="ignore"):  # an uncalibrated bin's inf factor times a fixed target's 0
        width = np.where(se > 0, factor * se, 0.0)
    missed = unidentified_half_widths(calibration, noise, level, 0.5 * (upper - lower))
    determined = out["determined"]
    fit = out["estimate"]
    centre = np.where(determined, fit, estimate)
    half = np.where(determined, width, missed)
    out.update(fit_estimate=fit, estimate=centre, lower=centre - half, upper=centre + half,
               model_estimate=estimate, model_lower=lower, model_upper=upper, noise=noise)
    return out
