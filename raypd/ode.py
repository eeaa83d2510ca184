"""The preference-dynamics ODE: layout, random draws, stability filter and integrator.

State x = [v_1..v_n, m_1..m_n];  v' = g - Pi a,  m' = u - Gamma a,
u = max(v, mu), a = max(m, 0).  Parameters are laid out as [g, mu, Pi (row-major),
Gamma (row-major)], initial conditions as [v(0), m(0)], observations as [u, a].

The work is compiled with numba and done one sample at a time: each sample draws from its
own counter-based stream, runs the stability filter on each draw and integrates its own
trajectory with its own step sizes. A sample's result therefore never depends on which other
samples share its call, which is what makes generated datasets independent of the block
size. Compiled code is cached on disk (numba's cache: beside this file when that folder is
writable, else the user's cache folder, or $NUMBA_CACHE_DIR); `warm_up()` loads or compiles
it once per process, outside any timed loop.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass

import numpy as np
from numba import njit

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


def relabellings(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The n! relabellings of the actions (docs/science.md §2): for each permutation s (new
    action i is old action s[i]), the index arrays (targets, channels) such that a target
    vector [params, ic] relabels as vector[..., targets] and a series' channels as
    series[..., channels, :]. The identity comes first."""
    out = []
    for perm in itertools.permutations(range(n)):
        s = np.array(perm)
        pairs = (s[:, None] * n + s[None, :]).ravel()  # (i, j) -> (s[i], s[j]), row-major
        targets = np.concatenate([s, n + s, 2 * n + pairs, 2 * n + n * n + pairs,
                                  2 * n + 2 * n * n + s, 3 * n + 2 * n * n + s])
        out.append((targets, np.concatenate([s, n + s])))
    return out


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


# --------------------------------------------------------------------------- random draws
#
# Sample i of a dataset with seed s draws from Philox4x64-10 with key (s, i): numpy's
# np.random.Philox(key=[s, i]) (tests check it word for word), read as doubles the way
# np.random.Generator.random() reads them. A draw takes the stream's next 2n + 2n² + 2n
# uniforms: params, then initial conditions, each lo + (hi - lo) * u. Keying the stream by
# (seed, sample_id) costs nothing per sample (a SeedSequence costs ~8 us) and lets the whole
# draw-filter-solve loop run compiled.

_M0 = np.uint64(0xD2E7470EE14C6C93)
_M1 = np.uint64(0xCA5A826395121157)
_W0 = np.uint64(0x9E3779B97F4A7C15)
_W1 = np.uint64(0xBB67AE8584CAA73B)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
_U11 = np.uint64(11)
_U1 = np.uint64(1)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True)
def _mulhi(a, b):
    """High 64 bits of the 128-bit product a * b (uint64)."""
    a_lo, a_hi = a & _LOW32, a >> _U32
    b_lo, b_hi = b & _LOW32, b >> _U32
    ll, hl, lh, hh = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    cross = (ll >> _U32) + (hl & _LOW32) + lh
    return hh + (hl >> _U32) + (cross >> _U32)


@njit(cache=True)
def _philox(k0, k1, counter, out):
    """The four 64-bit words of Philox4x64-10 for counter (counter, 0, 0, 0), key (k0, k1)."""
    c0, c1, c2, c3 = counter, np.uint64(0), np.uint64(0), np.uint64(0)
    for r in range(10):
        if r > 0:
            k0 += _W0
            k1 += _W1
        hi0, lo0 = _mulhi(_M0, c0), _M0 * c0
        hi1, lo1 = _mulhi(_M1, c2), _M1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    out[0], out[1], out[2], out[3] = c0, c1, c2, c3


@njit(cache=True)
def _uniforms_of(seed, sample_id, count):
    """The first `count` uniforms of a sample's stream (for tests and tools)."""
    out = np.empty(count)
    buf = np.empty(4, np.uint64)
    for j in range(count):
        if j % 4 == 0:
            _philox(seed, sample_id, np.uint64(j // 4) + _U1, buf)
        out[j] = float(buf[j % 4] >> _U11) * _TO_UNIT
    return out


def sample_uniforms(seed: int, sample_id: int, count: int) -> np.ndarray:
    """The first `count` uniforms in [0, 1) of sample `sample_id`'s stream (seed < 2**64)."""
    return _uniforms_of(np.uint64(seed), np.uint64(sample_id), count)


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


@functools.lru_cache(maxsize=None)
def _regime_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The regimes as arrays for compiled code: index[r, k] lists P, DP, FP, S (k = 0..3),
    padded with -1; length[r, k] is how many of them there are."""
    regimes = _regimes(n)
    index = np.full((len(regimes), 4, n), -1, dtype=np.int64)
    length = np.zeros((len(regimes), 4), dtype=np.int64)
    for r, regime in enumerate(regimes):
        for k, part in enumerate((regime.P, regime.DP, regime.FP, regime.S)):
            index[r, k, : len(part)] = part
            length[r, k] = len(part)
    return index, length


@njit(cache=True)
def _jacobian_stable(p, n, P, size):
    """docs/science.md §4's test of the equilibrium performing actions P[:size].

    J = [[0, -Pi_PP], [I, -Gamma_PP]].  Stable unless an eigenvalue with positive real part
    has an eigenvector whose effort part is all positive, except when |min eigenvalue| >
    max eigenvalue.  Two readings are ours, stated here because the text leaves them open:
    - an eigenvector is only defined up to a factor, so "effort part all positive" means all
      entries of one strict sign (x = c e^{lt} w grows to +inf in every effort for c of that
      sign); only real eigenvalues have such real directions: a complex pair oscillates,
      so its efforts cross zero where a = max(m, 0) clips them;
    - "min/max eigenvalue" compare real parts.
    (numba's eig keeps real input real, so J is handed to it as complex; LAPACK then scales
    each eigenvector to a real largest entry, so a real eigenvalue's vector is real.)
    """
    pi0, gamma0 = 2 * n, 2 * n + n * n
    if size == 1:
        # J = [[0, -pi], [1, -gamma]]: l^2 + gamma l + pi = 0, and a real eigenvalue's
        # eigenvector (gamma + l, 1) w has a one-signed (scalar, nonzero) effort part
        pi, gamma = p[pi0 + P[0] * (n + 1)], p[gamma0 + P[0] * (n + 1)]
        disc = gamma * gamma - 4.0 * pi
        if disc >= 0.0:
            root = np.sqrt(disc)
            lo, hi = 0.5 * (-gamma - root), 0.5 * (-gamma + root)
            return (not hi > 0) or abs(lo) > hi
        re, im = -0.5 * gamma, 0.5 * np.sqrt(-disc)
        # a pair with a negligible imaginary part counts as real, as below
        return (not (re > 0 and im <= 1e-12 * max(1.0, abs(re)))) or abs(re) > re
    m = 2 * size
    J = np.zeros((m, m), dtype=np.complex128)
    for i in range(size):
        J[size + i, i] = 1.0
        for j in range(size):
            J[i, size + j] = -p[pi0 + P[i] * n + P[j]]
            J[size + i, size + j] = -p[gamma0 + P[i] * n + P[j]]
    lam, vec = np.linalg.eig(J)
    re_min, re_max = np.inf, -np.inf
    growing = False
    for k in range(m):
        re, im = lam[k].real, lam[k].imag
        re_min, re_max = min(re_min, re), max(re_max, re)
        if re > 0 and abs(im) <= 1e-12 * max(1.0, abs(re)):
            positive = negative = True
            for i in range(size):
                w = vec[size + i, k].real
                positive &= w > 0
                negative &= w < 0
            growing |= positive or negative
    return (not growing) or abs(re_min) > re_max


@njit(cache=True)
def _stable(p, n, index, length, A, b, a):
    """docs/science.md §4's stability filter for one parameter vector p: at least one valid
    equilibrium, all stable. A (n, n), b, a (n,) are scratch space."""
    pi0, gamma0 = 2 * n, 2 * n + n * n
    valid_count = 0
    for r in range(index.shape[0]):
        P, DP, FP, S = index[r, 0], index[r, 1], index[r, 2], index[r, 3]
        size, n_dp, n_fp, n_s = length[r, 0], length[r, 1], length[r, 2], length[r, 3]
        # [Pi_{DP,P}; Gamma_{FP,P}] a_P = [g_DP; mu_FP]
        amax = 0.0
        for i in range(size):
            if i < n_dp:
                row, base, b[i] = DP[i], pi0, p[DP[i]]
            else:
                row, base, b[i] = FP[i - n_dp], gamma0, p[n + FP[i - n_dp]]
            for j in range(size):
                A[i, j] = p[base + row * n + P[j]]
                amax = max(amax, abs(A[i, j]))
        # LU with partial pivoting: determinant first, then (if the system is not
        # singular) the solution
        det = 1.0
        for c in range(size):
            piv = c
            for i in range(c + 1, size):
                if abs(A[i, c]) > abs(A[piv, c]):
                    piv = i
            if piv != c:
                det = -det
                for j in range(size):
                    A[c, j], A[piv, j] = A[piv, j], A[c, j]
                b[c], b[piv] = b[piv], b[c]
            det *= A[c, c]
            if A[c, c] == 0.0:
                break
            for i in range(c + 1, size):
                f = A[i, c] / A[c, c]
                for j in range(c, size):
                    A[i, j] -= f * A[c, j]
                b[i] -= f * b[c]
        # a singular system has no isolated equilibrium in this regime
        if not abs(det) > 1e-12 * max(amax**size, 1e-300):
            continue
        valid = True
        for i in range(size - 1, -1, -1):
            s = b[i]
            for j in range(i + 1, size):
                s -= A[i, j] * a[j]
            a[i] = s / A[i, i]
            valid &= a[i] > 0
        if not valid:
            continue
        # Gamma_{DP,P} a > mu_DP,  Gamma_{S,P} a >= mu_S,  Pi_{F,P} a >= g_F  (F = FP + S)
        for i in range(n_dp + n_s):
            row = DP[i] if i < n_dp else S[i - n_dp]
            s = 0.0
            for j in range(size):
                s += p[gamma0 + row * n + P[j]] * a[j]
            valid &= (s > p[n + row]) if i < n_dp else (s >= p[n + row])
        for i in range(n_fp + n_s):
            row = FP[i] if i < n_fp else S[i - n_fp]
            s = 0.0
            for j in range(size):
                s += p[pi0 + row * n + P[j]] * a[j]
            valid &= s >= p[row]
        if not valid:
            continue
        valid_count += 1
        if not _jacobian_stable(p, n, P, size):
            return False
    return valid_count > 0


@njit(cache=True)
def _stable_batch(params, n, index, length, out):
    A, b, a = np.empty((n, n)), np.empty(n), np.empty(n)
    for i in range(params.shape[0]):
        out[i] = _stable(params[i], n, index, length, A, b, a)


def is_stable(p: Params) -> np.ndarray:
    """docs/science.md §4's stability filter for a batch: at least one valid equilibrium, all stable."""
    n = p.g.shape[1]
    flat = np.ascontiguousarray(p.pack(), dtype=np.float64)
    out = np.empty(flat.shape[0], dtype=np.bool_)
    _entry(n, 0)(flat, *_regime_table(n), out)
    return out


# --------------------------------------------------------------------------- integrator

# Dormand-Prince 5(4) (the method behind scipy's RK45), first-same-as-last: stage weights
# _Asj, 5th-order weights _Bj (= stage 7's), error-estimate weights _Ej.
_A21 = 1 / 5
_A31, _A32 = 3 / 40, 9 / 40
_A41, _A42, _A43 = 44 / 45, -56 / 15, 32 / 9
_A51, _A52, _A53, _A54 = 19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729
_A61, _A62, _A63, _A64, _A65 = 9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656
_B1, _B3, _B4, _B5, _B6 = 35 / 384, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84
_E1, _E3, _E4, _E5, _E6, _E7 = 71 / 57600, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40


@njit(cache=True)
def _dormand_prince(p, n, sensitivities, times, rtol, atol, max_steps, z, K, y, series, jac):
    """Integrate one sample from times[0] and observe it at every time: the stepper of both
    solve() (sensitivities False) and solve_with_jacobian() (True).

    The state z is x (2n), then, with sensitivities, S = dx/dtheta for the q = len(p) + 2n
    targets (2n x q, row-major); it comes in holding the initial state. Each time k is
    recorded into series (2n, T) and, with sensitivities, jac (2n, T, q); K (7, size), y
    (size,) are scratch space, size = 2n (1 + q). Adaptive Dormand-Prince 5(4), RMS error
    norm over x only (S follows x's steps), steps clipped to land exactly on each observation
    time (no interpolation error enters the series). Returns False where x leaves |x| <=
    DIVERGENCE_BOUND or the step size collapses (series is then garbage).

    Callers pass n and sensitivities as constants, so numba compiles one stepper per pair.
    Without sensitivities q = 0: the sensitivity code drops out and every loop over the state
    has a fixed length and unrolls, which generation's speed depends on. (Measured with
    numba 0.68: a run-time test of q in place of the flag made the stepper with sensitivities
    10-19% slower at n=2; that stepper is now only the exact propagators' fallback, and its S'
    is _linear_derivative's.)
    """
    d = 2 * n
    # q from n alone (not p's length): a compile-time constant, so the loops over z unroll and
    # vectorise (solve_with_jacobian 1.5x faster at n=3 than with q = len(p) + 2n)
    q = (2 * n + 2 * n * n + d) if sensitivities else 0
    size = d * (1 + q)
    n_times = times.shape[0]
    column = np.arange(q)  # S's column of each target: all of them, in layout order
    _record(p, n, q, sensitivities, z, series, jac, 0, column)
    _derivative(p, n, q, sensitivities, z, K, 0, column)
    t = times[0]
    h = min(0.05, times[1] - times[0])
    h_min = 1e-12 * max(1.0, abs(times[n_times - 1]))
    k, steps = 1, 0
    while k < n_times:
        remaining = times[k] - t
        hit = h >= remaining
        hs = remaining if hit else h
        for i in range(size):
            y[i] = z[i] + hs * (_A21 * K[0, i])
        _derivative(p, n, q, sensitivities, y, K, 1, column)
        for i in range(size):
            y[i] = z[i] + hs * (_A31 * K[0, i] + _A32 * K[1, i])
        _derivative(p, n, q, sensitivities, y, K, 2, column)
        for i in range(size):
            y[i] = z[i] + hs * (_A41 * K[0, i] + _A42 * K[1, i] + _A43 * K[2, i])
        _derivative(p, n, q, sensitivities, y, K, 3, column)
        for i in range(size):
            y[i] = z[i] + hs * (_A51 * K[0, i] + _A52 * K[1, i] + _A53 * K[2, i] + _A54 * K[3, i])
        _derivative(p, n, q, sensitivities, y, K, 4, column)
        for i in range(size):
            y[i] = z[i] + hs * (_A61 * K[0, i] + _A62 * K[1, i] + _A63 * K[2, i] + _A64 * K[3, i]
                                + _A65 * K[4, i])
        _derivative(p, n, q, sensitivities, y, K, 5, column)
        for i in range(size):  # the 5th-order solution; K[6] is its derivative (first same as last)
            y[i] = z[i] + hs * (_B1 * K[0, i] + _B3 * K[2, i] + _B4 * K[3, i] + _B5 * K[4, i]
                                + _B6 * K[5, i])
        _derivative(p, n, q, sensitivities, y, K, 6, column)
        err_sq = 0.0
        for i in range(d):
            e = hs * (_E1 * K[0, i] + _E3 * K[2, i] + _E4 * K[3, i] + _E5 * K[4, i] + _E6 * K[5, i]
                      + _E7 * K[6, i])
            e /= atol + rtol * max(abs(z[i]), abs(y[i]))
            err_sq += e * e
        err_sq /= d  # RMS norm, squared
        accept = err_sq <= 1.0
        factor = min(10.0, 0.9 * max(err_sq, 1e-20) ** -0.1)  # 0.9 err^(-1/5)
        if not accept:
            factor = min(factor, 1.0)
        factor = max(0.2, factor)
        # A step clipped to an observation says nothing about the step the dynamics allow.
        h = max(h, hs * factor) if (accept and hit) else hs * factor
        if accept:
            for i in range(size):
                z[i] = y[i]
                K[0, i] = K[6, i]
            if hit:
                t = times[k]
                _record(p, n, q, sensitivities, z, series, jac, k, column)
                k += 1
            else:
                t += hs
        steps += 1
        largest = 0.0
        for i in range(d):
            largest = max(largest, abs(z[i]))
        # written as "not (... <= ...)" so that NaN counts as failed too
        if not (largest <= DIVERGENCE_BOUND) or not (h >= h_min) or steps >= max_steps:
            return False
    return True


@njit(cache=True)
def _rhs(p, n, x, K, stage):
    """K[stage, :2n] = x' = [g - Pi a, u - Gamma a] with u = max(v, mu), a = max(m, 0)."""
    pi0, gamma0 = 2 * n, 2 * n + n * n
    for i in range(n):
        dv = p[i]
        dm = max(x[i], p[n + i])
        for j in range(n):
            a_j = max(x[n + j], 0.0)
            dv -= p[pi0 + i * n + j] * a_j
            dm -= p[gamma0 + i * n + j] * a_j
        K[stage, i] = dv
        K[stage, n + i] = dm


@njit(cache=True)
def _observe(p, n, x, series, k):
    """series[:, k] = [u, a]."""
    for i in range(n):
        series[i, k] = max(x[i], p[n + i])
        series[n + i, k] = max(x[n + i], 0.0)


@njit(cache=True)
def solve_into(p, x0, n, times, rtol, atol, max_steps, series, K, x, y):
    """Integrate one sample (_dormand_prince on x alone) and observe it at every time into
    series (2n, T); False where it diverged or the step size collapsed (series is then
    garbage). K (7, 2n), x, y (2n,) are scratch space. For compiled callers (solve() below,
    raypd.lsq's fit); n is a compile-time constant there (the entry points pass it as a
    constant), so the loops over the state unroll."""
    for i in range(2 * n):
        x[i] = x0[i]
    no_jac = np.empty((0, 0, 0))  # q = 0: nothing is written to it
    return _dormand_prince(p, n, False, times, rtol, atol, max_steps, x, K, y, series, no_jac)


@njit(cache=True)
def _solve_batch(params, ic, n, times, rtol, atol, max_steps, series, ok):
    d = 2 * n
    K, x, x_new = np.empty((7, d)), np.empty(d), np.empty(d)
    for b in range(params.shape[0]):
        ok[b] = solve_into(params[b], ic[b], n, times, rtol, atol, max_steps, series[b], K, x, x_new)
        if not ok[b]:
            series[b, :, :] = np.nan


def solve(
    params: np.ndarray,
    ic: np.ndarray,
    times: np.ndarray,
    n: int,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = 200_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate B samples, each on its own, and observe them at `times`.

    Returns (series (B, 2n, T) float64, ok (B,) bool); ok is False where the solution left
    |x| <= DIVERGENCE_BOUND or the step size collapsed (such rows of `series` are NaN).

    Step control is per sample (Dormand-Prince 5(4) with its embedded error estimate): the
    right-hand side has kinks where v crosses mu or m crosses 0, and every sample meets its
    kinks at its own times. Steps are clipped to land exactly on each observation time, so
    no interpolation error enters the series.
    """
    params = np.ascontiguousarray(params, dtype=np.float64).reshape(-1, num_params(n))
    ic = np.ascontiguousarray(ic, dtype=np.float64).reshape(-1, num_ic(n))
    times = np.ascontiguousarray(times, dtype=np.float64)
    series = np.empty((params.shape[0], 2 * n, times.shape[0]))
    ok = np.empty(params.shape[0], dtype=np.bool_)
    _entry(n, 1)(params, ic, times, float(rtol), float(atol), int(max_steps), series, ok)
    return series, ok


# --------------------------------------------------------------------------- sensitivities
#
# Refinement (raypd.refine) fits the ODE to an observed series by least squares and needs the
# Jacobian of the observations with respect to every target (parameters then initial
# conditions). It comes from the forward sensitivity equations, integrated with the state:
# S = dx/dtheta (2n x q, q = targets) obeys S' = (df/dx) S + df/dtheta, S(0) = [0 | I]. The
# right-hand side is continuous (max() has kinks, not jumps), so S is continuous and needs no
# jump conditions at switches; df/dx is taken on the side the state is on. One integration
# gives the series and its exact Jacobian (up to the solver's tolerance), where finite
# differences would need q + 1 solves, each with its own step sequence, whose differences
# are noise at small perturbations. solve()'s stepper (_dormand_prince) integrates z = [x, S]
# with sensitivities on: _derivative and _record below are its right-hand side and
# observations, x's (_rhs, _observe) and then S's.


@njit(cache=True)
def _derivative(p, n, q, sensitivities, z, K, stage, column):
    """K[stage] = z' for z = [x (2n), S (2n x q, row-major)]: x' = f(x), then (with
    sensitivities) S' = (df/dx) S + df/dtheta, in the regime z is in (_linear_derivative)."""
    if sensitivities:
        _linear_derivative(p, n, q, _regime(p, n, z), z, K[stage], True, column)
    else:
        _rhs(p, n, z, K, stage)


@njit(cache=True)
def _record(p, n, q, sensitivities, z, series, jac, k, column):
    """series[:, k] = [u, a], then (with sensitivities) jac[:, k] = their derivatives with
    respect to the targets that have a column in S (`column`: target -> column, -1 none)."""
    _observe(p, n, z, series, k)
    if not sensitivities:
        return
    d = 2 * n
    for i in range(n):
        desire_binds, effort_on = z[i] > p[n + i], z[n + i] > 0.0
        for c in range(q):
            jac[i, k, c] = z[d + i * q + c] if desire_binds else 0.0
            jac[n + i, k, c] = z[d + (n + i) * q + c] if effort_on else 0.0
        if not desire_binds and column[n + i] >= 0:
            jac[i, k, column[n + i]] = 1.0  # u_i = mu_i


# The fast path. Between the surfaces where a desire crosses its mu or an effort crosses 0, the
# system is linear with constant coefficients: x' = A x + b for the regime (which desires bind,
# which efforts are on), and so is [x, S]: S' = A S + C X, X = [x, 1], where C's column for each
# target has one entry (d f / d theta is -a_j, 1 or 0). Over an observation interval of length h
# that stays in one regime the solution is exact: X(t + h) = expm(Abar h) X and
# S(t + h) = expm(A h) S + G X(t), G = int_0^h expm(A (h - s)) C expm(Abar s) ds, per target.
# _propagators computes them once per regime (and for h / SUB_INTERVALS), so such an interval
# costs one small matrix product, where the Dormand-Prince stepper takes many steps, each with
# seven evaluations of the 2n (1 + q) right-hand side. An interval whose state changes regime at
# one of SUB_INTERVALS points (and at its end) is walked sub-interval by sub-interval; where a
# sub-interval's end is in another regime, the first crossing is found on x's Taylor polynomial
# (bisection then Newton, to 1e-15 of the sub-interval) and [x, S] advances to it by its
# Taylor series in the old regime, then on in the new one. A sub-interval with more than
# MAX_CROSSINGS crossings (the state grazing a surface) sends the whole interval to the stepper.
# Measured on 150 fresh n=3 series at their true targets (this machine): 1.4 ms per series
# against the stepper's 4.0 ms, and closer to a solve at rtol 1e-12 (median relative error of
# the Jacobian 6e-7 against the stepper's 3e-5 at rtol 1e-8). A crossing that leaves and
# re-enters a regime between two of the points is missed (the state grazes the surface; what
# it changes is second order in the time spent across it).

SUB_LEVELS = 4  # the propagators' squarings between h / SUB_INTERVALS and h
SUB_INTERVALS = 2 ** SUB_LEVELS  # points per observation interval at which the regime is checked
TAYLOR_TERMS = 18  # of expm's Taylor series after scaling (|Abar delta| + 1 <= 1: error < 1e-16)
MAX_CROSSINGS = 8  # per sub-interval; more sends the observation interval to the stepper


@njit(cache=True)
def _regime(p, n, x):
    """Bit i: desire i binds (v_i > mu_i); bit n + j: effort j is on (m_j > 0)."""
    mask = 0
    for i in range(n):
        if x[i] > p[n + i]:
            mask |= 1 << i
        if x[n + i] > 0.0:
            mask |= 1 << (n + i)
    return mask


@njit(cache=True)
def _propagators(p, n, mask, h, E_h, E_sub, G_h, G_sub, forced, column):
    """The regime's exact propagators over h and h / SUB_INTERVALS: E (2n + 1, 2n + 1) =
    expm(Abar t) for X = [x, 1], G (k, 2n, 2n + 1) per column of S (column[target]: the
    target's, -1 none; forced[c] False where column c's target has no forcing in this regime:
    G is then zero and not written). Scaling and squaring:
    the Taylor series at delta = h / 2^s with (|Abar| + 1) delta <= 1, then s squarings of the
    block matrix [[E, 0], [G, E_x]]."""
    d = 2 * n
    D = d + 1
    pi0, gamma0 = 2 * n, 2 * n + n * n
    Ab = np.zeros((D, D))
    # per column of S: its target's forcing in this regime, one entry sign at (row, col) of C
    q = forced.shape[0]
    row, col, sign = np.empty(q, np.int64), np.empty(q, np.int64), np.empty(q)
    for c in range(q):
        forced[c] = False
    for i in range(n):
        Ab[i, d] = p[i]
        _force(column[i], i, d, 1.0, forced, row, col, sign)  # d v_i' / d g_i = 1
        if (mask >> i) & 1:
            Ab[n + i, i] = 1.0
        else:
            Ab[n + i, d] = p[n + i]
            _force(column[n + i], n + i, d, 1.0, forced, row, col, sign)  # d m_i' / d mu_i = 1
        for j in range(n):
            if (mask >> (n + j)) & 1:
                Ab[i, n + j] = -p[pi0 + i * n + j]
                Ab[n + i, n + j] = -p[gamma0 + i * n + j]
                _force(column[pi0 + i * n + j], i, n + j, -1.0, forced, row, col, sign)  # d v_i' / d Pi_ij = -m_j
                _force(column[gamma0 + i * n + j], n + i, n + j, -1.0, forced, row, col, sign)  # d m_i' / d Gamma_ij
    norm = 0.0
    for i in range(D):
        total = 0.0
        for j in range(D):
            total += abs(Ab[i, j])
        norm = max(norm, total)
    s = SUB_LEVELS  # at least: E_sub is one of the squarings
    while (norm + 1.0) * h > 2.0 ** s:
        s += 1
    delta = h / 2.0 ** s
    K = TAYLOR_TERMS
    power = np.empty((K + 1, D, D))  # (Abar delta)^k
    power[0] = np.eye(D)
    for k in range(1, K + 1):
        for i in range(D):
            for j in range(D):
                total = 0.0
                for l in range(D):
                    total += power[k - 1, i, l] * Ab[l, j]
                power[k, i, j] = total * delta
    factorial = np.empty(K + 2)
    factorial[0] = 1.0
    for k in range(1, K + 2):
        factorial[k] = factorial[k - 1] * k
    E = np.zeros((D, D))
    for k in range(K + 1):
        for i in range(D):
            for j in range(D):
                E[i, j] += power[k, i, j] / factorial[k]
    # G(delta) for C = sign e_r e_k^T: sign delta sum_{i+j<K} (A delta)^i[:, r] (Abar delta)^j[k, :] / (i+j+1)!
    #                                = sign delta sum_i (A delta)^i[:, r] beta_i(k)^T
    beta = np.empty((D, K, D))
    have_beta = np.zeros(D, dtype=np.bool_)
    G = np.empty((q, d, D))
    for c in range(q):
        if not forced[c]:
            continue
        r, k_ = row[c], col[c]
        if not have_beta[k_]:
            have_beta[k_] = True
            for i in range(K):
                for b in range(D):
                    total = 0.0
                    for j in range(K - i):
                        total += power[j, k_, b] / factorial[i + j + 1]
                    beta[k_, i, b] = total
        for a in range(d):
            for b in range(D):
                total = 0.0
                for i in range(K):
                    total += power[i, a, r] * beta[k_, i, b]
                G[c, a, b] = total * sign[c] * delta
    # squaring: [[E, 0], [G, E_x]]^2 = [[E E, 0], [G E + E_x G, E_x E_x]]
    E2, T = np.empty((D, D)), np.empty((d, D))
    for step in range(s):
        if step == s - SUB_LEVELS:  # E, G are now those of h / SUB_INTERVALS
            E_sub[:, :] = E
            for c in range(q):
                if forced[c]:
                    G_sub[c, :, :] = G[c]
        for c in range(q):
            if not forced[c]:
                continue
            for a in range(d):
                for b in range(D):
                    total = 0.0
                    for l in range(D):
                        total += G[c, a, l] * E[l, b]
                    for l in range(d):
                        total += E[a, l] * G[c, l, b]
                    T[a, b] = total
            G[c, :, :] = T
        for i in range(D):
            for j in range(D):
                total = 0.0
                for l in range(D):
                    total += E[i, l] * E[l, j]
                E2[i, j] = total
        E[:, :] = E2
    E_h[:, :] = E
    for c in range(q):
        if forced[c]:
            G_h[c, :, :] = G[c]


@njit(cache=True)
def _force(c, r, k, value, forced, row, col, sign):
    """Column c's target (c >= 0: it has one) is forced by value x X[k] in x's row r."""
    if c >= 0:
        forced[c], row[c], col[c], sign[c] = True, r, k, value


@njit(cache=True)
def _propagate(E, G, forced, z, X, scratch, d, q):
    """z = [x, S] <- [E X, E_x S + G X] (X = [x, 1] at the start)."""
    D = d + 1
    for a in range(d):
        for c in range(q):
            total = 0.0
            for l in range(d):
                total += E[a, l] * z[d + l * q + c]
            if forced[c]:
                for b in range(D):
                    total += G[c, a, b] * X[b]
            scratch[a * q + c] = total
    _advance_state(E, X, z, d)
    for i in range(d * q):
        z[d + i] = scratch[i]


@njit(cache=True)
def _advance_state(E, X, out, d):
    """out[:d] = x after the propagator E (2n + 1 square) from X = [x, 1]; out is not X."""
    for i in range(d):
        total = 0.0
        for j in range(d + 1):
            total += E[i, j] * X[j]
        out[i] = total


@njit(cache=True)
def _linear_derivative(p, n, q, mask, w, out, affine, column):
    """out = the regime's right-hand side for [x, S] at w: its linear part, plus (affine) the
    constant one (g, the mu of desires that do not bind, and their targets' 1s). S has q
    columns, column[target] each target's (-1: the target has none, its sensitivity is not
    carried)."""
    d = 2 * n
    pi0, gamma0 = 2 * n, 2 * n + n * n
    for i in range(n):
        binds = (mask >> i) & 1
        dv = p[i] if affine else 0.0
        dm = w[i] if binds else (p[n + i] if affine else 0.0)
        for j in range(n):
            if (mask >> (n + j)) & 1:
                dv -= p[pi0 + i * n + j] * w[n + j]
                dm -= p[gamma0 + i * n + j] * w[n + j]
        out[i] = dv
        out[n + i] = dm
    if q == 0:  # x alone
        return
    # S_v' = -sum_j Pi_ij [m_j > 0] S_mj, S_m' = [desire binds] S_v - sum_j Gamma_ij [m_j > 0] S_mj,
    # row by row over the targets, contiguous, so that the loops over c vectorise
    for i in range(n):
        binds = (mask >> i) & 1
        row_v, row_m = d + i * q, d + (n + i) * q
        for c in range(q):
            out[row_v + c] = 0.0
            out[row_m + c] = w[row_v + c] if binds else 0.0
        for j in range(n):
            if (mask >> (n + j)) & 1:
                src = d + (n + j) * q
                pi_ij, gamma_ij = p[pi0 + i * n + j], p[gamma0 + i * n + j]
                for c in range(q):
                    s_mj = w[src + c]
                    out[row_v + c] -= pi_ij * s_mj
                    out[row_m + c] -= gamma_ij * s_mj
                c = column[pi0 + i * n + j]
                if c >= 0:
                    out[row_v + c] -= w[n + j]
                c = column[gamma0 + i * n + j]
                if c >= 0:
                    out[row_m + c] -= w[n + j]
        if affine:
            c = column[i]
            if c >= 0:
                out[row_v + c] += 1.0
            c = column[n + i]
            if not binds and c >= 0:
                out[row_m + c] += 1.0


@njit(cache=True)
def _taylor_step(p, n, q, mask, z, sigma, term, next_term, total, column):
    """z = [x, S] <- its value sigma later in the regime, by the Taylor series (to 1e-17)."""
    size = z.shape[0]
    _linear_derivative(p, n, q, mask, z, term, True, column)
    scale = 1.0
    for i in range(size):
        term[i] *= sigma
        total[i] = z[i] + term[i]
        scale = max(scale, abs(z[i]))
    for k in range(2, 80):
        _linear_derivative(p, n, q, mask, term, next_term, False, column)
        largest = 0.0
        for i in range(size):
            term[i] = next_term[i] * (sigma / k)
            total[i] += term[i]
            largest = max(largest, abs(term[i]))
        if largest <= 1e-17 * scale:
            break
    for i in range(size):
        z[i] = total[i]


@njit(cache=True)
def _first_crossing(p, n, mask, z, length, coeff, column):
    """The first time in (0, length] at which x, from z in the regime, crosses a surface whose
    side at `length` differs from the regime's, and which surface (bit of the mask); (length, -1)
    where none does. On x's Taylor polynomial (coeff: (terms, 2n) scratch)."""
    d = 2 * n
    for i in range(d):
        coeff[0, i] = z[i]
    for k in range(1, coeff.shape[0]):  # coeff[k] = x^(k)(0) / k!
        _linear_derivative(p, n, 0, mask, coeff[k - 1], coeff[k], k == 1, column)
        for i in range(d):
            coeff[k, i] /= k
    first, which = length, -1
    for c in range(d):
        level = p[n + c] if c < n else 0.0
        side = bool((mask >> c) & 1)
        if (_taylor_value(coeff, c, length) > level) == side:
            continue
        lo, hi = 0.0, length  # at lo on the regime's side, at hi not
        for it in range(100):
            mid = 0.5 * (lo + hi)
            value = _taylor_value(coeff, c, mid) - level
            if (value > 0.0) == side:
                lo = mid
            else:
                hi = mid
            if it >= 3:  # then Newton from the middle, where it lands inside the bracket
                slope = _taylor_slope(coeff, c, mid)
                guess = mid - value / slope if slope != 0.0 else lo
                if lo < guess < hi:
                    if (_taylor_value(coeff, c, guess) > level) == side:
                        lo = guess
                    else:
                        hi = guess
            if hi - lo <= 1e-15 * length:
                break
        if hi <= first:
            first, which = hi, c
    return first, which


@njit(cache=True)
def _taylor_value(coeff, c, t):
    value = 0.0
    for k in range(coeff.shape[0] - 1, -1, -1):
        value = value * t + coeff[k, c]
    return value


@njit(cache=True)
def _taylor_slope(coeff, c, t):
    slope = 0.0
    for k in range(coeff.shape[0] - 1, 0, -1):
        slope = slope * t + k * coeff[k, c]
    return slope


@njit(cache=True)
def solve_with_jacobian_into(p, x0, n, times, rtol, atol, max_steps, series, jac, column):
    """solve_into with the sensitivities: series (2n, T) and jac (2n, T, k) of one sample, the
    derivatives by the k targets that have a column (column[target]: its column in jac, -1
    none; a fit carries only its free targets' sensitivities). For compiled callers:
    solve_with_jacobian() below, raypd.lsq's fit. By the regimes' exact propagators (the fast
    path above); rtol, atol and max_steps apply where an interval goes to the stepper."""
    d = 2 * n
    D = d + 1
    n_p = 2 * n + 2 * n * n  # num_params(n)
    q = jac.shape[2]
    size = d * (1 + q)
    z, y = np.zeros(size), np.empty(size)
    for i in range(d):
        z[i] = x0[i]
        if column[n_p + i] >= 0:
            z[d + i * q + column[n_p + i]] = 1.0  # dx(0)/dx0 = I
    regimes = 1 << d
    built_for = np.full(regimes, np.nan)  # the h each regime's propagators are for
    E_h, E_sub = np.empty((regimes, D, D)), np.empty((regimes, D, D))
    G_h, G_sub = np.empty((regimes, q, d, D)), np.empty((regimes, q, d, D))
    forced = np.empty((regimes, q), dtype=np.bool_)
    X, scratch, z_start = np.empty(D), np.empty(d * q), np.empty(size)
    term, next_term, total = np.empty(size), np.empty(size), np.empty(size)
    coeff = np.empty((24, d))
    _record(p, n, q, True, z, series, jac, 0, column)
    for k in range(times.shape[0] - 1):
        h = times[k + 1] - times[k]
        mask = _regime(p, n, z)
        if built_for[mask] != h:
            _propagators(p, n, mask, h, E_h[mask], E_sub[mask], G_h[mask], G_sub[mask], forced[mask], column)
            built_for[mask] = h
        for i in range(d):
            X[i] = z[i]
        X[d] = 1.0
        # does x stay in the regime at the SUB_INTERVALS points?
        stays = True
        E = E_sub[mask]
        for i in range(D):
            y[i] = X[i]
        for _ in range(SUB_INTERVALS):
            _advance_state(E, y, term, d)
            y[:d] = term[:d]
            if _regime(p, n, y) != mask:
                stays = False
                break
        if stays:
            _propagate(E_h[mask], G_h[mask], forced[mask], z, X, scratch, d, q)
        else:
            z_start[:] = z
            sub = h / SUB_INTERVALS
            walked = True
            for _ in range(SUB_INTERVALS):
                left, crossings = sub, 0
                while walked:
                    if built_for[mask] != h:
                        _propagators(p, n, mask, h, E_h[mask], E_sub[mask], G_h[mask], G_sub[mask], forced[mask],
                                     column)
                        built_for[mask] = h
                    for i in range(d):
                        X[i] = z[i]
                    if left == sub:  # a whole sub-interval: if its end is in the regime, in one product
                        _advance_state(E_sub[mask], X, y, d)
                        if _regime(p, n, y) == mask:
                            _propagate(E_sub[mask], G_sub[mask], forced[mask], z, X, scratch, d, q)
                            break
                    sigma, surface = _first_crossing(p, n, mask, z, left, coeff, column)
                    _taylor_step(p, n, q, mask, z, sigma, term, next_term, total, column)
                    if surface < 0:
                        break
                    mask ^= 1 << surface  # on the surface: the regime on its other side
                    left -= sigma
                    crossings += 1
                    if left <= 0.0:
                        break
                    if crossings > MAX_CROSSINGS:
                        walked = False
                if not walked:
                    break
            if not walked:  # the stepper, from the interval's start, with every target's column
                if not _step_interval(p, n, times[k:k + 2], rtol, atol, max_steps, z_start, z, series[:, k:k + 2],
                                      column):
                    return False
        largest = 0.0
        for i in range(d):
            largest = max(largest, abs(z[i]))
        if not (largest <= DIVERGENCE_BOUND):  # NaN counts as failed too
            return False
        _record(p, n, q, True, z, series, jac, k + 1, column)
    return True


@njit(cache=True)
def _step_interval(p, n, times, rtol, atol, max_steps, z_start, z, series, column):
    """z = [x, S] (S's columns: `column`'s) at times[1] from z_start at times[0], by the
    Dormand-Prince stepper with every target's sensitivity (S's columns are independent: the
    ones not carried start at 0 and are dropped); series (2n, 2) scratch."""
    d = 2 * n
    n_p = 2 * n + 2 * n * n
    q_all = n_p + d
    q = (z.shape[0] - d) // d
    size = d * (1 + q_all)
    full, K, y = np.zeros(size), np.empty((7, size)), np.empty(size)
    full[:d] = z_start[:d]
    for i in range(d):
        for t in range(q_all):
            if column[t] >= 0:
                full[d + i * q_all + t] = z_start[d + i * q + column[t]]
    jac = np.empty((d, 2, q_all))
    if not _dormand_prince(p, n, True, times, rtol, atol, max_steps, full, K, y, series, jac):
        return False
    z[:d] = full[:d]
    for t in range(q_all):
        c = column[t]
        if c >= 0:
            for i in range(d):
                z[d + i * q + c] = full[d + i * q_all + t]
    return True


@njit(cache=True)
def _solve_sens_batch(params, ic, n, times, rtol, atol, max_steps, series, jac, ok, column):
    for b in range(params.shape[0]):
        ok[b] = solve_with_jacobian_into(params[b], ic[b], n, times, rtol, atol, max_steps, series[b], jac[b], column)
        if not ok[b]:
            series[b, :, :] = np.nan
            jac[b, :, :, :] = np.nan


def solve_with_jacobian(params: np.ndarray, ic: np.ndarray, times: np.ndarray, n: int, rtol: float = 1e-8,
                        atol: float = 1e-10, max_steps: int = 200_000, targets: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """solve(), and the derivative of every observation with respect to every target (or to
    `targets` alone, indices into the layout, in their order: only their sensitivities are
    carried, as a fit carries its free targets'), by the regimes' exact propagators (above):
    the series differs from solve()'s by solve()'s own error (the propagators' is ~1e-12),
    the stepper's tolerances rtol, atol and max_steps apply only to an interval that grazes
    a surface.

    Returns (series (B, 2n, T), jac (B, 2n, T, k), ok (B,)); k = len(targets), by default
    q = num_params(n) + num_ic(n), targets in layout order (params then initial conditions);
    NaN rows where not ok.
    """
    params = np.ascontiguousarray(params, dtype=np.float64).reshape(-1, num_params(n))
    ic = np.ascontiguousarray(ic, dtype=np.float64).reshape(-1, num_ic(n))
    times = np.ascontiguousarray(times, dtype=np.float64)
    q = num_params(n) + num_ic(n)
    targets = np.arange(q) if targets is None else np.asarray(targets, dtype=np.int64)
    column = np.full(q, -1, dtype=np.int64)  # each target's column in jac
    column[targets] = np.arange(targets.size)
    series = np.empty((params.shape[0], 2 * n, times.shape[0]))
    jac = np.empty((params.shape[0], 2 * n, times.shape[0], targets.size))
    ok = np.empty(params.shape[0], dtype=np.bool_)
    _entry(n, 3)(params, ic, times, float(rtol), float(atol), int(max_steps), series, jac, ok, column)
    return series, jac, ok


# --------------------------------------------------------------------------- samples


@njit(cache=True)
def _draw_samples(seed, ids, lo, hi, n, times, rtol, atol, max_draws, max_steps, index, length,
                  params_out, ic_out, series_out, draws_out):
    """For each sample id: draw from its stream until a draw passes the stability filter and
    its solution stays bounded; keep that draw and its series (float32). Returns -1, or the
    position of the first sample that found none in max_draws draws."""
    n_p, width = 2 * n + 2 * n * n, lo.shape[0]
    d = 2 * n
    values = np.empty(width)
    series = np.empty((d, times.shape[0]))
    buf = np.empty(4, np.uint64)
    A, b, a = np.empty((n, n)), np.empty(n), np.empty(n)
    K, x, x_new = np.empty((7, d)), np.empty(d), np.empty(d)
    for s in range(ids.shape[0]):
        key1 = np.uint64(ids[s])
        counter = np.uint64(0)
        used = 4  # words of buf already read
        draws = 0
        while True:
            if draws >= max_draws:
                return s
            for w in range(width):
                if used == 4:
                    counter += _U1
                    _philox(seed, key1, counter, buf)
                    used = 0
                values[w] = lo[w] + (hi[w] - lo[w]) * (float(buf[used] >> _U11) * _TO_UNIT)
                used += 1
            draws += 1
            p = values[:n_p]
            if _stable(p, n, index, length, A, b, a) and solve_into(
                    p, values[n_p:], n, times, rtol, atol, max_steps, series, K, x, x_new):
                break
        params_out[s] = p
        ic_out[s] = values[n_p:]
        for i in range(d):
            for k in range(times.shape[0]):
                series_out[s, i, k] = series[i, k]
        draws_out[s] = draws
    return -1


def draw_samples(seed: int, sample_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int,
                 times: np.ndarray, rtol: float, atol: float, max_draws: int,
                 max_steps: int = 200_000) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Samples `sample_ids` of the dataset with this seed and these sampling ranges.

    Returns (columns sample_id, params, ic, series float32 (B, 2n, T); draws per sample;
    position of the first sample that found no stable, bounded draw in max_draws, or -1).
    """
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
    times = np.ascontiguousarray(times, dtype=np.float64)
    count = ids.shape[0]
    cols = {"sample_id": ids,
            "params": np.empty((count, num_params(n))),
            "ic": np.empty((count, num_ic(n))),
            "series": np.empty((count, 2 * n, times.shape[0]), dtype=np.float32)}
    draws = np.zeros(count, dtype=np.int64)
    failed = _entry(n, 2)(np.uint64(seed), ids, np.ascontiguousarray(lo, dtype=np.float64),
                          np.ascontiguousarray(hi, dtype=np.float64), times, float(rtol),
                          float(atol), int(max_draws), int(max_steps), *_regime_table(n),
                          cols["params"], cols["ic"], cols["series"], draws)
    return cols, draws, int(failed)


# --------------------------------------------------------------------------- entry points
#
# Compiled code called with n as a constant is compiled for that n (numba types the constant
# as a literal and passes it down), so every loop over the state has a fixed length and
# unrolls (~1.5x faster than a run-time n). A Python int argument would not be a literal:
# hence one small entry point per n, each compiled (and cached) the first time it is used.


@njit(cache=True)
def _stable_batch_1(params, index, length, out):
    _stable_batch(params, 1, index, length, out)


@njit(cache=True)
def _stable_batch_2(params, index, length, out):
    _stable_batch(params, 2, index, length, out)


@njit(cache=True)
def _stable_batch_3(params, index, length, out):
    _stable_batch(params, 3, index, length, out)


@njit(cache=True)
def _solve_batch_1(params, ic, times, rtol, atol, max_steps, series, ok):
    _solve_batch(params, ic, 1, times, rtol, atol, max_steps, series, ok)


@njit(cache=True)
def _solve_batch_2(params, ic, times, rtol, atol, max_steps, series, ok):
    _solve_batch(params, ic, 2, times, rtol, atol, max_steps, series, ok)


@njit(cache=True)
def _solve_batch_3(params, ic, times, rtol, atol, max_steps, series, ok):
    _solve_batch(params, ic, 3, times, rtol, atol, max_steps, series, ok)


@njit(cache=True)
def _solve_sens_batch_1(params, ic, times, rtol, atol, max_steps, series, jac, ok, column):
    _solve_sens_batch(params, ic, 1, times, rtol, atol, max_steps, series, jac, ok, column)


@njit(cache=True)
def _solve_sens_batch_2(params, ic, times, rtol, atol, max_steps, series, jac, ok, column):
    _solve_sens_batch(params, ic, 2, times, rtol, atol, max_steps, series, jac, ok, column)


@njit(cache=True)
def _solve_sens_batch_3(params, ic, times, rtol, atol, max_steps, series, jac, ok, column):
    _solve_sens_batch(params, ic, 3, times, rtol, atol, max_steps, series, jac, ok, column)


@njit(cache=True)
def _draw_samples_1(seed, ids, lo, hi, times, rtol, atol, max_draws, max_steps, index, length,
                    params_out, ic_out, series_out, draws_out):
    return _draw_samples(seed, ids, lo, hi, 1, times, rtol, atol, max_draws, max_steps, index, length,
                         params_out, ic_out, series_out, draws_out)


@njit(cache=True)
def _draw_samples_2(seed, ids, lo, hi, times, rtol, atol, max_draws, max_steps, index, length,
                    params_out, ic_out, series_out, draws_out):
    return _draw_samples(seed, ids, lo, hi, 2, times, rtol, atol, max_draws, max_steps, index, length,
                         params_out, ic_out, series_out, draws_out)


@njit(cache=True)
def _draw_samples_3(seed, ids, lo, hi, times, rtol, atol, max_draws, max_steps, index, length,
                    params_out, ic_out, series_out, draws_out):
    return _draw_samples(seed, ids, lo, hi, 3, times, rtol, atol, max_draws, max_steps, index, length,
                         params_out, ic_out, series_out, draws_out)


_ENTRY = {1: (_stable_batch_1, _solve_batch_1, _draw_samples_1, _solve_sens_batch_1),
          2: (_stable_batch_2, _solve_batch_2, _draw_samples_2, _solve_sens_batch_2),
          3: (_stable_batch_3, _solve_batch_3, _draw_samples_3, _solve_sens_batch_3)}


def _entry(n: int, which: int):
    if n not in _ENTRY:
        raise ValueError(f"n_actions must be 1, 2 or 3 (got {n})")
    return _ENTRY[n][which]


def warm_up(n: int = 1) -> float:
    """Load (or, the first time, compile and cache) this module's compiled functions for n
    actions in this process; returns the seconds it took. Later calls cost nothing."""
    start = time.perf_counter()
    times = np.linspace(0.0, 1.0, 3)
    lo = np.concatenate([np.ones(n), -np.ones(n), np.eye(n).ravel(), np.eye(n).ravel(), np.zeros(2 * n)])
    draw_samples(0, np.arange(1), lo, lo, n, times, 1e-6, 1e-8, 1)
    solve(lo[None, : num_params(n)], lo[None, num_params(n) :], times, n)
    is_stable(Params.unpack(lo[None, : num_params(n)], n))
    sample_uniforms(0, 0, 1)
    return time.perf_counter() - start
