"""Reading a generated dataset back, checked against its manifest, and turning it into model
inputs and targets: a deterministic 70/15/15 split by sample_id, inputs normalised per sample
and per group (desires, efforts) by their standard deviation without mean shift, targets
(parameters + initial conditions) standardised with train-split statistics.

A target that is constant in the data (mu with --mu-range 0 0) has no spread to standardise
by and nothing to learn: it is left out of the model's outputs and the loss, and predicted as
that constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypd.config import INPUT_NORMS, DataConfig, TrainConfig, check_split, from_dict, split_sizes
from raypd.dataio import MANIFEST, read_manifest


@dataclass
class Dataset:
    """A dataset read into memory, rows in sample_id order."""

    manifest: dict
    sample_id: np.ndarray  # (N,) int64
    params: np.ndarray  # (N, 2n + 2n²) float64
    ic: np.ndarray  # (N, 2n) float64
    series: np.ndarray  # (N, 2n, T) float32

    @property
    def n_actions(self) -> int:
        return int(self.manifest["n_actions"])

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest["param_names"]) + list(self.manifest["ic_names"])

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate([self.params, self.ic], axis=1)


def load_dataset(folder: str | Path) -> Dataset:
    """Read and check a dataset folder; any mismatch is a ValueError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"dataset {folder} is a file; a dataset is a folder (the one that holds {MANIFEST})")
    if not folder.is_dir():
        raise ValueError(f"dataset {folder} does not exist (generate it with raypd.generate)")
    manifest = read_manifest(folder)
    try:
        config = from_dict(DataConfig, manifest["settings"])
        n, (channels, steps) = config.n_actions, manifest["series_shape"]
        files = manifest["files"]
        expected_rows = int(manifest["samples"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{folder / MANIFEST}: not a raypd manifest ({type(exc).__name__}: {exc})") from None
    n_params, n_ic = 2 * n + 2 * n * n, 2 * n
    if [channels, steps] != [2 * n, config.time_points]:
        raise ValueError(f"{folder / MANIFEST}: series_shape {manifest['series_shape']} does not "
                         f"match n_actions {n} and time_points {config.time_points}")
    check_manifest_keys(manifest, folder / MANIFEST, n_params, n_ic, steps)

    parts = []
    next_id = 0
    for entry in files:
        path = folder / entry["path"]
        try:
            table = pq.read_table(path, columns=["sample_id", "params", "ic", "series"])
        except FileNotFoundError:
            raise ValueError(f"{path}: listed in {MANIFEST} but missing") from None
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable raypd Parquet file ({str(exc).splitlines()[0]})") from None
        for field in table.schema:
            ok = (pa.types.is_integer(field.type) if field.name == "sample_id" else
                  pa.types.is_list(field.type) and pa.types.is_floating(field.type.value_type))
            if not ok:
                allowed = "integers" if field.name == "sample_id" else "lists of floating-point numbers"
                raise ValueError(f"{path}: column {field.name} is {field.type}; it must hold {allowed}")
        rows = table.num_rows
        if rows != entry["rows"]:
            raise ValueError(f"{path}: {rows} rows, {MANIFEST} says {entry['rows']}")
        ids = table.column("sample_id").to_numpy()
        if not np.array_equal(ids, np.arange(next_id, next_id + rows)):
            raise ValueError(f"{path}: sample_id is not {next_id}..{next_id + rows - 1} in order")
        next_id += rows
        columns = {}
        for name, width in (("params", n_params), ("ic", n_ic), ("series", channels * steps)):
            column = table.column(name).combine_chunks()
            values = column.flatten().to_numpy(zero_copy_only=False)
            if values.size != rows * width or (rows and (np.diff(column.offsets.to_numpy()) != width).any()):
                raise ValueError(f"{path}: column {name} must hold {width} values per row")
            values = values.reshape(rows, width)
            if not np.isfinite(values).all():
                raise ValueError(f"{path}: column {name} holds NaN or infinite values")
            columns[name] = values
        parts.append((ids, columns))
    if next_id != expected_rows:
        raise ValueError(f"{folder / MANIFEST}: lists {next_id} rows in its files, says samples={expected_rows}")
    return Dataset(
        manifest=manifest,
        sample_id=np.concatenate([p[0] for p in parts]).astype(np.int64),
        params=np.concatenate([p[1]["params"] for p in parts]).astype(np.float64),
        ic=np.concatenate([p[1]["ic"] for p in parts]).astype(np.float64),
        series=np.concatenate([p[1]["series"] for p in parts]).astype(np.float32).reshape(-1, channels, steps),
    )


def check_manifest_keys(manifest: dict, path: Path, n_params: int, n_ic: int, steps: int) -> None:
    """What the stages read from a manifest beyond its settings, with the right types and sizes."""
    def names(key: str, count: int) -> bool:
        value = manifest.get(key)
        return isinstance(value, list) and len(value) == count and all(isinstance(v, str) for v in value)

    files = manifest["files"]
    checks = [
        ("files", isinstance(files, list) and all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and type(e.get("rows")) is int and e["rows"] >= 0
            for e in files), "a list of {path: file name, rows: count}"),
        ("n_actions", manifest.get("n_actions") == n_ic // 2, f"{n_ic // 2}, as in its settings"),
        ("param_names", names("param_names", n_params), f"a list of {n_params} names"),
        ("ic_names", names("ic_names", n_ic), f"a list of {n_ic} names"),
        ("time_points", isinstance(manifest.get("time_points"), list) and len(manifest["time_points"]) == steps
         and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in manifest["time_points"]),
         f"a list of {steps} times"),
        ("content_hash", isinstance(manifest.get("content_hash"), str), "a string"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{path}: {key} must be {allowed} (got {json.dumps(manifest.get(key))[:60]})")


def split_ids(sample_ids: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Deterministic train/val/test split by sample_id: a seeded permutation of the ids."""
    order = np.random.default_rng(seed).permutation(np.sort(sample_ids))
    n_train, n_val, _ = split_sizes(order.size, fractions)
    return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train:n_train + n_val]),
            "test": np.sort(order[n_train + n_val:])}


def normalise_inputs(series: np.ndarray, scales: bool = False):
    """Divide each sample's desires (first n channels) and efforts (last n) by that group's
    standard deviation over channels and time; no mean shift (it carries the steady state).
    A flat group (std 0) is left as it is. With scales=True, also return each channel's
    divisor (N, 2n): what this normalisation throws away."""
    n = series.shape[1] // 2
    out = np.empty_like(series, dtype=np.float32)
    divisors = np.empty(series.shape[:2], dtype=np.float64)
    for group in (slice(0, n), slice(n, 2 * n)):
        std = series[:, group].std(axis=(1, 2), keepdims=True, dtype=np.float64)
        out[:, group] = series[:, group] / np.where(std > 0, std, 1.0)
        divisors[:, group] = std[:, :, 0]
    return (out, divisors) if scales else out


# The input normalisation as saved with a model: a plain dict that names its kind and holds
# its parameters (JSON-able, loadable with torch.load(weights_only=True)). Kinds
# (train.input_norm):
#   sample:       each sample's channel groups (desires, efforts) divided by that group's
#                 standard deviation over its channels and time, no mean shift (the notebook's).
#   sample+scale: the same, plus one more input channel per series channel holding
#                 log(1 + the divisor it was normalised by), constant over time: the scale
#                 that `sample` throws away (log1p: a flat group, divisor 0, gives 0).
#   global:       every sample divided by one scale per channel (its standard deviation over
#                 the training split's samples and times), no mean shift: levels are kept.
def fit_input_norm(kind: str, train_series: np.ndarray) -> dict:
    """Input normalisation `kind` for series (N, 2n, T), fitted on the training split."""
    n = train_series.shape[1] // 2
    if kind == "global":
        scale = train_series.std(axis=(0, 2), dtype=np.float64)
        return {"kind": kind, "scale": [float(v) if v > 0 else 1.0 for v in scale], "mean_shift": False}
    assert kind in INPUT_NORMS, kind
    return {"kind": kind, "groups": [list(range(n)), list(range(n, 2 * n))], "mean_shift": False}


def apply_input_norm(series: np.ndarray, norm: dict) -> np.ndarray:
    """Raw series (N, 2n, T) -> model inputs (float32), by a saved input normalisation."""
    kind, channels = norm.get("kind"), series.shape[1]
    if kind in ("sample", "sample+scale"):
        groups = [list(range(channels // 2)), list(range(channels // 2, channels))]
        if norm["groups"] != groups:
            raise ValueError(f"input normalisation {kind!r} with groups {norm['groups']} does not fit "
                             f"{channels} channels")
        if kind == "sample":
            return normalise_inputs(series)
        normalised, divisors = normalise_inputs(series, scales=True)
        levels = np.broadcast_to(np.log1p(divisors)[:, :, None], series.shape)
        return np.concatenate([normalised, levels.astype(np.float32)], axis=1)
    if kind == "global":
        scale = np.asarray(norm["scale"], dtype=np.float64)
        if scale.shape != (channels,):
            raise ValueError(f"input normalisation 'global' has {scale.size} channel scales; the series have "
                             f"{channels} channels")
        return (series / scale[None, :, None]).astype(np.float32)
    raise ValueError(f"unknown input normalisation {kind!r} (known: {', '.join(INPUT_NORMS)})")


def targets_to_raw(standardised: np.ndarray, mean: np.ndarray, std: np.ndarray, varying: np.ndarray) -> np.ndarray:
    """(N, k) model outputs for the k varying targets -> (N, n_targets) raw-unit predictions;
    a constant target is predicted as its constant (its mean)."""
    out = np.tile(np.asarray(mean, dtype=np.float64), (standardised.shape[0], 1))
    varying = np.asarray(varying, dtype=bool)
    out[:, varying] = (standardised.astype(np.float64) * np.asarray(std, dtype=np.float64)[varying]
                       + np.asarray(mean, dtype=np.float64)[varying])
    return out


@dataclass
class Prepared:
    """Model-ready arrays of one split layout: float32 inputs (N, 2n, T), standardised float32
    targets (N, k) for the k varying targets, and what it takes to map predictions back."""

    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    sample_ids: dict[str, np.ndarray]
    raw_targets: dict[str, np.ndarray]
    target_names: list[str]
    varying: np.ndarray  # (n_targets,) bool: targets the model predicts
    mean: np.ndarray  # (n_targets,) train mean; the prediction of a constant target
    std: np.ndarray  # (n_targets,) train std (1 where constant)
    input_norm: dict  # how inputs were made from raw series (see apply_input_norm)
    series_shape: tuple[int, int]  # of the raw series (2n, T); inputs may have more channels
    time_points: list[float]  # the dataset's observation times

    @property
    def n_outputs(self) -> int:
        return int(self.varying.sum())

    def to_raw(self, standardised: np.ndarray) -> np.ndarray:
        """(N, k) model outputs -> (N, n_targets) raw-unit predictions."""
        return targets_to_raw(standardised, self.mean, self.std, self.varying)


def prepare(dataset: Dataset, train: TrainConfig) -> Prepared:
    check_split(dataset.sample_id.size, train.split, "the dataset's")
    ids = split_ids(dataset.sample_id, train.split, train.split_seed)
    raw = dataset.targets
    position = {name: np.searchsorted(dataset.sample_id, ids[name]) for name in ids}
    train_raw = raw[position["train"]]
    mean, std = train_raw.mean(axis=0), train_raw.std(axis=0)
    varying = std > 1e-12 * np.maximum(1.0, np.abs(mean))
    std = np.where(varying, std, 1.0)
    input_norm = fit_input_norm(train.input_norm, dataset.series[position["train"]])
    inputs = apply_input_norm(dataset.series, input_norm)
    return Prepared(
        inputs={k: inputs[p] for k, p in position.items()},
        targets={k: ((raw[p] - mean) / std)[:, varying].astype(np.float32) for k, p in position.items()},
        sample_ids=ids,
        raw_targets={k: raw[p] for k, p in position.items()},
        target_names=dataset.target_names,
        varying=varying,
        mean=mean,
        std=std,
        input_norm=input_norm,
        series_shape=tuple(int(d) for d in dataset.series.shape[1:]),
        time_points=[float(t) for t in dataset.manifest["time_points"]],
    )


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


def write_json(path: Path, payload: dict) -> None:
    """Written whole or not at all (temporary file, then rename)."""
    from raypd.dataio import naming

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming(path):
            tmp.write_text(json.dumps(payload, indent=1))
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
