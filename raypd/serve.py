"""A trained model as it is used: what it carries and the one inference path.

Every checkpoint (train.save_checkpoint) holds, beside the weights, `meta`: a plain dict
(lists, floats, strings; torch.load(weights_only=True) reads it) with everything that
turns raw series into raw-unit predictions: the input normalisation (its kind and
parameters), the target standardisation (mean, std, which targets vary; a constant target
is predicted as its mean), the target names, the series shape and times, and the model
config. `SavedModel` loads a checkpoint and predicts from raw series; raypd.train,
raypd.tune, raypd.predict, raypd.report and the MLflow pyfunc (raypd/mlflow_model.py) all
predict through it (raypd.tracking logs and registers it in MLflow). Also here: the study's
split files (test, calibration) that report and predict read without ROOT/data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raypd.dataio import atomic_file
from raypd.dataset import Prepared, apply_input_norm, targets_to_raw

CHECKPOINT_FILE = "state.pt"  # the file in a checkpoint folder (train.save_checkpoint)
META_FORMAT = "raypd-model/1"
MODEL_FILE = "model.pt"  # the registered model's weights and meta: {"model", "meta"}


def model_meta(config, data: Prepared) -> dict:
    """The data-dependent, epoch-independent part of a checkpoint (small: a few lists)."""
    from raypd.config import to_dict

    channels, steps = data.series_shape
    return {
        "format": META_FORMAT,
        "n_actions": channels // 2,
        "series_shape": [channels, steps],
        "input_channels": data.input_channels,  # more than channels with sample+scale
        "time_points": [float(t) for t in data.time_points],
        "input_norm": data.input_norm,
        "target_names": list(data.target_names),
        "target_mean": [float(v) for v in data.mean],
        "target_std": [float(v) for v in data.std],
        "target_varying": [bool(v) for v in data.varying],
        "constant_targets": {name: float(m) for name, m, v in zip(data.target_names, data.mean, data.varying)
                             if not v},
        "model_config": to_dict(config.model),
        "n_outputs": int(data.n_outputs),
    }


def read_checkpoint(file: Path) -> dict:
    """A checkpoint file's contents (plain data only: weights_only); a missing or damaged file
    is a ValueError naming it."""
    import torch

    if not file.is_file():
        raise ValueError(f"{file}: no such checkpoint")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: RuntimeError, EOFError or UnpicklingError, by where it breaks
        raise ValueError(f"{file}: not a readable checkpoint ({str(exc).strip().splitlines()[0][:120]})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{file}: not a raypd checkpoint")
    return payload


class SavedModel:
    """A checkpoint's model with its normalisation: raw series in, raw-unit targets out."""

    def __init__(self, meta: dict, weights: dict, source: str = "model"):
        from raypd.config import ModelConfig, from_dict
        from raypd.model import build_model

        self.meta, self.source = meta, source
        self.config = from_dict(ModelConfig, meta["model_config"])  # older checkpoints: the keys they lack default
        self.net = build_model(self.config, meta.get("input_channels", meta["series_shape"][0]), meta["n_outputs"])
        self.net.load_state_dict(weights)
        self.net.eval()

    @classmethod
    def load(cls, path: str | Path) -> "SavedModel":
        """From a checkpoint folder (holding state.pt) or a checkpoint / model file. A
        checkpoint without saved normalisation (written before raypd 0.2) is a ValueError."""
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        payload = read_checkpoint(file)
        meta = payload.get("meta")
        if not meta or meta.get("format") != META_FORMAT:
            raise ValueError(f"{file}: checkpoint without its saved normalisation (an older raypd wrote it): "
                             "re-run the study with this raypd (use another --root) to predict with it")
        return cls(meta, payload["model"], str(file))

    @property
    def target_names(self) -> list[str]:
        return list(self.meta["target_names"])

    @property
    def series_shape(self) -> tuple[int, int]:
        channels, steps = self.meta["series_shape"]
        return int(channels), int(steps)

    def check(self, series) -> np.ndarray:
        """Raw series as a float32 (N, 2n, T) array, or a ValueError saying what is wrong.
        T may differ from the training series' (the model pools globally) but must be at
        least 2^(poolings)."""
        from raypd.model import min_time_points

        series = np.asarray(series)
        channels, steps = self.series_shape
        if series.dtype.kind not in "fiu" or series.ndim != 3 or series.shape[1] != channels:
            raise ValueError(f"series must be a number array of shape (N, {channels}, T) (N series of {channels} "
                             f"channels, row-major (channel, time); T={steps} as trained), got "
                             f"{series.dtype} {series.shape}")
        least = min_time_points(self.config)
        if series.shape[2] < least:
            raise ValueError(f"series have {series.shape[2]} time points: this model needs at least {least} "
                             f"(trained on {steps})")
        if not np.isfinite(series).all():
            raise ValueError("series hold NaN or infinite values")
        return series.astype(np.float32, copy=False)

    def predict(self, series) -> np.ndarray:
        """(N, n_targets) raw-unit predictions, parameters then initial conditions, for raw
        series (N, 2n, T). A model with model.average_relabellings predicts each series under
        every relabelling of its actions and averages the predictions, each relabelled back."""
        from raypd.ode import relabellings

        series = self.check(series)
        norm = self.meta["input_norm"]
        if not self.config.average_relabellings:
            return self.predict_inputs(apply_input_norm(series, norm))
        total = 0.0
        perms = relabellings(self.series_shape[0] // 2)
        for target_index, channel_index in perms:
            relabelled = self.predict_inputs(apply_input_norm(series[:, channel_index], norm))
            back = np.empty_like(relabelled)
            back[:, target_index] = relabelled  # the prediction of target target_index[i] is column i
            total = total + back
        return total / len(perms)

    def predict_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """The same, for inputs already normalised (the prepared splits)."""
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
            out = (torch.cat([self.net(x[i : i + 1024]) for i in range(0, len(x), 1024)]) if len(x)
                   else torch.zeros((0, self.meta["n_outputs"])))
        return targets_to_raw(out.numpy(), self.meta["target_mean"], self.meta["target_std"],
                              self.meta["target_varying"])

    @property
    def calibration(self) -> dict | None:
        """The model-only interval calibration (raypd.intervals), if the checkpoint has one."""
        return self.meta.get("intervals")

    def predict_with_intervals(self, series, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper), each (N, n_targets) raw units: the model's estimates and
        their split-conformal intervals at `level` (calibrated on the calibration split, clean
        and noisy; a series takes the calibration of the noise level nearest its own)."""
        from raypd.intervals import check_level, model_intervals

        level = check_level(level)
        if self.calibration is None:
            raise ValueError(f"{self.source}: this model has no interval calibration (trained by an older "
                             "raypd): re-run its study or training with this raypd for intervals")
        series = self.check(series)
        estimate = self.predict(series)
        lower, upper = model_intervals(self.calibration, series, estimate, level)
        return estimate, lower, upper

    def save(self, path: Path) -> None:
        """The weights and meta only (no optimizer state): what the MLflow model carries."""
        import torch

        torch.save({"model": self.net.state_dict(), "meta": self.meta}, path)


def add_calibration(checkpoint: Path, series: np.ndarray, targets: np.ndarray, seed: int = 0) -> dict:
    """Calibrate the model-only intervals of the model in checkpoint folder `checkpoint` on
    held-out raw series (N, 2n, T) and their raw targets, and save the calibration in the
    checkpoint's meta ("intervals"; the file is replaced whole). Returns the calibration."""
    import torch

    from raypd.intervals import calibrate_model

    file = Path(checkpoint) / CHECKPOINT_FILE
    payload = read_checkpoint(file)
    model = SavedModel.load(checkpoint)
    calibration = calibrate_model(model.predict, series, targets, seed=seed)
    payload["meta"] = {**payload["meta"], "intervals": calibration}
    with atomic_file(file) as tmp:
        torch.save(payload, tmp)
    return calibration


# --------------------------------------------------------------------------- the study's test split

TEST_SPLIT_FILE = "test_split.parquet"  # in ROOT/tune/NAME: what report needs without ROOT/data
CALIBRATION_SPLIT_FILE = "calibration_split.parquet"  # in ROOT/tune/NAME: what calibrates the refined intervals
VAL_SPLIT_FILE = "val_split.parquet"  # what calibrated them in a study of an earlier raypd (no calibration split)


def write_test_split(path: Path, chunks) -> None:
    """A split's sample_ids, raw targets and raw series (the dataset's column types) from
    chunks of (sample_ids, targets, series), written a chunk at a time and atomically: report,
    predict --refine and the registered model's input example read it, not ROOT/data."""
    import pyarrow as pa

    from raypd.dataio import list_column, write_tables_atomic

    write_tables_atomic((pa.table({"sample_id": pa.array(ids, type=pa.int64()),
                                   "targets": list_column(targets, pa.float64()),
                                   "series": list_column(series.reshape(len(series), -1), pa.float32())})
                         for ids, targets, series in chunks), path)


def read_test_split(path: Path, series_shape, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids (N,), raw targets (N, n_targets), raw series (N, 2n, T) float32) of a
    split file written by write_test_split; limit: its first `limit` rows."""
    chunks = list(iter_test_split(path, series_shape, limit))
    if not chunks:
        channels, steps = series_shape
        return np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, channels, steps), np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*chunks))


def iter_test_split(path: Path, series_shape, limit: int | None = None, rows: int = 4096):
    """The (sample_ids, raw targets, raw series) of a split file in chunks of `rows` rows:
    memory holds one chunk, whatever the size of the split."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ValueError(f"{path} does not exist: the study was run by an older raypd (re-run it with "
                         "this raypd, under another --root)")
    left = math.inf if limit is None else limit
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
        if left <= 0:
            return
        batch = batch.slice(0, int(min(left, batch.num_rows)))
        left -= batch.num_rows
        ids = batch.column("sample_id").to_numpy()
        targets = batch.column("targets").flatten().to_numpy().reshape(len(ids), -1)
        series = batch.column("series").flatten().to_numpy(zero_copy_only=False)
        yield ids, targets.astype(np.float64), series.astype(np.float32).reshape(len(ids), *series_shape)


# --------------------------------------------------------------------------- MLflow
