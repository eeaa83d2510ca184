"""MLflow for a study: one run per trial, every result sent through an outbox kept on disk.

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
import sys
import threading
import time
from pathlib import Path

from raypd.cli import redact

OUTBOX_FILE = "mlflow_outbox.jsonl"  # in ROOT/tune/NAME: what MLflow has not taken yet
RETRY_SECONDS = 2.0  # between tries while the tracking server does not answer
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
        tmp = self.outbox.with_name(f".{self.outbox.name}.tmp")
        tmp.write_text("".join(json.dumps(op) + "\n" for op in self.queue))
        tmp.replace(self.outbox)

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
