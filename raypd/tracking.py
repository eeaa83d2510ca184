"""Everything raypd does in MLflow: where a run is created, tagged, deleted or registered.

- A study's runs (`mlflow_callback`, `send_outbox`, `finish_mlflow`): one run per trial,
  every result sent through an outbox kept on disk (below); at the study's end the runs of
  trials that no longer exist are deleted (only this study instance's) and the best is tagged.
- The registered model (`register_best`, `log_and_register`): the best checkpoint as a pyfunc
  model from code (raypd/mlflow_model.py, which predicts through raypd.serve.SavedModel),
  registered as raypd-<study>, a new version only when the best checkpoint changed.
- The report (`log_report`): its pictures and refined figures on the best trial's run.

The outbox:

The study's Tune callback (`mlflow_callback`) only queues what happened (a trial started, a
result, a trial ended) in the study folder's outbox file, in order, with the time it happened;
one sender thread per study and process sends the queue to MLflow and removes what MLflow took.
A tracking server that is away (restarted, a network blip, black-holed: no answer at all) then
never holds the study up, and nothing it has not taken is lost: a Ctrl-C, a SIGTERM or a crash
leaves the queue in the file, and the next run of the study (also of a finished one) sends it
first. One result is one log_batch (one database transaction): Ray's MLflowLoggerCallback made
one call per metric (~8 ms each on SQLite).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from raypd.cli import redact
from raypd.dataio import atomic_file, file_digest
from raypd.serve import CHECKPOINT_FILE, MODEL_FILE, TEST_SPLIT_FILE, SavedModel, read_test_split

OUTBOX_FILE = "mlflow_outbox.jsonl"  # in ROOT/tune/NAME: what MLflow has not taken yet
RETRY_SECONDS = 2.0  # between tries while the tracking server does not answer
TRACKING_START_SECONDS = 120.0  # before a study: how long to wait for a tracking server that is starting
TRACKING_WAIT_SECONDS = 600.0  # at a study's end, how long results wait for a tracking server that went away


def down_errors() -> tuple:
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    return (MlflowException, RequestException, OSError)


def flat_params(config: dict) -> dict:
    from ray.tune.utils import flatten_dict

    return {key: str(value)[:6000] for key, value in flatten_dict(config, delimiter="/").items()}


def read_outbox(path: Path) -> list:
    """The operations queued in an outbox file; a line cut short by a crash is dropped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


_senders: dict[str, "Sender"] = {}
_senders_lock = threading.Lock()


def sender(tracking_uri: str, experiment: str, instance: str | None, outbox: Path) -> "Sender":
    """The one sender of this process for the outbox file `outbox` (a restored Tune callback
    finds the sender of the study it belongs to, not a second one on the same file)."""
    key = str(Path(outbox).absolute())
    with _senders_lock:
        found = _senders.get(key)
        if found is None or found.tracking_uri != tracking_uri:
            if found is not None:
                found.close()
            found = _senders[key] = Sender(tracking_uri, experiment, instance, Path(key))
        return found


class Sender:
    """Sends an outbox file's operations to MLflow, in order, from a thread of its own."""

    def __init__(self, tracking_uri: str, experiment: str, instance: str | None, outbox: Path):
        self.tracking_uri, self.experiment, self.instance, self.outbox = tracking_uri, experiment, instance, outbox
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.logged: dict[str, set] = {}  # trial_id -> the steps (epochs) its run holds
        self.experiment_id: str | None = None
        self.down_since: float | None = None
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.queue = read_outbox(outbox)
        self.thread = threading.Thread(target=self._run, name="raypd-mlflow-outbox", daemon=True)
        self.thread.start()

    def __reduce__(self):  # Tune pickles its callbacks with the experiment: unpickled, the process's own
        return sender, (self.tracking_uri, self.experiment, self.instance, self.outbox)

    def put(self, operation: list) -> None:
        with self.lock:
            self.queue.append(operation)
            with open(self.outbox, "a") as f:  # in the file before anything is tried
                f.write(json.dumps(operation) + "\n")
        self.wake.set()

    def pending(self) -> int:
        with self.lock:
            return len(self.queue)

    def flush(self, wait: float) -> int:
        """Wait up to `wait` seconds for the queue to empty; the number still queued. The wait
        is in the calling thread (a Ctrl-C or SIGTERM ends it; the queue stays in its file)."""
        deadline = time.monotonic() + wait
        self.wake.set()
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.pending()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    def _run(self) -> None:
        while not self.closed:
            with self.lock:
                operation = self.queue[0] if self.queue else None
            if operation is None:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                self._apply(*operation)
            except down_errors() as exc:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    print(f"raypd.tune: the MLflow tracking server at {redact(self.tracking_uri)} does not answer "
                          f"({type(exc).__name__}); the study goes on and its results wait in {self.outbox}",
                          file=sys.stderr)
                self.wake.wait(RETRY_SECONDS)
                self.wake.clear()
                continue
            with self.lock:
                self.queue.pop(0)
                self._rewrite()
            if self.down_since is not None:
                print(f"raypd.tune: the MLflow tracking server at {redact(self.tracking_uri)} answers again after "
                      f"{time.monotonic() - self.down_since:.0f} s; sending the results that waited", file=sys.stderr)
                self.down_since = None

    def _rewrite(self) -> None:
        """The file holds what is still queued (whole or not at all); no file when nothing is."""
        if not self.queue:
            self.outbox.unlink(missing_ok=True)
            return
        with atomic_file(self.outbox) as tmp:
            tmp.write_text("".join(json.dumps(op) + "\n" for op in self.queue))

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)  # cheap: MLflow keeps one store per URI

    def _run_id(self, client, trial_id: str) -> str | None:
        """The trial's run: known, or found by its tags (a resumed trial, a replayed outbox)."""
        if trial_id not in self.runs:
            mine = f"tags.trial_id = '{trial_id}'"
            if self.instance:  # (a study of an earlier raypd has none)
                mine += f" and tags.study_instance = '{self.instance}'"
            found = client.search_runs([self.experiment_id], filter_string=mine)
            if not found:
                return None
            self.runs[trial_id] = found[0].info.run_id
            self.logged[trial_id] = {m.step for m in client.get_metric_history(self.runs[trial_id], "epoch")}
        return self.runs[trial_id]

    def _apply(self, kind: str, trial_id: str, *payload) -> None:
        from mlflow.entities import Metric, Param

        client = self._client()
        if self.experiment_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            self.experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
        run_id = self._run_id(client, trial_id)
        if kind == "start":
            name, params, tags = payload
            if run_id is None:
                run_id = client.create_run(self.experiment_id, run_name=name,
                                           tags={**tags, "trial_name": name, "trial_id": trial_id}).info.run_id
                self.runs[trial_id], self.logged[trial_id] = run_id, set()
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        elif run_id is None:  # results of a trial whose start never reached MLflow: nothing to add them to
            return
        elif kind == "metrics":
            metrics = [Metric(*m) for m in payload[0]]
            step = metrics[0].step if metrics else 0
            if step in self.logged.setdefault(trial_id, set()):  # every epoch once, also across resumes and replays
                return
            client.log_batch(run_id, metrics=metrics)
            self.logged[trial_id].add(step)
        elif kind == "history":  # the epochs a checkpoint holds and the run lacks
            held = self.logged.setdefault(trial_id, set())
            missing = [epoch for epoch in payload[0] if int(epoch["epoch"]) not in held]
            for start in range(0, len(missing), 100):  # MLflow takes up to 1,000 metrics per batch
                client.log_batch(run_id, metrics=[Metric(key, float(value), payload[1], int(epoch["epoch"]))
                                                  for epoch in missing[start:start + 100]
                                                  for key, value in epoch.items()])
            held.update(int(epoch["epoch"]) for epoch in missing)
        else:
            client.set_terminated(run_id, status=payload[0])


def mlflow_callback(tracking_uri: str, study_name: str, tags: dict, outbox: Path):
    """The study's MLflow logging: a Tune LoggerCallback that queues into the study's outbox
    (defined here, so that importing raypd.tracking does not import Ray Tune)."""
    from ray.tune.logger import LoggerCallback
    from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION
    from ray.tune.utils import flatten_dict

    class MlflowTrials(LoggerCallback):
        """One MLflow run per trial (a resumed trial finds its run again by its trial_id and
        study_instance tags), the trial's sampled values as parameters, every result as one
        log_batch at its epoch, and the run ended FINISHED or FAILED with the trial."""

        def __init__(self, queue: Sender, tags: dict):
            self.queue, self.tags = queue, tags

        def log_trial_start(self, trial):
            self.queue.put(["start", trial.trial_id, str(trial), flat_params(trial.config), self.tags])

        def log_trial_result(self, iteration, trial, result):
            # the trial's own epoch: a trial resumed after an interruption counts Tune's
            # training_iteration from 1 again while its loop goes on from its checkpoint
            step = result.get("epoch") or result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
            now = int(time.time() * 1000)  # when it happened, not when it is sent
            metrics = []
            for key, value in flatten_dict(result).items():
                try:
                    metrics.append([key, float(value), now, int(step)])
                except (TypeError, ValueError):  # as Ray's callback: only what converts to float
                    continue
            self.queue.put(["metrics", trial.trial_id, metrics])

        def log_trial_end(self, trial, failed: bool = False):
            self.queue.put(["end", trial.trial_id, "FAILED" if failed else "FINISHED"])

    return MlflowTrials(sender(tracking_uri, f"raypd-{study_name}", tags.get("study_instance"), Path(outbox)), tags)


# --------------------------------------------------------------------------- a study's start and end: its runs


def check_tracking_uri(uri: str) -> None:
    """MLflow takes this URI (a known scheme) and, for a tracking server (http, https), the
    server answers; checked before anything is written or any trial runs. Not for sqlite URIs:
    opening one creates the database."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri)
    except MlflowException as exc:
        raise ValueError(f"--tracking-uri {redact(uri)}: {redact(exc.message.strip().splitlines()[0])}") from None
    if uri.split(":", 1)[0] in ("http", "https"):
        import requests

        wait = float(os.environ.get("RAYPD_TRACKING_START_SECONDS", TRACKING_START_SECONDS))
        deadline, said = time.monotonic() + wait, False
        while True:
            try:  # quick requests, not MLflow's minutes of retries
                requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
                return
            except requests.RequestException as exc:
                if time.monotonic() >= deadline:
                    raise ValueError(f"--tracking-uri {redact(uri)}: no MLflow tracking server answers there "
                                     f"({type(exc).__name__}, waited {wait:.0f} s); start it (mlflow server ...) "
                                     "or pass another URI") from None
                if not said:  # the first miss: say so, once
                    said = True
                    print(f"raypd.tune: no MLflow tracking server answers at {redact(uri)} yet: waiting up to {wait:.0f} s "
                          "for one that is starting (a cluster's head starts it with `ray up`)", file=sys.stderr)
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def send_outbox(tracking_uri: str, name: str, instance: str | None, study_dir: Path,
                trial_histories: dict | None = None) -> None:
    """Wait (up to TRACKING_WAIT_SECONDS) until MLflow holds every result of the study's outbox
    (above), and every epoch of `trial_histories` (trial_id -> its epochs' metrics) its
    run lacks; a ValueError if the tracking server never answers (the outbox stays)."""
    queue = sender(tracking_uri, f"raypd-{name}", instance, study_dir / OUTBOX_FILE)
    now = int(time.time() * 1000)
    for trial_id, history in (trial_histories or {}).items():
        queue.put(["history", trial_id, history, now])
    if not queue.pending():
        return
    wait = float(os.environ.get("RAYPD_TRACKING_WAIT_SECONDS", TRACKING_WAIT_SECONDS))
    left = queue.flush(wait)
    if left:
        raise ValueError(f"the MLflow tracking server at {redact(tracking_uri)} has not answered for {wait:.0f} s: "
                         f"{left} results of study {name} wait in {study_dir / OUTBOX_FILE} (its trials are "
                         "done; their checkpoints are in the study folder); run the same command again once it "
                         "answers to send them")


def finish_mlflow(tracking_uri: str, name: str, summary: dict, instance: str) -> None:
    """Tag the best trial's run with its checkpoint. A study killed before Tune saved its
    state loses the trials it had just started (the searcher proposes new ones on resume):
    their runs are deleted, so the experiment holds exactly one run per trial. Only this study
    instance's runs (tag study_instance) are looked at: a study of the same NAME under another
    ROOT (or one run before its folder was removed) shares the experiment on a shared server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"raypd-{name}")
    trial_ids = {t["trial_id"] for t in summary["trials"]}
    for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.study_instance = '{instance}'",
                                  max_results=50_000):
        trial_id = run.data.tags.get("trial_id")
        if trial_id not in trial_ids:
            client.delete_run(run.info.run_id)
        elif trial_id == summary["best_trial_id"]:
            client.set_tag(run.info.run_id, "best_checkpoint", summary["best_checkpoint"])
            client.set_tag(run.info.run_id, "best_trial", "true")



# --------------------------------------------------------------------------- the registered model


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


def already_registered(name: str, summary: dict, tracking_uri: str) -> bool:
    """Whether there is nothing to register: no best model, or its latest registered version
    holds this best checkpoint (a read of the store, which must exist)."""
    if not summary.get("best_checkpoint"):
        return True
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return False  # register_best says why it does not register
    try:
        return registered_version(name, summary, tracking_uri)[0] is not None
    except (OSError, ValueError):  # a missing or damaged checkpoint: register_best says so
        return False


def register_best(name: str, summary: dict, tracking_uri: str, study_dir: Path, quiet: bool = False) -> None:
    """The best model as an MLflow model registered as raypd-<name> (log_and_register), a new
    version only when the best checkpoint changed. quiet: an old study's checkpoint without
    saved normalisation is reported on stderr and left unregistered."""
    if not summary.get("best_checkpoint"):
        return
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        # a study tracked elsewhere (--tracking-uri): do not create a store here
        print(f"raypd.tune: the best model is not registered: no MLflow store at {redact(tracking_uri)} "
              "(pass the study's --tracking-uri)", file=sys.stderr)
        return
    started = time.perf_counter()
    try:
        out = log_and_register(name, summary, tracking_uri, study_dir / TEST_SPLIT_FILE)
    except ValueError as exc:
        if not quiet:
            raise
        print(f"raypd.tune: the best model is not registered: {exc}", file=sys.stderr)
        return
    if out and out["new"]:
        print(f"raypd.tune: registered {out['model_uri']} in {time.perf_counter() - started:.1f} s "
              f"(MLflow {redact(tracking_uri)})", file=sys.stderr)



# --------------------------------------------------------------------------- the report


def log_report(root: Path, study: str, summary: dict, files: list[Path]) -> None:
    """The pictures and the page as artifacts of the best trial's MLflow run, and the refined
    test figures as its metrics."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    store = Path(root).absolute() / "mlflow.db"
    if not store.exists():  # a study tracked elsewhere (--tracking-uri): do not create a store here
        return
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(f"raypd-{study}")
    if experiment is None:
        return
    for run in client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.trial_id = '{summary['best_trial_id']}'"):
        for path in files:
            client.log_artifact(run.info.run_id, str(path), artifact_path="report")
        if summary["refined"] is None:
            continue
        now = int(time.time() * 1000)
        values = {f"{kind}_{key}": summary["refined"][kind][key] for kind in ("clean", "noise_2pct")
                  for key in ("model_mse", "refined_mse", "identified")}
        values.update({f"{kind}_{key}": summary["refined"][kind][key]["all"] for kind in ("clean", "noise_2pct")
                       for key in ("coverage_model", "coverage_refined")})
        client.log_batch(run.info.run_id, metrics=[Metric(f"test_{k}", float(v), now, 0) for k, v in values.items()
                                                   if v is not None])
