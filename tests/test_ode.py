"""raypd.ode against independent references: scipy DOP853, closed forms, a loop-per-sample
stability filter, and hand-built stable and unstable systems."""

import numpy as np
import pytest

from raypd import ode
from raypd.config import DataConfig
from tests.conftest import TIMES, stable_draws
from tests.reference import dop853_jacobian_column, dop853_series, split, stable_one

def relative_errors(params, ic, series, n, **tol):
    out = []
    for p, x0, s in zip(params, ic, series):
        ref = dop853_series(p, x0, TIMES, n, **tol)
        out.append(np.abs(s - ref).max() / max(np.abs(ref).max(), 1e-12))
    return np.array(out)


# --------------------------------------------------------------------------- accuracy


def test_n1_matches_dop853_to_1e3_of_scale():
    params, ic, series = stable_draws(1, 60, seed=1)
    err = relative_errors(params, ic, series, 1)
    assert err.max() < 1e-3, err.max()
    assert np.median(err) < 1e-6  # typically ~5e-9: the bound above is not a loose fit


@pytest.mark.parametrize("n, count", [(2, 30), (3, 15)])
def test_n2_n3_match_dop853_where_the_problem_is_well_conditioned(n, count):
    """Some n>=2 systems are (nearly) chaotic: a relative nudge of 1e-9 to the initial
    conditions moves their series by percents, and no solver at rtol 1e-8 follows them.
    On the others we ask for 1e-2 (the issue's aim) and a typical error far below."""
    params, ic, series = stable_draws(n, count, seed=2)
    err = relative_errors(params, ic, series, n, rtol=1e-12, atol=1e-14)
    nudge = np.array([
        np.abs(dop853_series(p, x0 * (1 + 1e-9), TIMES, n, rtol=1e-12, atol=1e-14)
               - dop853_series(p, x0, TIMES, n, rtol=1e-12, atol=1e-14)).max()
        / np.abs(s).max() for p, x0, s in zip(params, ic, series)])
    well_conditioned = nudge < 1e-6
    assert well_conditioned.sum() >= count // 2
    assert err[well_conditioned].max() < 1e-2, err[well_conditioned].max()
    assert np.median(err) < 1e-4


def test_n1_closed_form_before_m_crosses_zero():
    """With m < 0, a = 0: v' = g, so v = v0 + g t, and m' = max(v, mu) integrates exactly.
    g = 0: v stays constant and m grows linearly; g > 0: m is piecewise quadratic."""
    times = np.linspace(0.0, 2.0, 41)
    # g, mu, Pi, Gamma | v0, m0
    cases = np.array([[0.0, -1.0, 1.5, 0.7, 0.8, -2.0],
                      [0.0, -0.5, 1.0, 1.0, -3.0, -1.9],   # v < mu: m' = mu
                      [0.5, -2.0, 1.0, 2.0, -3.0, -4.0]])  # v crosses mu at t = 2
    series, ok = ode.solve(cases[:, :4], cases[:, 4:], times, 1)
    assert ok.all()
    for (g, mu, _, _, v0, m0), s in zip(cases, series):
        v = v0 + g * times
        # integral of max(v0 + g s, mu) ds from 0 to t
        if g == 0:
            m = m0 + max(v0, mu) * times
        else:
            t_c = (mu - v0) / g  # v reaches mu
            below = np.minimum(times, max(t_c, 0.0))
            above = times - below
            m = m0 + mu * below + (v0 + g * below) * above + 0.5 * g * above**2
        assert (m < 0).all()
        np.testing.assert_allclose(s[0], np.maximum(v, mu), rtol=0, atol=1e-9)
        np.testing.assert_allclose(s[1], 0.0, atol=0)
        # the hidden m is not observed; a = 0 here, and m < 0 is what the check above needs


def test_n1_closed_form_through_the_crossing():
    """g = 0, v0 > 0, m0 < 0: m = m0 + v0 t reaches 0 at t* = -m0 / v0; from there, while
    m > 0 and v > mu, the system is linear: x(t) = expm(A (t - t*)) [v0, 0] with
    A = [[0, -Pi], [1, -Gamma]]."""
    from scipy.linalg import expm

    Pi, Gamma, v0, m0 = 1.0, 1.0, 2.0, -3.0
    times = np.linspace(0.0, 3.0, 301)
    series, ok = ode.solve(np.array([[0.0, -1.0, Pi, Gamma]]), np.array([[v0, m0]]), times, 1)
    assert ok.all()
    t_star = -m0 / v0
    before = times <= t_star
    np.testing.assert_allclose(series[0, 0, before], v0, atol=1e-12)
    np.testing.assert_allclose(series[0, 1, before], 0.0, atol=1e-12)
    A = np.array([[0.0, -Pi], [1.0, -Gamma]])
    exact = np.array([expm(A * (t - t_star)) @ [v0, 0.0] for t in times[~before]])
    assert (exact[:, 1] > 0).all() and (exact[:, 0] > -1.0).all()  # still in that regime
    np.testing.assert_allclose(series[0, :, ~before], exact, atol=1e-6)


def test_n1_sensitivity_through_the_crossing_is_the_time_shift():
    """The case above: with g = 0, v stays at v0 until m reaches 0 at t* = -m0 / v0, so raising
    m0 by e moves the whole trajectory after t* earlier by e / v0: d x(t) / d m0 = x'(t) / v0
    = A x(t) / v0 there, and 0 before (a = 0, u = v0). The crossing falls between observation
    times (t* = 1.55), where solve_with_jacobian cuts its interval at the crossing."""
    from scipy.linalg import expm

    Pi, Gamma, v0, m0 = 1.0, 1.0, 2.0, -3.1
    times = np.linspace(0.0, 3.0, 31)
    series, jac, ok = ode.solve_with_jacobian(np.array([[0.0, -1.0, Pi, Gamma]]), np.array([[v0, m0]]), times, 1)
    assert ok.all()
    t_star = -m0 / v0
    before = times < t_star
    A = np.array([[0.0, -Pi], [1.0, -Gamma]])
    x = np.array([expm(A * (t - t_star)) @ [v0, 0.0] for t in times[~before]])
    assert (x[:, 1] > 0).all() and (x[:, 0] > -1.0).all()  # still in that regime
    np.testing.assert_allclose(series[0, :, ~before], x, atol=1e-9)
    d_m0 = 5  # targets: g, mu, Pi, Gamma, v0, m0
    np.testing.assert_allclose(jac[0, :, before, d_m0], 0.0, atol=1e-12)
    np.testing.assert_allclose(jac[0, :, ~before, d_m0], x @ A.T / v0, atol=1e-9)


def test_the_sensitivity_solve_follows_dop853_through_many_regime_switches():
    """n=3 systems that switch regime in many observation intervals (counted on a grid 16x
    finer): solve_with_jacobian's state (the regimes' exact propagators, crossings found
    between the points) against DOP853 at rtol 1e-12, and on the one that switches most, its
    Jacobian against DOP853's central differences (8 targets across the layout: the DOP853
    solves of this system take a second each)."""
    n = 3
    params, ic, _ = stable_draws(n, 15, seed=2)
    fine = np.linspace(TIMES[0], TIMES[-1], 16 * (TIMES.size - 1) + 1)
    obs, _ = ode.solve(params, ic, fine, n, 1e-12, 1e-14)
    regime = np.concatenate([obs[:, :n] > params[:, n:2 * n, None], obs[:, n:] > 0], axis=1)
    changed = (regime[:, :, 1:] != regime[:, :, :-1]).any(axis=1).reshape(len(params), TIMES.size - 1, 16)
    switches = changed.any(axis=2).sum(axis=1)
    # chaotic ones (a relative nudge of 1e-9 to the initial state moves them) follow no solver
    nudged, _ = ode.solve(params, ic * (1 + 1e-9), TIMES, n, 1e-12, 1e-14)
    tight, _ = ode.solve(params, ic, TIMES, n, 1e-12, 1e-14)
    calm = np.abs(nudged - tight).max(axis=(1, 2)) / np.abs(tight).max(axis=(1, 2)) < 1e-7
    chosen = np.flatnonzero(calm)[np.argsort(switches[calm])[::-1][:3]]
    assert switches[chosen].min() >= 20, switches  # the crossing path is what this test is about
    series, jac, ok = ode.solve_with_jacobian(params[chosen], ic[chosen], TIMES, n)
    assert ok.all()
    err = relative_errors(params[chosen], ic[chosen], series, n, rtol=1e-12, atol=1e-14)
    assert err.max() < 1e-6, (err, switches[chosen])
    theta = np.concatenate([params[chosen[0]], ic[chosen[0]]])
    for c in (0, 3, 6, 10, 15, 20, 25, 29):
        fd = dop853_jacobian_column(theta, c, TIMES, n)
        scale = max(np.abs(fd).max(), 1e-3)
        e = np.abs(jac[0, :, :, c] - fd) / scale
        # central differences straddle a kink of max() at a point or two, and their own error
        # grows along this series to 1e-4 (against a Dormand-Prince integration of the
        # sensitivities at rtol 1e-13 this solve agrees to a median 1e-9): a wrong or missing
        # term, or a crossing put in the wrong place, would be O(1) from there on
        assert np.median(e) <= 5e-5 and np.quantile(e, 0.99) <= 1e-3, (c, np.median(e), e.max())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_fit_s_columns_are_the_whole_jacobian_s(n):
    """raypd.lsq's fit carries only the free targets' sensitivities (solve_with_jacobian_into
    with a column per free target, -1 for the others; `targets` here): S's columns are
    independent, so those columns are the whole solve's, bit for bit, in any order (here mu
    left out, and the rest reversed)."""
    params, ic, _ = stable_draws(n, 6, seed=5)
    q = ode.num_params(n) + ode.num_ic(n)
    free = np.ones(q, dtype=bool)
    free[n:2 * n] = False  # mu
    targets = np.flatnonzero(free)[::-1]
    series, jac, ok = ode.solve_with_jacobian(params, ic, TIMES, n, targets=targets)
    whole_series, whole_jac, whole_ok = ode.solve_with_jacobian(params, ic, TIMES, n)
    assert ok.all() and whole_ok.all() and jac.shape[-1] == targets.size
    assert np.array_equal(series, whole_series)
    assert np.array_equal(jac, whole_jac[..., targets])


def test_equilibrium_stays_put():
    """n=1: a* = g/Pi, u* = v* = Gamma a*; n=2 diagonal: two such copies."""
    g, Pi, Gamma, mu = 1.2, 0.8, 0.5, -1.0
    a = g / Pi
    p1 = np.array([[g, mu, Pi, Gamma]])
    x1 = np.array([[Gamma * a, a]])
    s1, ok1 = ode.solve(p1, x1, TIMES, 1)
    assert ok1.all()
    np.testing.assert_allclose(s1[0], np.repeat([[Gamma * a], [a]], TIMES.size, axis=1), atol=1e-12)

    g2, Pi2, Gamma2 = np.array([1.0, 2.0]), np.diag([0.5, 2.0]), np.diag([1.0, 0.25])
    a2 = np.linalg.solve(Pi2, g2)
    params = np.concatenate([g2, [-5.0, -5.0], Pi2.ravel(), Gamma2.ravel()])[None]
    x2 = np.concatenate([Gamma2 @ a2, a2])[None]
    s2, ok2 = ode.solve(params, x2, TIMES, 2)
    assert ok2.all()
    np.testing.assert_allclose(s2[0], np.repeat(x2.T, TIMES.size, axis=1), atol=1e-12)


def test_divergence_is_reported_not_returned():
    # Pi < 0 and Gamma < 0 make the n=1 system grow without bound (outside sampling ranges).
    series, ok = ode.solve(np.array([[1.0, -1.0, -1.0, -1.0]]), np.array([[1.0, 1.0]]), TIMES, 1)
    assert not ok[0] and np.isnan(series[0]).all()


def test_batch_composition_does_not_change_a_sample():
    params, ic, _ = stable_draws(2, 12, seed=3)
    full, _ = ode.solve(params, ic, TIMES, 2)
    for i in (0, 5, 11):
        alone, _ = ode.solve(params[i : i + 1], ic[i : i + 1], TIMES, 2)
        assert np.array_equal(alone[0], full[i])
    reversed_, _ = ode.solve(params[::-1], ic[::-1], TIMES, 2)
    assert np.array_equal(reversed_[::-1], full)


# --------------------------------------------------------------------------- stability


def params_of(n, g, mu, Pi, Gamma):
    return np.concatenate([np.ravel(g), np.ravel(mu), np.ravel(Pi), np.ravel(Gamma)])[None].astype(float)


@pytest.mark.parametrize("case, expected", [
    # damped oscillator around a* = g/Pi: stable
    ((1.0, -1.0, 1.0, 0.5), True),
    # g = 0: no equilibrium with a > 0 (and mu < 0 gives none on the fulfilled side): rejected
    ((0.0, -1.0, 1.0, 0.5), False),
    # Pi = Gamma = -1, g = -1: a* = 1, J = [[0,1],[1,1]] has eigenvalue 1.618 > |-0.618|
    ((-1.0, -2.0, -1.0, -1.0), False),
    # Pi = -1, Gamma = +1, g = -1: eigenvalues 0.618 and -1.618: the stable one dominates
    ((-1.0, -2.0, -1.0, 1.0), True),
])
def test_stability_n1_hand_built(case, expected):
    assert bool(ode.is_stable(ode.Params.unpack(params_of(1, *case), 1))[0]) is expected
    assert stable_one(params_of(1, *case)[0], 1) is expected


def test_stability_n2_hand_built():
    def verdict(g, mu, Pi, Gamma):
        return bool(ode.is_stable(ode.Params.unpack(params_of(2, g, mu, Pi, Gamma), 2))[0])

    # two independent damped copies: one equilibrium, stable
    assert verdict([1, 2], [-1, -1], np.diag([1.0, 0.5]), np.diag([0.5, 1.0]))
    # two independent unstable copies (as the n=1 case above)
    assert not verdict([-1, -1], [-2, -2], -np.eye(2), -np.eye(2))
    # a stable equilibrium performing action 1 only and an unstable one performing action 2
    # only (Pi_12 = 2 keeps the latter valid: Pi_12 a_2 >= g_1): rejected, as docs/science.md §4 says
    # "all stable"
    mixed = ([1, -1], [-1, -2], np.array([[1.0, 2.0], [0.0, -1.0]]), np.diag([0.5, -1.0]))
    assert not verdict(*mixed)
    # the same two copies uncoupled: action 2's growing mode has effort part (0, w), not
    # all positive, so the joint equilibrium passes, and the action-2-only one is invalid
    # (Pi_12 a_2 = 0 < g_1): accepted. The filter reads science.md's words literally.
    assert verdict([1, -1], [-1, -2], np.diag([1.0, -1.0]), np.diag([0.5, -1.0]))
    # both actions cheap to start (g > 0) but mutual reinforcement through Gamma's
    # off-diagonal: the joint equilibrium has a growing real mode in both efforts
    Pi = np.eye(2)
    Gamma = np.array([[-1.0, -3.0], [-3.0, -1.0]])
    assert not verdict([1, 1], [-10, -10], Pi, Gamma)
    for case in (mixed, ([1, 1], [-10, -10], Pi, Gamma)):
        assert stable_one(params_of(2, *case)[0], 2) == verdict(*case)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_stability_vectorised_agrees_with_loop_reference(n):
    cfg = DataConfig(n_actions=n)
    lo, hi = cfg.bounds()
    draws = lo + (hi - lo) * np.random.default_rng(n).random((300, lo.size))
    params = draws[:, : ode.num_params(n)]
    fast = ode.is_stable(ode.Params.unpack(params, n))
    slow = np.array([stable_one(p, n) for p in params])
    assert np.array_equal(fast, slow)
    if n > 1:
        assert 0 < fast.mean() < 1  # the filter really filters


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("n", [1, 2, 3])
def test_layout_round_trips(n):
    flat = np.random.default_rng(0).random((4, ode.num_params(n)))
    p = ode.Params.unpack(flat, n)
    assert np.array_equal(p.pack(), flat)
    g, mu, Pi, Gamma = split(flat[2], n)
    assert np.array_equal(p.g[2], g) and np.array_equal(p.mu[2], mu)
    assert np.array_equal(p.Pi[2], Pi) and np.array_equal(p.Gamma[2], Gamma)
    assert len(ode.param_names(n)) == ode.num_params(n) == 2 * n + 2 * n * n
    assert len(ode.ic_names(n)) == ode.num_ic(n) == 2 * n
    assert ode.param_names(n)[2 * n + 1 : 2 * n + 2] == (["Pi_12"] if n > 1 else ["Gamma_11"])


def test_bounds_follow_design_ranges():
    lo, hi = DataConfig(n_actions=2).bounds()
    names = ode.param_names(2) + ode.ic_names(2)
    bounds = dict(zip(names, zip(lo, hi)))
    assert bounds["g_2"] == (0.0, 3.0) and bounds["mu_1"] == (-10.0, 0.0)
    assert bounds["Pi_11"] == (0.1, 3.0) and bounds["Pi_12"] == (-3.0, 0.0)
    assert bounds["Gamma_22"] == (0.1, 3.0) and bounds["Gamma_21"] == (-3.0, 3.0)
    assert bounds["v0_1"] == (-5.0, 5.0) and bounds["m0_2"] == (-2.0, 2.0)


# --------------------------------------------------------------------------- the actions' symmetry


@pytest.mark.parametrize("n", [2, 3])
def test_relabelling_the_actions_relabels_the_solution(n):
    """The ODE is equivariant under relabelling the actions (docs/science.md §2): the
    solution for the relabelled targets is the relabelled solution, and the stability filter
    accepts a relabelled draw exactly when it accepts the draw. Some n>=2 systems are nearly
    chaotic (a 1e-9 nudge moves them by percents; see above): those are held to the nudge."""
    params, ic, series = stable_draws(n, 12, seed=4)
    n_p = ode.num_params(n)
    for targets, channels in ode.relabellings(n)[1:]:
        moved = np.concatenate([params, ic], axis=1)[:, targets]
        again, ok = ode.solve(moved[:, :n_p], moved[:, n_p:], TIMES, n, rtol=1e-10, atol=1e-12)
        exact, _ = ode.solve(params, ic, TIMES, n, rtol=1e-10, atol=1e-12)
        assert ok.all()
        nudged, _ = ode.solve(params, ic * (1 + 1e-9), TIMES, n, rtol=1e-10, atol=1e-12)
        scale = np.abs(exact).max(axis=(1, 2))
        err = np.abs(again - exact[:, channels]).max(axis=(1, 2)) / scale
        sensitivity = np.abs(nudged - exact).max(axis=(1, 2)) / scale
        assert (err < np.maximum(1e-6, 100 * sensitivity)).all(), (err, sensitivity)
        assert np.median(err) < 1e-7
    draws = DataConfig(n_actions=n).bounds()
    lo, hi = draws
    raw = lo + (hi - lo) * np.random.default_rng(5).random((3000, lo.size))
    stable = ode.is_stable(ode.Params.unpack(raw[:, :n_p], n))
    assert 0 < stable.mean() < 1
    for targets, _ in ode.relabellings(n)[1:]:
        moved = raw[:, targets]
        assert (ode.is_stable(ode.Params.unpack(moved[:, :n_p], n)) == stable).all()
