"""The preference-dynamics ODE, batched: layout, sampling, stability filter and integrator.

State x = [v_1..v_n, m_1..m_n];  v' = g - Pi a,  m' = u - Gamma a,
u = max(v, mu), a = max(m, 0).  Parameters are laid out as [g, mu, Pi (row-major),
Gamma (row-major)], initial conditions as [v(0), m(0)], observations as [u, a].

Everything here works on a batch of B samples at once (leading axis) and is written with
element-wise numpy operations only: a sample's result never depends on which other samples
share its batch, which is what makes generated datasets independent of the block size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# |x| above this bound counts as divergence: the draw is rejected and redrawn.
DIVERGENCE_BOUND = 1e5


# --------------------------------------------------------------------------- layout


def num_params(n: int) -> int:
    return 2 * n + 2 * n * n


def num_ic(n: int) -> int:
    return 2 * n


def param_names(n: int) -> list[str]:
    pairs = [f"{i}{j}" for i in range(1, n + 1) for j in range(1, n + 1)]
    return (
        [f"g_{i}" for i in range(1, n + 1)]
        + [f"mu_{i}" for i in range(1, n + 1)]
        + [f"Pi_{ij}" for ij in pairs]
        + [f"Gamma_{ij}" for ij in pairs]
    )


def ic_names(n: int) -> list[str]:
    return [f"v0_{i}" for i in range(1, n + 1)] + [f"m0_{i}" for i in range(1, n + 1)]


def channel_names(n: int) -> list[str]:
    return [f"u_{i}" for i in range(1, n + 1)] + [f"a_{i}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class Params:
    """A batch of parameters split into its parts: g, mu (B, n); Pi, Gamma (B, n, n)."""

    g: np.ndarray
    mu: np.ndarray
    Pi: np.ndarray
    Gamma: np.ndarray

    @classmethod
    def unpack(cls, flat: np.ndarray, n: int) -> Params:
        flat = np.asarray(flat, dtype=np.float64)
        assert flat.ndim == 2 and flat.shape[1] == num_params(n), flat.shape
        b = flat.shape[0]
        return cls(
            g=flat[:, :n],
            mu=flat[:, n : 2 * n],
            Pi=flat[:, 2 * n : 2 * n + n * n].reshape(b, n, n),
            Gamma=flat[:, 2 * n + n * n :].reshape(b, n, n),
        )

    def pack(self) -> np.ndarray:
        b = self.g.shape[0]
        return np.concatenate(
            [self.g, self.mu, self.Pi.reshape(b, -1), self.Gamma.reshape(b, -1)], axis=1
        )

    def take(self, index) -> Params:
        return Params(self.g[index], self.mu[index], self.Pi[index], self.Gamma[index])


# --------------------------------------------------------------------------- dynamics


def _matvec(M: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Batched M @ x as explicit element-wise sums: bitwise independent of the batch size
    (a BLAS call may change its summation order with the matrix size)."""
    out = M[:, :, 0] * x[:, 0:1]
    for j in range(1, x.shape[1]):
        out = out + M[:, :, j] * x[:, j : j + 1]
    return out


def rhs(x: np.ndarray, p: Params) -> np.ndarray:
    """x' for states x (B, 2n)."""
    return _Linear.of(p)(x)


# --------------------------------------------------------------------------- stability


@dataclass(frozen=True)
class _Regime:
    """One candidate equilibrium regime: performed actions P split into desired DP and
    fulfilled FP; S are the actions not performed, F = FP + S."""

    P: tuple[int, ...]
    DP: tuple[int, ...]
    FP: tuple[int, ...]
    S: tuple[int, ...]

    @property
    def F(self) -> tuple[int, ...]:
        return self.FP + self.S


def _regimes(n: int) -> list[_Regime]:
    # The empty P is left out: its equilibrium a = 0 needs g <= 0 (as in the seed's code).
    out = []
    for size in range(1, n + 1):
        for P in itertools.combinations(range(n), size):
            S = tuple(i for i in range(n) if i not in P)
            for k in range(size + 1):
                for DP in itertools.combinations(P, k):
                    FP = tuple(i for i in P if i not in DP)
                    out.append(_Regime(P, DP, FP, S))
    return out


def _rows_cols(M: np.ndarray, rows, cols) -> np.ndarray:
    return M[:, list(rows)][:, :, list(cols)]


def _jacobian_stable(Pi_P: np.ndarray, Gamma_P: np.ndarray) -> np.ndarray:
    """DESIGN §1's test of one equilibrium, for a batch of (Pi_PP, Gamma_PP).

    J = [[0, -Pi_P], [I, -Gamma_P]].  Stable unless an eigenvalue with positive real part has
    an eigenvector whose effort part is all positive, except when |min eigenvalue| >
    max eigenvalue.  Two readings are ours, stated here because the text leaves them open:
    - an eigenvector is only defined up to a factor, so "effort part all positive" means all
      entries of one strict sign (x = c e^{lt} w grows to +inf in every effort for c of that
      sign); only real eigenvalues have such real directions: a complex pair oscillates,
      so its efforts cross zero where a = max(m, 0) clips them;
    - "min/max eigenvalue" compare real parts.
    """
    b, p, _ = Pi_P.shape
    J = np.zeros((b, 2 * p, 2 * p))
    J[:, :p, p:] = -Pi_P
    J[:, p:, :p] = np.eye(p)
    J[:, p:, p:] = -Gamma_P
    lam, vec = np.linalg.eig(J)
    re = lam.real
    real_eig = np.abs(lam.imag) <= 1e-12 * np.maximum(1.0, np.abs(re))
    effort = vec[:, p:, :].real  # (b, p, 2p): column k is eigenvector k's effort part
    one_sign = np.all(effort > 0, axis=1) | np.all(effort < 0, axis=1)
    growing_direction = np.any((re > 0) & real_eig & one_sign, axis=1)
    dominated = np.abs(re.min(axis=1)) > re.max(axis=1)
    return ~growing_direction | dominated


def is_stable(p: Params) -> np.ndarray:
    """DESIGN §1's stability filter for a batch: at least one valid equilibrium, all stable."""
    b, n = p.g.shape
    n_valid = np.zeros(b, dtype=np.int64)
    all_stable = np.ones(b, dtype=bool)
    for r in _regimes(n):
        A = np.concatenate([_rows_cols(p.Pi, r.DP, r.P), _rows_cols(p.Gamma, r.FP, r.P)], axis=1)
        rhs_ = np.concatenate([p.g[:, list(r.DP)], p.mu[:, list(r.FP)]], axis=1)
        # A singular system has no isolated equilibrium in this regime: solve a harmless
        # identity there and mask the result out.
        scale = np.abs(A).max(axis=(1, 2)) ** len(r.P)
        solvable = np.abs(np.linalg.det(A)) > 1e-12 * np.maximum(scale, 1e-300)
        A = np.where(solvable[:, None, None], A, np.eye(len(r.P)))
        a_P = np.linalg.solve(A, rhs_[:, :, None])[:, :, 0]
        valid = solvable & np.all(a_P > 0, axis=1)
        if r.DP:
            valid &= np.all(_matvec(_rows_cols(p.Gamma, r.DP, r.P), a_P) > p.mu[:, list(r.DP)], axis=1)
        if r.S:
            valid &= np.all(_matvec(_rows_cols(p.Gamma, r.S, r.P), a_P) >= p.mu[:, list(r.S)], axis=1)
        if r.F:
            valid &= np.all(_matvec(_rows_cols(p.Pi, r.F, r.P), a_P) >= p.g[:, list(r.F)], axis=1)
        if not valid.any():
            continue
        stable = _jacobian_stable(
            _rows_cols(p.Pi, r.P, r.P)[valid], _rows_cols(p.Gamma, r.P, r.P)[valid]
        )
        n_valid += valid
        all_stable[np.flatnonzero(valid)[~stable]] = False
    return (n_valid > 0) & all_stable


# --------------------------------------------------------------------------- integrator

# Dormand-Prince 5(4) tableau (the method behind scipy's RK45), first-same-as-last.
_A = [
    np.array([]),
    np.array([1 / 5]),
    np.array([3 / 40, 9 / 40]),
    np.array([44 / 45, -56 / 15, 32 / 9]),
    np.array([19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]),
    np.array([9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]),
    np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]),
]
_E = np.array([71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


@dataclass(frozen=True)
class _Linear:
    """The right-hand side as x' = c + M max(x, floor): M = [[0, -Pi], [I, -Gamma]],
    c = [g, 0], floor = [mu, 0]. Three numpy calls per evaluation instead of ~6n."""

    M: np.ndarray
    c: np.ndarray
    floor: np.ndarray

    @classmethod
    def of(cls, p: Params) -> _Linear:
        b, n = p.g.shape
        M = np.zeros((b, 2 * n, 2 * n))
        M[:, :n, n:] = -p.Pi
        M[:, n:, :n] = np.eye(n)
        M[:, n:, n:] = -p.Gamma
        zeros = np.zeros((b, n))
        return cls(M, np.concatenate([p.g, zeros], axis=1), np.concatenate([p.mu, zeros], axis=1))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # einsum's per-row sums do not depend on the batch size (tests check it bitwise)
        return self.c + np.einsum("bij,bj->bi", self.M, np.maximum(x, self.floor))

    def take(self, index) -> _Linear:
        return _Linear(self.M[index], self.c[index], self.floor[index])


def _combine(coeffs: np.ndarray, K: np.ndarray) -> np.ndarray:
    return np.einsum("s,sbd->bd", coeffs, K[: coeffs.size])


def solve(
    params: np.ndarray,
    ic: np.ndarray,
    times: np.ndarray,
    n: int,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    refill: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    max_steps: int = 200_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate B samples and observe them at `times`.

    Returns (series (B, 2n, T) float64, ok (B,) bool); ok is False where the solution left
    |x| <= DIVERGENCE_BOUND or the step size collapsed (such rows of `series` are NaN).
    With `refill`, a failed row is not given up: refill(rows) returns new (params, ic) for
    those rows, which start over inside the same loop (generation redraws diverging samples
    this way, without paying the batch's slowest trajectory once per redraw round).

    Step control is per sample (Dormand-Prince 5(4) with its embedded error estimate): the
    right-hand side has kinks where v crosses mu or m crosses 0, and every sample meets its
    kinks at its own times, so a step shared across the batch would shrink to the worst
    sample's kink at every moment. Steps are clipped to land exactly on each observation
    time, so no interpolation error enters the series.
    """
    params = np.asarray(params, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    B, T = params.shape[0], times.shape[0]
    series = np.full((B, 2 * n, T), np.nan)
    ok = np.ones(B, dtype=bool)
    h0 = min(0.05, float(times[1] - times[0]))
    h_min = 1e-12 * max(1.0, abs(float(times[-1])))

    def start(rows, params_, ic_):
        f_new = _Linear.of(Params.unpack(params_, n))
        x_new = np.array(ic_, dtype=np.float64)
        series[rows, :, 0] = np.maximum(x_new, f_new.floor)
        m = len(rows)
        return [np.asarray(rows), x_new, f_new(x_new), np.full(m, times[0]), np.ones(m, np.int64),
                np.full(m, h0), np.zeros(m, np.int64)], f_new

    (idx, x, f0, t, k, h, steps), f = start(np.arange(B), params, ic)
    while idx.size:
        remaining = times[k] - t
        hit = h >= remaining
        h_step = np.where(hit, remaining, h)
        hh = h_step[:, None]
        K = np.empty((7,) + x.shape)
        K[0] = f0
        for stage in range(1, 7):
            K[stage] = f(x + hh * _combine(_A[stage], K))
        x_new = x + hh * _combine(_A[6], K)  # 5th-order solution; K[6] = f(x_new)
        scaled_err = hh * _combine(_E, K) / (atol + rtol * np.maximum(np.abs(x), np.abs(x_new)))
        err_sq = np.einsum("bd,bd->b", scaled_err, scaled_err) / x.shape[1]  # RMS norm, squared
        accept = err_sq <= 1.0
        factor = np.minimum(10.0, 0.9 * np.maximum(err_sq, 1e-20) ** -0.1)  # 0.9 err^(-1/5)
        factor = np.maximum(0.2, np.where(accept, factor, np.minimum(factor, 1.0)))
        # A step clipped to an observation says nothing about the step the dynamics allow.
        h = np.where(accept & hit, np.maximum(h, h_step * factor), h_step * factor)

        x = np.where(accept[:, None], x_new, x)
        f0 = np.where(accept[:, None], K[6], f0)
        t = np.where(accept, np.where(hit, times[k], t + h_step), t)
        steps += 1
        landed = np.flatnonzero(accept & hit)
        if landed.size:
            series[idx[landed], :, k[landed]] = np.maximum(x[landed], f.floor[landed])
            k[landed] += 1

        # written as "not (... <= ...)" so that NaN counts as failed too
        failed = ~(np.abs(x).max(axis=1) <= DIVERGENCE_BOUND) | ~(h >= h_min) | (steps >= max_steps)
        done = (k >= T) | failed
        if not done.any():
            continue
        failed_rows = idx[failed]
        keep = ~done
        state = [a[keep] for a in (idx, x, f0, t, k, h, steps)]
        f = f.take(keep)
        if failed_rows.size and refill is not None:
            new_state, f_new = start(failed_rows, *refill(failed_rows))
            state = [np.concatenate([a, b]) for a, b in zip(state, new_state)]
            f = _Linear(*(np.concatenate([a, b]) for a, b in zip((f.M, f.c, f.floor), (f_new.M, f_new.c, f_new.floor))))
        else:
            ok[failed_rows] = False
        idx, x, f0, t, k, h, steps = state
    series[~ok] = np.nan
    return series, ok
