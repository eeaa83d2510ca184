"""Refinement's inner loop, compiled: the bounded least-squares fit of the ODE to one series.

raypd.refine fits an observed series (2n, W) by least squares over the free targets x
(parameters, then initial conditions; the others held at the model's estimate):

    r(x) = (solve(theta(x))[c, t] - observed[c, t]) * weights[c],   minimise |r|^2 / 2

within the targets' bounds. The algorithm is scipy's least_squares(method="trf",
x_scale="jac"), step for step (Branch, Coleman & Li's trust-region reflective method: Coleman
and Li's scaling by the distance to the bound the gradient points to, More's trust-region
step, then the best of that step stopped short of the bound, its reflection off it, and the
Cauchy step), ported to numba so that every iteration of a fit runs in one compiled call. In
scipy about half of a fit's time was its own Python per iteration (an SVD of the 1,206 x 27
Jacobian, the trust-region bookkeeping).

What differs is how J enters: only through its normal matrix J^T J and the gradient J^T r,
accumulated from the forward sensitivities (ode.solve_with_jacobian_into's, which carries only
the free targets': mu fixed, 27 of 30 columns at n=3, 3-7% less time per n=3 series) without
forming J, and computed only where a step is accepted (a trial point needs
the state's solve alone). J's singular values and right singular vectors, which the trust-
region step needs, are the square roots of the eigenvalues and the eigenvectors of the (at
most 27 x 27) normal matrix; they lose digits where J is nearly rank-deficient (below about
1e-8 of the largest singular value), where the step is damped anyway.

raypd's own stop rules come on top of least_squares' ftol, xtol and gtol: a fit stops at the
first point whose relative RMS residual is at most stop_rms (an exact fit: more iterations
would polish the solver's error) and, with give_up_after > 0, when that many evaluations
have not brought it under give_up_rms. A solve that diverges or hits the step limit gives a
flat residual of 1e3 (and a zero Jacobian), which sends the fit back.

numba caches this module's compiled code by this file's time stamp, and that code has
raypd.ode's solver compiled into it: after editing ode.py, touch this file (or delete
raypd/__pycache__), or the fit keeps the old solver.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from raypd import ode

FAILED_RESIDUAL = 1e3  # each residual of a solve that failed


@njit(cache=True, error_model="numpy")  # x / 0 is inf (or NaN), as in numpy, not an exception
def _residual(p, ic, n, times, rtol, atol, max_steps, observed, weights, series, K, xs, ys, r):
    """r (2n, W) = weighted residual of the solve at (p, ic); returns its sum of squares."""
    ok = ode.solve_into(p, ic, n, times, rtol, atol, max_steps, series, K, xs, ys)
    total = 0.0
    for c in range(2 * n):
        for t in range(times.shape[0]):
            value = (series[c, t] - observed[c, t]) * weights[c] if ok else FAILED_RESIDUAL
            r[c, t] = value
            total += value * value
    if not total < np.inf:  # NaN or inf: a failed solve
        for c in range(2 * n):
            for t in range(times.shape[0]):
                r[c, t] = FAILED_RESIDUAL
        total = FAILED_RESIDUAL * FAILED_RESIDUAL * r.size
    return total


@njit(cache=True, error_model="numpy")
def _normal_equations(p, ic, n, times, rtol, atol, max_steps, weights, column, r, series, jac, A, g):
    """A = J^T J and g = J^T r over the free targets from their sensitivities at (p, ic) (jac's
    columns: column[target] the free target's, -1 for the others), r the residual there; zero
    where the solve fails."""
    ok = ode.solve_with_jacobian_into(p, ic, n, times, rtol, atol, max_steps, series, jac, column)
    k = jac.shape[2]
    for a in range(k):
        g[a] = 0.0
        for b in range(k):
            A[a, b] = 0.0
    if not ok:
        return
    for c in range(2 * n):
        w2 = weights[c] * weights[c]
        for t in range(times.shape[0]):
            row = jac[c, t]
            for a in range(k):
                ja = row[a]
                if ja == 0.0:
                    continue
                g[a] += weights[c] * ja * r[c, t]
                wa = w2 * ja
                for b in range(a + 1):
                    A[a, b] += wa * row[b]
    for a in range(k):
        for b in range(a):
            A[b, a] = A[a, b]


@njit(cache=True, error_model="numpy")
def _quadratic(B, diag, g, s, s0):
    """(a, b, c) of the model along s from s0, m(s0 + t s) = a t^2 + b t + c, where
    m(p) = p.(B + diag(diag)).p / 2 + g.p (least_squares' build_quadratic_1d with its J^T J)."""
    k = g.shape[0]
    a, b, c = 0.0, 0.0, 0.0
    for i in range(k):
        Bs, Bs0 = 0.0, 0.0
        for j in range(k):
            Bs += B[i, j] * s[j]
            Bs0 += B[i, j] * s0[j]
        a += s[i] * (Bs + diag[i] * s[i])
        b += g[i] * s[i] + s0[i] * (Bs + diag[i] * s[i])
        c += 0.5 * s0[i] * (Bs0 + diag[i] * s0[i]) + g[i] * s0[i]
    return 0.5 * a, b, c


@njit(cache=True, error_model="numpy")
def _minimise_1d(a, b, lower, upper, c):
    """The t in [lower, upper] minimising a t^2 + b t + c, and that minimum (minimize_quadratic_1d)."""
    best_t, best = lower, lower * (a * lower + b) + c
    value = upper * (a * upper + b) + c
    if value < best:
        best_t, best = upper, value
    if a != 0.0:
        t = -0.5 * b / a
        if lower < t < upper:
            value = t * (a * t + b) + c
            if value < best:
                best_t, best = t, value
    return best_t, best


@njit(cache=True, error_model="numpy")
def _to_bound(x, s, lo, hi, hits):
    """The step length along s to the nearest bound, and hits[i] = sign(s_i) where s_i reaches
    it there (step_size_to_bound)."""
    k = x.shape[0]
    smallest = np.inf
    for i in range(k):
        if s[i] != 0.0:
            smallest = min(smallest, max((lo[i] - x[i]) / s[i], (hi[i] - x[i]) / s[i]))
    for i in range(k):
        hits[i] = 0.0
        if s[i] != 0.0 and max((lo[i] - x[i]) / s[i], (hi[i] - x[i]) / s[i]) == smallest:
            hits[i] = 1.0 if s[i] > 0.0 else -1.0
    return smallest


@njit(cache=True, error_model="numpy")
def _trust_region_step(suf, s, V, delta, alpha, rows, p):
    """p minimising |J p + f| within |p| <= delta, J's singular values s (descending), right
    singular vectors V's columns and suf = s * U^T f (least_squares' solve_lsq_trust_region,
    More's secular equation); returns the Levenberg-Marquardt parameter alpha."""
    k = s.shape[0]
    eps = np.finfo(np.float64).eps
    full_rank = s[k - 1] > eps * rows * s[0]
    if full_rank:
        norm = 0.0
        for i in range(k):
            value = 0.0
            for j in range(k):
                value += V[i, j] * suf[j] / (s[j] * s[j])
            p[i] = -value
            norm += value * value
        if np.sqrt(norm) <= delta:
            return 0.0
    suf_norm = 0.0
    for j in range(k):
        suf_norm += suf[j] * suf[j]
    upper = np.sqrt(suf_norm) / delta
    lower = 0.0
    if full_rank:
        phi, phi_prime = _phi(0.0, suf, s, delta)
        lower = -phi / phi_prime
    if alpha == 0.0 and not full_rank:
        alpha = max(0.001 * upper, np.sqrt(lower * upper))
    for _ in range(10):
        if alpha < lower or alpha > upper:
            alpha = max(0.001 * upper, np.sqrt(lower * upper))
        phi, phi_prime = _phi(alpha, suf, s, delta)
        if phi < 0.0:
            upper = alpha
        ratio = phi / phi_prime
        lower = max(lower, alpha - ratio)
        alpha -= (phi + delta) * ratio / delta
        if abs(phi) < 0.01 * delta:
            break
    norm = 0.0
    for i in range(k):
        value = 0.0
        for j in range(k):
            value += V[i, j] * suf[j] / (s[j] * s[j] + alpha)
        p[i] = -value
        norm += value * value
    norm = np.sqrt(norm)
    for i in range(k):
        p[i] *= delta / norm
    return alpha


@njit(cache=True, error_model="numpy")
def _phi(alpha, suf, s, delta):
    """|p(alpha)| - delta and its derivative in alpha (the secular equation)."""
    norm, derivative = 0.0, 0.0
    for j in range(s.shape[0]):
        denominator = s[j] * s[j] + alpha
        norm += (suf[j] / denominator) ** 2
        derivative += suf[j] * suf[j] / denominator**3
    norm = np.sqrt(norm)
    return norm - delta, -derivative / norm


@njit(cache=True, error_model="numpy")
def _select_step(x, B, diag_h, g_h, p, p_h, d, delta, lo, hi, theta, step, step_h, work):
    """least_squares' select_step: the trust-region step p (p_h scaled) where it stays in the
    box; else the best, by the quadratic model, of that step stopped short of the bound it
    crosses, its reflection off that bound, and the Cauchy step. Writes step, step_h; returns
    the model's predicted reduction."""
    k = x.shape[0]
    hits, r_h, r, zero = work[0], work[1], work[2], work[3]
    inside = True
    for i in range(k):
        if not (lo[i] <= x[i] + p[i] <= hi[i]):
            inside = False
    if inside:
        a, b, c = _quadratic(B, diag_h, g_h, p_h, zero)
        for i in range(k):
            step[i], step_h[i] = p[i], p_h[i]
        return -(a + b)
    p_stride = _to_bound(x, p, lo, hi, hits)
    for i in range(k):
        r_h[i] = -p_h[i] if hits[i] != 0.0 else p_h[i]
        r[i] = d[i] * r_h[i]
        p[i] *= p_stride
        p_h[i] *= p_stride
    on_bound = work[4]
    for i in range(k):
        on_bound[i] = x[i] + p[i]
    # the reflected direction leaves the trust region at to_tr
    aa, bb, cc = 0.0, 0.0, -delta * delta
    for i in range(k):
        aa += r_h[i] * r_h[i]
        bb += p_h[i] * r_h[i]
        cc += p_h[i] * p_h[i]
    cc = min(cc, 0.0)
    if aa > 0.0:
        root = np.sqrt(bb * bb - aa * cc)
        q = -(bb + (root if bb >= 0.0 else -root))
        to_tr = max(q / aa, cc / q) if q != 0.0 else 0.0
    else:
        to_tr = 0.0
    to_bound = _to_bound(on_bound, r, lo, hi, work[5])
    r_stride = min(to_bound, to_tr)
    if r_stride > 0.0:
        r_lower = (1.0 - theta) * p_stride / r_stride
        r_upper = theta * to_bound if r_stride == to_bound else to_tr
    else:
        r_lower, r_upper = 0.0, -1.0
    r_value = np.inf
    if r_lower <= r_upper:
        a, b, c = _quadratic(B, diag_h, g_h, r_h, p_h)
        t, r_value = _minimise_1d(a, b, r_lower, r_upper, c)
        for i in range(k):
            r_h[i] = r_h[i] * t + p_h[i]
            r[i] = r_h[i] * d[i]
    for i in range(k):
        p[i] *= theta
        p_h[i] *= theta
    a, b, c = _quadratic(B, diag_h, g_h, p_h, zero)
    p_value = a + b
    ag_h, ag = work[6], work[7]
    norm = 0.0
    for i in range(k):
        ag_h[i] = -g_h[i]
        ag[i] = d[i] * ag_h[i]
        norm += g_h[i] * g_h[i]
    to_tr = delta / np.sqrt(norm)
    to_bound = _to_bound(x, ag, lo, hi, work[5])
    ag_stride = theta * to_bound if to_bound < to_tr else to_tr
    a, b, c = _quadratic(B, diag_h, g_h, ag_h, zero)
    t, ag_value = _minimise_1d(a, b, 0.0, ag_stride, 0.0)
    if p_value < r_value and p_value < ag_value:
        for i in range(k):
            step[i], step_h[i] = p[i], p_h[i]
        return -p_value
    if r_value < p_value and r_value < ag_value:
        for i in range(k):
            step[i], step_h[i] = r[i], r_h[i]
        return -r_value
    for i in range(k):
        step[i], step_h[i] = ag[i] * t, ag_h[i] * t
    return -ag_value


@njit(cache=True, error_model="numpy")
def _fit(theta, n, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
         give_up_after, give_up_rms, ftol, xtol, gtol, counts):
    """Fit x (the free targets `index` of theta = [params, ic]) in place, from x (strictly
    inside [lo, hi]): scipy's least_squares(method="trf", x_scale="jac", tr_solver="exact")
    step for step, with J's singular values from the eigenvalues of its normal matrix. Returns
    the relative RMS residual; counts[:] = residual evaluations, sensitivity evaluations."""
    d_, n_p, steps_t = 2 * n, 2 * n + 2 * n * n, times.shape[0]
    k = index.shape[0]
    series, jac = np.empty((d_, steps_t)), np.empty((d_, steps_t, k))  # the free targets' sensitivities
    column = np.full(n_p + d_, -1)  # each target's column in jac
    for a in range(k):
        column[index[a]] = a
    K, xs, ys = np.empty((7, d_)), np.empty(d_), np.empty(d_)
    r, r_new = np.empty((d_, steps_t)), np.empty((d_, steps_t))
    A, g, C = np.empty((k, k)), np.empty(k), np.empty((k, k))
    scale_inv, v, dv, d, diag_h, g_h = (np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k),
                                        np.empty(k))
    p, p_h, step, step_h, x_new, suf = np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k)
    work = np.zeros((8, k))
    trial = theta.copy()
    for a in range(k):
        trial[index[a]] = x[a]
    count = d_ * steps_t
    cost = 0.5 * _residual(trial[:n_p], trial[n_p:], n, times, rtol, atol, max_steps, observed, weights,
                           series, K, xs, ys, r)
    nfev, njev = 1, 0
    if np.sqrt(2.0 * cost / count) <= stop_rms:
        counts[0], counts[1] = nfev, njev
        return np.sqrt(2.0 * cost / count)
    _normal_equations(trial[:n_p], trial[n_p:], n, times, rtol, atol, max_steps, weights, column, r,
                      series, jac, A, g)
    njev += 1
    for a in range(k):
        scale_inv[a] = np.sqrt(A[a, a]) if A[a, a] > 0.0 else 1.0
    _cl_scaling(x, g, lo, hi, v, dv)
    delta = 0.0
    for a in range(k):
        value = v[a] * scale_inv[a] if dv[a] != 0.0 else v[a]
        delta += x[a] * x[a] * scale_inv[a] * scale_inv[a] / value
    delta = np.sqrt(delta) if delta > 0.0 else 1.0
    alpha = 0.0
    stop = False
    while not stop:
        _cl_scaling(x, g, lo, hi, v, dv)
        g_norm = 0.0
        for a in range(k):
            g_norm = max(g_norm, abs(g[a] * v[a]))
        if g_norm < gtol or nfev >= max_nfev:
            break
        for a in range(k):
            if dv[a] != 0.0:
                v[a] *= scale_inv[a]
            d[a] = np.sqrt(v[a]) / scale_inv[a]
            diag_h[a] = g[a] * dv[a] / scale_inv[a]
            g_h[a] = d[a] * g[a]
        for a in range(k):  # the normal matrix of [J d; diag(diag_h)^1/2]
            for b in range(k):
                C[a, b] = d[a] * A[a, b] * d[b]
        for a in range(k):
            C[a, a] += diag_h[a]
        eigenvalues, vectors = np.linalg.eigh(C)  # ascending; least_squares' SVD has them descending
        V = vectors[:, ::-1].copy()
        s = np.sqrt(np.maximum(eigenvalues[::-1], 0.0))
        for j in range(k):  # s * U^T f = V^T J_h^T f = V^T g_h
            value = 0.0
            for i in range(k):
                value += V[i, j] * g_h[i]
            suf[j] = value
        B = C.copy()  # J_h^T J_h: C less diag_h
        for a in range(k):
            B[a, a] -= diag_h[a]
        theta_back = max(0.995, 1.0 - g_norm)
        reduction = -1.0
        accepted = False
        while reduction <= 0.0 and nfev < max_nfev:
            alpha = _trust_region_step(suf, s, V, delta, alpha, count + k, p_h)
            for a in range(k):
                p[a] = d[a] * p_h[a]
            predicted = _select_step(x, B, diag_h, g_h, p, p_h, d, delta, lo, hi, theta_back, step, step_h, work)
            finite = np.isfinite(predicted)
            for a in range(k):
                finite = finite and np.isfinite(step[a])
            if not finite:  # a degenerate trust-region problem (0 / 0): x is as good as it gets
                stop = True
                break
            for a in range(k):
                value = x[a] + step[a]
                if value <= lo[a]:  # make_strictly_feasible(rstep=0)
                    value = np.nextafter(lo[a], hi[a])
                elif value >= hi[a]:
                    value = np.nextafter(hi[a], lo[a])
                x_new[a] = value
                trial[index[a]] = value
            cost_new = 0.5 * _residual(trial[:n_p], trial[n_p:], n, times, rtol, atol, max_steps, observed,
                                       weights, series, K, xs, ys, r_new)
            nfev += 1
            step_h_norm, step_norm, x_norm = 0.0, 0.0, 0.0
            for a in range(k):
                step_h_norm += step_h[a] * step_h[a]
                step_norm += step[a] * step[a]
                x_norm += x[a] * x[a]
            step_h_norm, step_norm, x_norm = np.sqrt(step_h_norm), np.sqrt(step_norm), np.sqrt(x_norm)
            reduction = cost - cost_new
            if predicted > 0.0:
                ratio = reduction / predicted
            elif predicted == 0.0 and reduction == 0.0:
                ratio = 1.0
            else:
                ratio = 0.0
            new_delta = delta
            if ratio < 0.25:
                new_delta = 0.25 * step_h_norm
            elif ratio > 0.75 and step_h_norm > 0.95 * delta:
                new_delta = 2.0 * delta
            if reduction > 0.0:
                accepted = True
                for a in range(k):
                    x[a] = x_new[a]
                cost = cost_new
                r, r_new = r_new, r
            rms = np.sqrt(2.0 * cost / count)
            # raypd's stop rules, then least_squares' ftol and xtol tests
            if rms <= stop_rms or (give_up_after > 0 and nfev >= give_up_after and rms > give_up_rms):
                stop = True
            if (reduction < ftol * (cost + max(reduction, 0.0)) and ratio > 0.25) or \
                    step_norm < xtol * (xtol + x_norm):
                stop = True
            if stop:
                break
            if new_delta > 0.0:
                alpha *= delta / new_delta
            delta = new_delta
        if stop or not accepted:  # not accepted: max_nfev evaluations
            break
        _normal_equations(trial[:n_p], trial[n_p:], n, times, rtol, atol, max_steps, weights, column, r,
                          series, jac, A, g)
        njev += 1
        for a in range(k):
            scale_inv[a] = max(scale_inv[a], np.sqrt(A[a, a]))
    counts[0], counts[1] = nfev, njev
    return np.sqrt(2.0 * cost / count)


@njit(cache=True, error_model="numpy")
def _cl_scaling(x, g, lo, hi, v, dv):
    """Coleman and Li's scaling: v = distance to the bound the gradient points to (1 where none)."""
    for a in range(x.shape[0]):
        v[a], dv[a] = 1.0, 0.0
        if g[a] < 0.0:
            v[a], dv[a] = hi[a] - x[a], -1.0
        elif g[a] > 0.0:
            v[a], dv[a] = x[a] - lo[a], 1.0


@njit(cache=True, error_model="numpy")
def _fit_1(theta, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
           give_up_after, give_up_rms, ftol, xtol, gtol, counts):
    return _fit(theta, 1, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
                give_up_after, give_up_rms, ftol, xtol, gtol, counts)


@njit(cache=True, error_model="numpy")
def _fit_2(theta, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
           give_up_after, give_up_rms, ftol, xtol, gtol, counts):
    return _fit(theta, 2, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
                give_up_after, give_up_rms, ftol, xtol, gtol, counts)


@njit(cache=True, error_model="numpy")
def _fit_3(theta, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
           give_up_after, give_up_rms, ftol, xtol, gtol, counts):
    return _fit(theta, 3, index, lo, hi, observed, weights, times, rtol, atol, max_steps, x, max_nfev, stop_rms,
                give_up_after, give_up_rms, ftol, xtol, gtol, counts)


_ENTRY = {1: _fit_1, 2: _fit_2, 3: _fit_3}


def fit(theta: np.ndarray, free: np.ndarray, lower: np.ndarray, upper: np.ndarray, observed: np.ndarray,
        weights: np.ndarray, times: np.ndarray, n: int, x0: np.ndarray, rtol: float = 1e-8, atol: float = 1e-10,
        max_nfev: int = 60, stop_rms: float = 0.0, give_up_after: int = 0, give_up_rms: float = np.inf,
        ftol: float = 1e-12, xtol: float = 1e-12, max_steps: int = 200_000, gtol: float = 1e-12) -> tuple[np.ndarray, float, int, int]:
    """Fit the free targets (`free`, bool over theta = [params, ic]; the others held at theta's
    values) of the series observed (2n, W) at times (W,), weighted per channel (weights (2n,)),
    from x0 (inside [lower, upper], the free targets' bounds). Returns (x, its relative RMS
    residual, residual evaluations, sensitivity evaluations)."""
    x = np.array(x0, dtype=np.float64)
    counts = np.zeros(2, dtype=np.int64)
    rms = _ENTRY[n](np.ascontiguousarray(theta, dtype=np.float64), np.flatnonzero(free).astype(np.int64),
                    np.ascontiguousarray(lower, dtype=np.float64), np.ascontiguousarray(upper, dtype=np.float64),
                    np.ascontiguousarray(observed, dtype=np.float64),
                    np.ascontiguousarray(weights, dtype=np.float64).ravel(),
                    np.ascontiguousarray(times, dtype=np.float64), float(rtol), float(atol), int(max_steps), x,
                    int(max_nfev), float(stop_rms), int(give_up_after), float(give_up_rms), float(ftol),
                    float(xtol), float(gtol), counts)
    return x, float(rms), int(counts[0]), int(counts[1])


def warm_up(n: int) -> None:
    """Load (or, the first time, compile and cache) the fit for n actions in this process, and
    ode.solve_with_jacobian (refine's decisions after a fit)."""
    theta = np.zeros(ode.num_params(n) + ode.num_ic(n))
    ode.solve_with_jacobian(theta[None, :ode.num_params(n)], theta[None, ode.num_params(n):], np.linspace(0.0, 1.0, 3), n)
    free = np.zeros(theta.size, dtype=bool)
    free[0] = True
    fit(theta, free, -np.ones(1), np.ones(1), np.zeros((2 * n, 3)), np.ones(2 * n), np.linspace(0.0, 1.0, 3), n,
        np.zeros(1), max_nfev=2)
