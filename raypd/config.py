"""raypd's one typed config schema: every default lives here.

Study files and `--set key=value` state only what differs; `from_dict` turns a plain dict
(from YAML or JSON) into the typed config and raises ValueError naming the key for an
unknown key, a value of the wrong type, or a value out of range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass

import numpy as np

Range = tuple[float, float]


@dataclass(frozen=True)
class DataConfig:
    """What a dataset is: the ODE's size, the sampling ranges, the time grid and the solver
    tolerances. Two datasets with equal DataConfigs have identical rows."""

    n_actions: int = 1
    samples: int = 10_000
    seed: int = 42
    g_range: Range = (0.0, 3.0)
    mu_range: Range = (-10.0, 0.0)
    pi_diag_range: Range = (0.1, 3.0)
    pi_offdiag_range: Range = (-3.0, 0.0)
    gamma_diag_range: Range = (0.1, 3.0)
    gamma_offdiag_range: Range = (-3.0, 3.0)
    v0_range: Range = (-5.0, 5.0)
    m0_range: Range = (-2.0, 2.0)
    time_span: Range = (0.0, 200.0)
    time_points: int = 201
    # Dormand-Prince tolerances: the observed series then agrees with a DOP853 solution at
    # rtol 1e-10 to ~1e-5 of its scale for n=1 (tests/test_ode.py).
    rtol: float = 1e-8
    atol: float = 1e-10

    def validate(self) -> DataConfig:
        if not 1 <= self.n_actions <= 3:
            raise ValueError(f"n_actions must be 1, 2 or 3 (got {self.n_actions})")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1 (got {self.samples})")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (got {self.seed})")
        for name in RANGE_FIELDS:
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name} must be two finite numbers LOW HIGH (got {lo} {hi})")
            if lo > hi:
                raise ValueError(f"{name} must have LOW <= HIGH (got {lo} {hi})")
        for name in ("pi_diag_range", "gamma_diag_range"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be > 0: diagonals of Pi and Gamma are positive "
                                 f"(got {getattr(self, name)[0]})")
        t0, t1 = self.time_span
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0:
            raise ValueError(f"time_span must be T0 < T1, both finite (got {t0} {t1})")
        if self.time_points < 2:
            raise ValueError(f"time_points must be >= 2 (got {self.time_points})")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (0 < value < 1):
                raise ValueError(f"{name} must be in (0, 1) (got {value})")
        return self

    def times(self) -> np.ndarray:
        return np.linspace(self.time_span[0], self.time_span[1], self.time_points)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of a draw: parameters then initial conditions (DESIGN §1)."""
        n = self.n_actions
        diag = np.eye(n, dtype=bool).ravel()
        lo, hi = [], []
        for k in (0, 1):
            Pi = np.where(diag, self.pi_diag_range[k], self.pi_offdiag_range[k])
            Gamma = np.where(diag, self.gamma_diag_range[k], self.gamma_offdiag_range[k])
            parts = [np.full(n, self.g_range[k]), np.full(n, self.mu_range[k]), Pi, Gamma,
                     np.full(n, self.v0_range[k]), np.full(n, self.m0_range[k])]
            (lo if k == 0 else hi).append(np.concatenate(parts).astype(np.float64))
        return lo[0], hi[0]

    def fingerprint(self) -> str:
        """A short hash of the settings: names the dataset's folder."""
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def dataset_name(self) -> str:
        return f"n{self.n_actions}-k{self.samples}-s{self.seed}-{self.fingerprint()}"


RANGE_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name.endswith("_range"))


# --------------------------------------------------------------------------- dict <-> config


def to_dict(config) -> dict:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise ValueError(f"{key} must be a list of {len(args)} values "
                         f"[{', '.join(_type_name(a) for a in args)}] (got {value!r})")
    elif origin is list:
        (arg,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        raise ValueError(f"{key} must be a list of {_type_name(arg)} (got {value!r})")
    elif origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
    elif dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    else:  # pragma: no cover - a field type this function does not know is our bug
        raise AssertionError(f"unsupported config type {hint!r} for {key}")
    raise ValueError(f"{key} must be {_type_name(hint)} (got {value!r})")


def from_dict(cls, values, prefix: str = ""):
    """Build dataclass `cls` from `values`, filling defaults; unknown keys are errors."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values "
                         f"(got {values!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]} (allowed: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}
    return cls(**kwargs)
