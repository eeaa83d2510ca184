"""A trained model as it is used: what it carries, the one inference path, and the MLflow model.

Every checkpoint (train.save_checkpoint) holds, beside the weights, `meta`: a plain dict
(lists, floats, strings; torch.load(weights_only=True) reads it) with everything that
turns raw series into raw-unit predictions: the input normalisation (its kind and
parameters), the target standardisation (mean, std, which targets vary; a constant target
is predicted as its mean), the target names, the series shape and times, and the model
config. `SavedModel` loads a checkpoint and predicts from raw series; raypd.train,
raypd.tune, raypd.predict, raypd.report and the MLflow pyfunc (raypd/mlflow_model.py) all
predict through it. `log_and_register` logs a study's best model to its MLflow run and
registers it as `raypd-<study>`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from raypd.cli import redact
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
        from raypd.model import CNN1D

        self.meta, self.source = meta, source
        self.config = from_dict(ModelConfig, meta["model_config"])
        self.net = CNN1D(self.config, meta.get("input_channels", meta["series_shape"][0]), meta["n_outputs"])
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
        least 2^(conv blocks)."""
        series = np.asarray(series)
        channels, steps = self.series_shape
        if series.dtype.kind not in "fiu" or series.ndim != 3 or series.shape[1] != channels:
            raise ValueError(f"series must be a number array of shape (N, {channels}, T) (N series of {channels} "
                             f"channels, row-major (channel, time); T={steps} as trained), got "
                             f"{series.dtype} {series.shape}")
        least = 2 ** len(self.config.filters)
        if series.shape[2] < least:
            raise ValueError(f"series have {series.shape[2]} time points: this model needs at least {least} "
                             f"(trained on {steps})")
        if not np.isfinite(series).all():
            raise ValueError("series hold NaN or infinite values")
        return series.astype(np.float32, copy=False)

    def predict(self, series) -> np.ndarray:
        """(N, n_targets) raw-unit predictions, parameters then initial conditions, for raw
        series (N, 2n, T)."""
        series = self.check(series)
        return self.predict_inputs(apply_input_norm(series, self.meta["input_norm"]))

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
    tmp = file.with_name(f".{file.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(file)
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


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def registered_name(study: str) -> str:
    return f"raypd-{study}"


def signature(model: SavedModel):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    channels, steps = model.series_shape
    # interval_level 0: no intervals (the default response); in (0, 1): estimates with intervals
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, steps))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float64), (-1, len(model.target_names)))]),
                          params=ParamSchema([ParamSpec("interval_level", "double", 0.0)]))


@contextmanager
def tracking(uri: str):
    """MLflow's fluent API (log_model) on `uri` for a while; the process's tracking URI and its
    MLFLOW_TRACKING_URI variable are put back as they were."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # restores "unset" too
    except ImportError:  # pragma: no cover (another MLflow)
        _use_tracking_uri = None
    try:
        if _use_tracking_uri is not None:
            with _use_tracking_uri(uri):
                yield
        else:
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(previous)
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def registered_version(study: str, summary: dict, tracking_uri: str) -> tuple[int | None, str]:
    """(the latest version of raypd-<study> if it holds the study's best checkpoint (its tag
    checkpoint_sha256), else None; that checkpoint's digest). Reads only."""
    from mlflow.tracking import MlflowClient

    digest = file_digest(Path(summary["best_checkpoint"]) / CHECKPOINT_FILE)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{registered_name(study)}'")
    latest = max(versions, key=lambda v: int(v.version), default=None)
    if latest is not None and latest.tags.get("checkpoint_sha256") == digest:
        return int(latest.version), digest
    return None, digest


def log_and_register(study: str, summary: dict, tracking_uri: str, test_split: Path | None = None) -> dict | None:
    """Log the study's best model to the best trial's MLflow run as a pyfunc model (from code:
    raypd/mlflow_model.py, no pickle) with a signature and an input example (the first series
    of test_split, when given), and register it as raypd-<study>. Idempotent: when the latest
    version already holds this best checkpoint (tag checkpoint_sha256), nothing is logged.
    Returns {name, version, model_uri, new}, or None when the study has no best model."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not summary.get("best_checkpoint"):
        return None
    checkpoint = Path(summary["best_checkpoint"])
    name = registered_name(study)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    latest, digest = registered_version(study, summary, tracking_uri)
    if latest is not None:
        return {"name": name, "version": latest, "model_uri": f"models:/{name}/{latest}", "new": False}
    model = SavedModel.load(checkpoint)
    experiment = client.get_experiment_by_name(f"raypd-{study}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.trial_id = '{summary['best_trial_id']}'",
                              max_results=1) if experiment else []
    if not runs:
        raise ValueError(f"no MLflow run of trial {summary['best_trial_id']} in experiment raypd-{study} "
                         f"at {redact(tracking_uri)}")
    run_id = runs[0].info.run_id
    if test_split is not None and Path(test_split).is_file():  # the input example: a real test series
        example = read_test_split(Path(test_split), model.series_shape, limit=1)[2]
    else:
        example = np.ones((1, *model.series_shape), dtype=np.float32)
    code = Path(__file__).with_name("mlflow_model.py")
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={__import__('torch').__version__.split('+')[0]}",
                    f"numpy=={np.__version__}", "raypd"]
    with tempfile.TemporaryDirectory(prefix="raypd-model-") as tmp, tracking(tracking_uri):
        model.save(Path(tmp) / MODEL_FILE)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(code), artifacts={"model": str(Path(tmp) / MODEL_FILE)},
                signature=signature(model), input_example=example.astype(np.float32, copy=False),
                pip_requirements=requirements,
                metadata={"target_names": model.target_names, "series_shape": list(model.series_shape)})
    # the registry through this client: MLflow's global registry URI (inherited by subprocesses
    # through MLFLOW_REGISTRY_URI) is left alone. Inside `tracking`: the registry looks the
    # logged model up through the process's tracking URI (in a fresh process, one that only
    # re-registers a finished study, that was still ./mlruns: "Logged model ... not found").
    with tracking(tracking_uri):
        try:
            client.create_registered_model(name, tags={"study": study},
                                           description=f"best model of raypd study {study}: raw series (N, 2n, T) "
                                                       "in, parameters then initial conditions out")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, info.model_uri, run_id=run_id, model_id=info.model_id,
            tags={"checkpoint_sha256": digest, "study": study, "trial_id": str(summary["best_trial_id"]),
                  "target_names": json.dumps(model.target_names)})
    client.set_tag(run_id, "registered_model", f"{name}/{version.version}")
    return {"name": name, "version": int(version.version), "model_uri": f"models:/{name}/{version.version}",
            "new": True}
