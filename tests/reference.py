"""Independent references for the science tests: a one-sample right-hand side, a tight scipy
solution and a loop-per-sample stability filter written from docs/science.md §4, sharing no code with
raypd.ode beyond the parameter layout."""

import itertools

import numpy as np
from scipy.integrate import solve_ivp


def split(params, n):
    g, mu = params[:n], params[n : 2 * n]
    Pi = params[2 * n : 2 * n + n * n].reshape(n, n)
    Gamma = params[2 * n + n * n :].reshape(n, n)
    return g, mu, Pi, Gamma


def dop853_series(params, ic, times, n, rtol=1e-10, atol=1e-12):
    """Observed series (2n, T) of one sample from scipy's DOP853."""
    g, mu, Pi, Gamma = split(np.asarray(params, float), n)

    def f(t, x):
        u = np.maximum(x[:n], mu)
        a = np.maximum(x[n:], 0.0)
        return np.concatenate([g - Pi @ a, u - Gamma @ a])

    sol = solve_ivp(f, (times[0], times[-1]), np.asarray(ic, float), method="DOP853",
                    rtol=rtol, atol=atol, t_eval=times)
    assert sol.success, sol.message
    v, m = sol.y[:n], sol.y[n:]
    return np.concatenate([np.maximum(v, mu[:, None]), np.maximum(m, 0.0)])


def dop853_jacobian_column(theta, c, times, n):
    """d series / d theta[c] (2n, T) by central differences of DOP853 at rtol 1e-12, step 1e-5
    (relative to |theta[c]| above 1); theta = [params, ic]."""
    n_p = 2 * n + 2 * n * n
    h = 1e-5 * max(1.0, abs(theta[c]))
    up, down = np.array(theta, dtype=float), np.array(theta, dtype=float)
    up[c] += h
    down[c] -= h
    return (dop853_series(up[:n_p], up[n_p:], times, n, rtol=1e-12, atol=1e-13)
            - dop853_series(down[:n_p], down[n_p:], times, n, rtol=1e-12, atol=1e-13)) / (2 * h)


def stable_one(params, n):
    """docs/science.md §4's filter for one parameter vector, by plain loops."""
    g, mu, Pi, Gamma = split(np.asarray(params, float), n)
    verdicts = []
    for size in range(1, n + 1):
        for P in itertools.combinations(range(n), size):
            S = [i for i in range(n) if i not in P]
            for k in range(size + 1):
                for DP in itertools.combinations(P, k):
                    FP = [i for i in P if i not in DP]
                    DP, P_ = list(DP), list(P)
                    A = np.vstack([Pi[np.ix_(DP, P_)], Gamma[np.ix_(FP, P_)]])
                    b = np.concatenate([g[DP], mu[FP]])
                    try:
                        if abs(np.linalg.det(A)) < 1e-12 * max(np.abs(A).max() ** size, 1e-300):
                            continue
                        a = np.linalg.solve(A, b)
                    except np.linalg.LinAlgError:
                        continue
                    F = FP + S
                    if not (np.all(a > 0)
                            and np.all(Gamma[np.ix_(DP, P_)] @ a > mu[DP])
                            and np.all(Gamma[np.ix_(S, P_)] @ a >= mu[S])
                            and np.all(Pi[np.ix_(F, P_)] @ a >= g[F])):
                        continue
                    p = len(P_)
                    J = np.block([[np.zeros((p, p)), -Pi[np.ix_(P_, P_)]],
                                  [np.eye(p), -Gamma[np.ix_(P_, P_)]]])
                    lam, vec = np.linalg.eig(J)
                    growing = False
                    for j in range(2 * p):
                        if lam[j].real > 0 and abs(lam[j].imag) <= 1e-12 * max(1, abs(lam[j].real)):
                            w = vec[p:, j].real
                            growing |= bool(np.all(w > 0) or np.all(w < 0))
                    dominated = abs(lam.real.min()) > lam.real.max()
                    verdicts.append((not growing) or dominated)
    return bool(verdicts) and all(verdicts)
