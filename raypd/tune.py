"""Stage 3: a study on Ray Tune: OptunaSearch (or HyperOpt) + ASHA, MLflow for every trial.

    python -m raypd.tune --study filters [--searcher optuna|hyperopt] [--root runs] [--set k=v ...]

The study's dataset is generated once (when missing), read and prepared once by this driver
and put into the object store; every trial reads it from there. Each trial is a driver
function that runs raypd.train's loop on Ray Train: in local mode (train.num_workers 0, as
every study file but base sets) inside the trial's own process, which keeps a trial's fixed cost near
a second; with a real worker group when the study asks for workers. Re-running the same
command resumes an interrupted study; re-running a finished one prints its summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

from raypd import __version__
from raypd.cli import ArgumentParser, absolute_path, check_shared, check_writable, init_ray, run_main
from raypd.cluster import Capacity, cluster_capacity
from raypd.config import (Config, check_searched_keys, condition_holds, dataset_dir, derive_variables, from_dict,
                          load_config, merge, space_entry, to_dict, with_defaults)
from raypd.dataio import read_json, write_json
from raypd.dataset import open_dataset, prepare, split_series
from raypd.lock import hold
from raypd.tracking import (OUTBOX_FILE, already_registered, check_tracking_uri, finish_mlflow, mlflow_callback,
                            register_best, send_outbox)
from raypd.serve import CALIBRATION_SPLIT_FILE, TEST_SPLIT_FILE, write_test_split

STUDIES = Path(__file__).resolve().parents[1] / "tune_configs"
STUDY_FILE = "study.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".raypd.lock"  # held while a process writes the study (raypd.lock)


# --------------------------------------------------------------------------- the space


def tune_domains(config: Config) -> dict:
    """Each entry of the study's space as a Ray Tune domain (what the searchers convert)."""
    from ray import tune

    out = {}
    for name, spec in config.search.space.items():
        kind, args, _ = space_entry(spec)
        if kind == "loguniform":
            out[name] = tune.loguniform(args[0], args[1])
        elif kind == "uniform":
            out[name] = tune.uniform(args[0], args[1])
        elif kind == "int":
            out[name] = tune.qrandint(args[0], args[1], args[2]) if len(args) == 3 else tune.randint(args[0], args[1] + 1)
        else:
            out[name] = tune.choice(args)
    return out


def in_order(space: dict) -> list[str]:
    """The space's names, those without a condition first (a condition names one of them)."""
    return sorted(space, key=lambda name: "when" in space[name])


def sampled(space: dict, params: dict) -> dict:
    """`params` less the entries whose condition does not hold."""
    return {name: value for name, value in params.items()
            if name not in space or condition_holds(space[name].get("when"), params)}


class OptunaSpace:
    """The study's space as Optuna's define-by-run function (OptunaSearch(space=...)): an
    entry with a condition (`when`) is suggested only where it holds, so the Optuna study and
    Tune's trial config hold a family's parameters only in that family's trials. The
    distributions are the ones OptunaSearch makes of Ray's domains (tune_domains)."""

    def __init__(self, space: dict):
        self.space = space

    def __call__(self, trial) -> None:
        params: dict = {}
        for name in in_order(self.space):
            kind, args, when = space_entry(self.space[name])
            if not condition_holds(when, params):
                continue
            if kind in ("loguniform", "uniform"):
                params[name] = trial.suggest_float(name, args[0], args[1], log=kind == "loguniform")
            elif kind == "int":
                params[name] = trial.suggest_int(name, args[0], args[1], step=args[2] if len(args) == 3 else 1)
            else:
                params[name] = trial.suggest_categorical(name, args)


def hyperopt_space(config: Config) -> dict:
    """The study's space in HyperOpt's terms: an entry with a condition sits in a nested
    choice, inside the option of the value it holds for (HyperOpt's conditional spaces)."""
    from hyperopt import hp
    from ray.tune.search.hyperopt import HyperOptSearch

    space, domains = config.search.space, tune_domains(config)
    owners = {next(iter(spec["when"])) for spec in space.values() if "when" in spec}
    nodes = HyperOptSearch.convert_search_space({n: d for n, d in domains.items() if n not in owners})
    for owner in owners:
        options = []
        for value in space[owner]["choice"]:
            option = {owner: value}
            for name, node in nodes.items():
                if "when" in space[name] and condition_holds(space[name]["when"], {owner: value}):
                    option[name] = node  # one node per entry, reused by every option it belongs to
            options.append(option)
        nodes[owner] = hp.choice(owner, options)
    return {name: node for name, node in nodes.items() if "when" not in space.get(name, {})}


def make_hyperopt_search(**kwargs):
    from ray.tune.search.hyperopt import HyperOptSearch

    # defined here, where HyperOpt is imported (Tune saves searchers with cloudpickle)
    class FlatHyperOptSearch(HyperOptSearch):
        """HyperOptSearch handing Tune one flat config: a nested choice's option ({KEY: value,
        entry: ...}) is merged into the top level."""

        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config
            flat = {}
            for name, value in config.items():
                flat.update(value if isinstance(value, dict) else {name: value})
            return flat

    return FlatHyperOptSearch(**kwargs)


def resolve(config: Config, params: dict) -> Config:
    """The trial's config: the study's, with the sampled values (dotted names) and the derived
    keys set (a derived key whose variables were not all sampled keeps the study's value). Raises ValueError naming the key if the result is not a valid config."""
    overrides: dict = {}

    def put(key: str, value) -> None:
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    for name, value in params.items():
        if "." in name:
            put(name, value)
    for key, spec in config.search.derive.items():
        kind, args = next(iter(spec.items()))
        if any(name not in params for name in derive_variables(spec, config.search.space)):
            continue  # a variable under a condition that did not hold: the key keeps its value
        if kind == "repeat":
            count = params[args[1]]
            if isinstance(count, bool) or not isinstance(count, (int, float)) or count != int(count):
                raise ValueError(f"search.derive.{key}: repeat's count {args[1]} must be a whole number "
                                 f"(got {count!r})")
            put(key, [args[0]] * int(count))
        else:
            put(key, [params[a] if isinstance(a, str) and a in params else a for a in args])
    return from_dict(Config, merge(to_dict(config), overrides)).validate()


def check_space(config: Config) -> None:
    """Before any trial runs: both corners of the space (all lows, all highs) must make valid
    configs, and so must every value of each variable (each choice, an int's bounds, a float
    range's bounds as floats) with the others at either corner."""
    from raypd.model import check_fits

    check_searched_keys(config)
    values = {}
    for name, spec in config.search.space.items():
        kind, args, _ = space_entry(spec)
        values[name] = (list(args) if kind == "choice" else args[:2] if kind == "int"
                        else [float(args[0]), float(args[1])])  # Optuna and HyperOpt sample floats
    corners = [{name: v[0] for name, v in values.items()}, {name: v[-1] for name, v in values.items()}]
    trials = corners + [{**corner, name: value} for corner in corners
                        for name, choices in values.items() for value in choices]
    for params in trials:
        try:
            check_fits(resolve(config, sampled(config.search.space, params)), config.data.time_points)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"search space: {exc}") from None


# --------------------------------------------------------------------------- resources


class TrialPlan(NamedTuple):
    resources: dict  # the trial's own process, for tune.with_resources
    concurrent: int  # trials at a time
    use_gpu: bool
    gpus: float  # GPUs one trial holds in all (its process, or its workers)


def trial_resources(config: Config, capacity: Capacity) -> TrialPlan:
    """What a trial holds and how many run at once, from what the cluster has or can grow to
    (raypd.cluster), not from the nodes that happen to be up.

    A local-mode trial is one bundle of 1 CPU (+ gpus_per_worker GPUs when training uses
    GPUs). A worker-group trial holds 1 CPU for its driver function and starts num_workers
    workers of 1 CPU (+ gpus_per_worker GPUs) beside it; counting those too keeps concurrent
    trials from waiting on each other's workers (on 2 CPUs, two trials of one 1-CPU worker
    each deadlocked in a probe). Trials beyond what is up now are queued by Tune, and their
    demand is what makes the autoscaler add nodes."""
    from raypd.train import use_gpu

    gpu = use_gpu(config, capacity)
    workers = config.train.num_workers
    gpus = config.train.gpus_per_worker if gpu else 0
    worker = {"CPU": 1, "GPU": gpus}
    trial_gpus = gpus * max(workers, 1)
    need = f"{1 + workers} CPUs and {trial_gpus:g} GPUs"
    if not capacity.fits(worker):
        raise ValueError(f"one trial needs {need} ({'1 CPU' if workers == 0 else f'{workers} workers of 1 CPU'}"
                         f"{f' + {gpus:g} GPU' if gpus else ''} each) and no node can hold "
                         f"{'it' if workers == 0 else 'a worker'}: {capacity.describe()} (lower "
                         f"train.gpus_per_worker, or set train.use_gpu=false)")
    if workers == 0:
        fit = sum(t.max_nodes * t.holds(worker) for t in capacity.node_types)
    else:  # a worker group may span nodes
        fit = math.floor(capacity.total("CPU") / (1 + workers) + 1e-9)
        if gpus:
            fit = min(fit, math.floor(capacity.total("GPU") / (gpus * workers) + 1e-9))
    if fit < 1:
        raise ValueError(f"one trial needs {need}; {capacity.describe()} (lower train.num_workers)")
    limit = config.search.max_concurrent or fit
    return TrialPlan(resources={"cpu": 1, "gpu": gpus if workers == 0 else 0},
                     concurrent=max(1, min(limit, fit, config.search.num_samples)), use_gpu=gpu,
                     gpus=trial_gpus)


# --------------------------------------------------------------------------- the trial


def make_trial(study: Config, data_ref, study_dir: Path, use_gpu: bool):
    """The per-trial driver function Tune runs (Ray's Train-inside-Tune pattern). use_gpu is
    decided once by the driver from what the cluster can grow to, not by each trial from the
    nodes that are up when it starts."""

    def trial(params: dict) -> None:
        from ray import tune

        from raypd.train import fit

        config = resolve(study, params)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, use_gpu=use_gpu))
        trial_id = tune.get_context().get_trial_id()
        # study_dir/trials/<id> holds the trial's checkpoints: a restored trial continues there
        fit(config, data_ref, study_dir / "trials" / trial_id, name=f"train-{trial_id}", in_tune=True)

    return trial




# --------------------------------------------------------------------------- the study


def study_path(study: str | None, config_file: str | None) -> Path:
    if config_file:
        return Path(config_file)
    path = STUDIES / f"{study}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in STUDIES.glob("*.yaml"))
        raise ValueError(f"no study {study!r}: tune_configs/ holds {', '.join(known)}")
    return path


def run_study(config: Config, name: str, root: str | Path = "runs", tracking_uri: str | None = None,
              address: str | None = None) -> dict:
    """Run (or resume, or just summarise) study `name`; return its summary."""
    from raypd.model import check_fits

    root = Path(root).absolute()
    study_dir = root / "tune" / name
    resolved = to_dict(config)
    check_fits(config, config.data.time_points)
    check_space(config)
    if (study_dir / STUDY_FILE).exists():
        damaged = " (the study folder is damaged: use another --root, or remove that folder)"
        if with_defaults(Config, read_json(study_dir / STUDY_FILE, damaged)) != resolved:
            raise ValueError(f"{study_dir} holds study {name!r} run with other settings; "
                             "use another --root (or remove that folder) to start afresh")
        if (study_dir / SUMMARY_FILE).exists():
            summary = read_json(study_dir / SUMMARY_FILE, damaged)
            # a finished study: (re-)register its best model; nothing is written (not even the
            # lock) when it is registered already
            uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
            if (study_dir / OUTBOX_FILE).exists():  # results a stop or an outage left unsent
                with hold(study_dir / LOCK_FILE, f"study {name} in {study_dir}"):
                    send_outbox(uri, name, study_instance(study_dir), study_dir)
            if not already_registered(name, summary, uri):
                with hold(study_dir / LOCK_FILE, f"study {name} in {study_dir}"):
                    register_best(name, summary, uri, study_dir, quiet=True)
            return summary

    created = [d for d in (root, root / "tune", study_dir) if not d.exists()]
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        # one writer per study, also across the nodes that share ROOT (raypd.lock): taken
        # first, so that a second process is refused before it generates or reads anything
        with hold(study_dir / LOCK_FILE, f"study {name} in {study_dir}"):
            if (study_dir / SUMMARY_FILE).exists():  # finished by another process meanwhile
                return read_json(study_dir / SUMMARY_FILE)
            return _run_locked(config, name, root, study_dir, resolved, tracking_uri, address)
    except BaseException:
        for folder in reversed(created):  # refused before anything was written: nothing left behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _run_locked(config: Config, name: str, root: Path, study_dir: Path, resolved: dict, tracking_uri: str | None,
                address: str | None) -> dict:
    """run_study's work, under the study's lock."""
    import ray
    from ray import tune

    from raypd.generate import generate
    from raypd.train import held_splits

    init_ray(address)
    capacity = cluster_capacity()
    plan = trial_resources(config, capacity)  # a trial that can never fit stops here
    limited = " (search.max_concurrent)" if plan.concurrent == config.search.max_concurrent else ""
    print(f"raypd.tune: {plan.concurrent} trial(s) at a time{limited}, each {1 + config.train.num_workers} CPU(s) "
          f"and {plan.gpus:g} GPU(s); from {capacity.describe()}", file=sys.stderr)
    check_shared(root)
    data_dir = dataset_dir(config, root)
    manifest = generate(config.data, data_dir)
    files = open_dataset(data_dir)
    # one copy in the object store for every trial (the series too, unless trials stream them)
    data_ref = ray.put(prepare(data_dir, config.train, held=held_splits(config.train, files)))
    prepared = ray.get(data_ref)  # the store's read-only view: the driver keeps no copy of its own
    write_json(study_dir / STUDY_FILE, resolved)
    instance = study_instance(study_dir)

    tracking_uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    if tracking_uri.split(":", 1)[0] in ("http", "https"):
        # a call to a server that went away fails at once (MLflow's default: 7 retries,
        # minutes of backoff, while every trial waits): the results wait in the outbox
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    tags = {"study": name, "content_hash": manifest["content_hash"], "data_seed": str(config.data.seed),
            "raypd_version": __version__, "searcher": config.search.searcher, "study_instance": instance}
    if tracking_uri.startswith("sqlite:"):  # keep artifacts under ROOT, not in ./mlruns
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        if client.get_experiment_by_name(f"raypd-{name}") is None:
            client.create_experiment(f"raypd-{name}", artifact_location=(root / "mlartifacts").as_uri())
    trainable = tune.with_resources(make_trial(config, data_ref, study_dir, plan.use_gpu), plan.resources)
    # Tune's CSV and JSON result files, not its TensorBoard files (TensorBoard is not
    # installed with raypd; MLflow shows the curves)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # A trial that fails (a lost node, a killed worker) is retried, continuing from its
    # checkpoints in study_dir/trials/<id>.
    run_config = tune.RunConfig(name=name, storage_path=str(root / "tune"), verbose=1,
                                failure_config=tune.FailureConfig(max_failures=config.search.max_failures),
                                callbacks=[mlflow_callback(tracking_uri, name, tags, study_dir / OUTBOX_FILE),
                                           CSVLoggerCallback(),
                                           JsonLoggerCallback()])
    if tune.Tuner.can_restore(study_dir) and not list(study_dir.glob("experiment_state-*.json")):
        # Tune writes tuner.pkl first and its experiment state (trials, searcher) a few
        # seconds later: a study stopped in between has nothing to restore, and nothing of it
        # has run to the end; Tuner.restore would fail ("no search space has been defined").
        print(f"raypd.tune: study {name} in {study_dir} ended (stopped or failed) before Tune saved its "
              "state: starting it afresh", file=sys.stderr)
        discard_tune_state(study_dir, name)
    if tune.Tuner.can_restore(study_dir):
        print(f"raypd.tune: resuming study {name} from {study_dir}", file=sys.stderr)
        tuner = tune.Tuner.restore(str(study_dir), trainable=trainable, resume_errored=True)
    else:
        # the searcher holds the space (it may have conditions): no param_space
        tuner = tune.Tuner(trainable, run_config=run_config,
                           tune_config=tune_config(config, plan.concurrent, name, study_dir))
    results, interrupted = fit_or_interrupted(tuner)
    if interrupted:  # Tune stopped its trials and saved its state: the study is not done (what
        raise KeyboardInterrupt  # MLflow has not taken yet stays in the outbox file, for the next run)
    send_outbox(tracking_uri, name, instance, study_dir)
    summary = summarise(config, name, results, prepared, study_dir)
    # an epoch checkpointed just before a kill may never have reached Tune (its result was
    # lost with the process) while the resumed trial goes on after it: its checkpoint holds it
    send_outbox(tracking_uri, name, instance, study_dir, histories(summary))
    finish_mlflow(tracking_uri, name, summary, instance)
    write_json(study_dir / SUMMARY_FILE, summary)
    register_best(name, summary, tracking_uri, study_dir)
    return summary


def histories(summary: dict) -> dict:
    """Each trial's epochs as its last checkpoint holds them."""
    from raypd.train import read_state

    return {t["trial_id"]: read_state(Path(t["path"]) / "checkpoints" / "last")["history"]
            for t in summary["trials"] if t["epochs"]}


def fit_or_interrupted(tuner):
    """tuner.fit(), and whether Ctrl-C (or SIGTERM, raypd.cli) stopped it. Tune catches the
    first SIGINT itself, stops its trials, saves its state and returns the results as if the
    study had ended (its trials then read TERMINATED). Its handler puts back the handler it
    found, and only when a signal came: ours, in place during fit, says whether one did."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # no signals there
        return tuner.fit(), False

    def before_tune(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, before_tune)
    try:
        results = tuner.fit()
    finally:
        interrupted = signal.getsignal(signal.SIGINT) is before_tune
        signal.signal(signal.SIGINT, previous)
    return results, interrupted


def discard_tune_state(study_dir: Path, name: str) -> None:
    """Tune's files of a study that has nothing to restore (study.json and raypd's trials/
    folders stay: a new trial never reuses an old trial's id)."""
    import shutil

    for path in [study_dir / "tuner.pkl", study_dir / OPTUNA_FILE, *study_dir.glob("searcher-state-*"),
                 *study_dir.glob("search_gen_state-*"),
                 *study_dir.glob("basic-variant-state-*"), *study_dir.glob(f"{name}_*")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


INSTANCE_FILE = "instance.json"  # in ROOT/tune/NAME: which study this folder holds, for MLflow


def study_instance(study_dir: Path) -> str:
    """The id of the study this folder holds, made when the folder's study started: its MLflow
    runs carry it (tag study_instance), so that only its own runs are ever deleted."""
    import uuid

    path = study_dir / INSTANCE_FILE
    if path.exists():
        return read_json(path, " (remove the study folder, or use another --root)")["study_instance"]
    instance = uuid.uuid4().hex
    write_json(path, {"study_instance": instance, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    return instance


OPTUNA_FILE = "optuna.db"  # in ROOT/tune/NAME: the Optuna study of an optuna-searched study


def optuna_storage_url(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).absolute() / OPTUNA_FILE}"


def searched_metric(config: Config) -> str:
    """What the searcher records as a trial's value: with val_loss, the trial's best validation
    loss over the epochs it ran (best_val_loss), the value summary.json, MLflow's best_val_loss
    and the best checkpoint stand for; not its last epoch's, which an ASHA-stopped or
    early-stopped trial may have passed. (ASHA compares trials on each epoch's val_loss.)"""
    return "best_val_loss" if config.search.metric == "val_loss" else config.search.metric


def tune_config(config: Config, concurrent: int, study_name: str, study_dir: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    search = config.search
    if not search.space:
        # nothing to search (base: one run of one model): Tune's own generator runs the
        # study's config num_samples times (Optuna and HyperOpt refuse an empty space)
        searcher = None
    elif search.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        import optuna
        from optuna.storages import RDBStorage

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB ..."

        # The search's Optuna study lives in the study folder, not only in Tune's pickled
        # searcher: optuna-dashboard and optuna.load_study (the notebook's plots) read it,
        # while the study runs and after; a resumed study goes on writing to it.
        searcher = OptunaSearch(space=OptunaSpace(search.space), metric=searched_metric(config), mode=search.mode,
                                seed=search.seed,
                                study_name=f"raypd-{study_name}",
                                storage=RDBStorage(optuna_storage_url(study_dir)))
    else:
        searcher = make_hyperopt_search(space=hyperopt_space(config), metric=searched_metric(config),
                                        mode=search.mode, random_state_seed=search.seed)
    scheduler = (ASHAScheduler(time_attr="epoch", metric=search.metric, mode=search.mode,
                               max_t=config.train.epochs, grace_period=min(search.grace_period, config.train.epochs),
                               reduction_factor=search.reduction_factor)
                 if search.scheduler == "asha" else FIFOScheduler())
    return tune.TuneConfig(search_alg=searcher and ConcurrencyLimiter(searcher, max_concurrent=concurrent),
                           max_concurrent_trials=None if searcher else concurrent,
                           scheduler=scheduler, num_samples=search.num_samples, reuse_actors=True,
                           # the dashboard and Tune's table show "<study>_<trial id>"
                           trial_name_creator=lambda trial: f"{study_name}_{trial.trial_id}",
                           trial_dirname_creator=lambda trial: f"{study_name}_{trial.trial_id}")


def summarise(config: Config, name: str, results, prepared, study_dir: Path) -> dict:
    """summary.json: the best trial (by its best validation loss), its best checkpoint
    (its model-only intervals calibrated on the calibration split) evaluated on the test split
    in raw units, with its intervals' coverage, and one entry per trial. The study's split
    files (what report and predict --refine read, not ROOT/data) are written from the same
    reads of the dataset's files."""
    from raypd.train import evaluate_best, read_state

    trials = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("_", 1)[1]
        trial_dir = study_dir / "trials" / trial_id
        state_file = trial_dir / "checkpoints" / "last"
        state = read_state(state_file) if (state_file / "state.pt").exists() else None
        history = state["history"] if state else []
        trials.append({
            "trial_id": trial_id,
            "config": result.config,
            "status": "ERROR" if result.error else "TERMINATED",
            # the last line of a Ray task error is the exception itself
            "error": [line for line in str(result.error).splitlines() if line.strip()][-1] if result.error else None,
            "epochs": len(history),
            "val_loss": min((h["val_loss"] for h in history), default=None),
            "last_val_loss": history[-1]["val_loss"] if history else None,
            "path": str(trial_dir),
            "node_id": (result.metrics or {}).get("node_id"),
        })
    done = [t for t in trials if t["val_loss"] is not None]
    best = min(done, key=lambda t: t["val_loss"]) if done else None
    summary = {"study": name, "searcher": config.search.searcher, "scheduler": config.search.scheduler,
               "num_trials": len(trials), "total_epochs": sum(t["epochs"] for t in trials),
               "best_trial_id": best["trial_id"] if best else None,
               "best_config": best["config"] if best else None,
               "best_val_loss": best["val_loss"] if best else None,
               "best_checkpoint": str(Path(best["path"]) / "checkpoints" / "best") if best else None,
               "best_test_metrics": None, "trials": trials}
    split_files = {"test": study_dir / TEST_SPLIT_FILE, "calib": study_dir / CALIBRATION_SPLIT_FILE}
    if best:
        summary["best_test_metrics"], _, _ = evaluate_best(Path(summary["best_checkpoint"]), prepared, split_files)
    else:
        for split, path in split_files.items():
            write_test_split(path, split_series(prepared, split))
    return summary


SMOKE_SAMPLES = 2_000  # a study on fewer samples is a check that the pipeline runs, not a result


def print_summary(summary: dict, config: Config) -> None:
    print(f"study {summary['study']}: {summary['num_trials']} trials, {summary['total_epochs']} epochs in all")
    print(f"{'trial':<12} {'status':<11} {'epochs':>6} {'val_loss':>10}  config")
    for t in sorted(summary["trials"], key=lambda t: (t["val_loss"] is None, t["val_loss"] or 0)):
        loss = f"{t['val_loss']:.4f}" if t["val_loss"] is not None else "-"
        print(f"{t['trial_id']:<12} {t['status']:<11} {t['epochs']:>6} {loss:>10}  {json.dumps(t['config'])}")
    if summary["best_test_metrics"]:
        m = summary["best_test_metrics"]
        print(f"best: {summary['best_trial_id']} val_loss {summary['best_val_loss']:.4f}; test mse {m['mse']:.4f} "
              f"(raw units), r2 {'n/a' if m['r2'] is None else format(m['r2'], '.3f')}; checkpoint {summary['best_checkpoint']}")
        budget = f"{config.data.samples:,} samples, at most {config.train.epochs} epochs a trial"
        if config.data.samples < SMOKE_SAMPLES:
            print(f"note: a smoke run's figure ({budget}): it shows the pipeline runs, not what the model can do "
                  "(README, \"Accuracy\", has the studies' results)")
        else:
            print(f"({budget})")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.tune", description="Run a hyperparameter study on Ray Tune.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help=f"a study in tune_configs/ ({', '.join(sorted(f.stem for f in STUDIES.glob('*.yaml')))})")
    which.add_argument("--config", help="a study file elsewhere")
    p.add_argument("--searcher", choices=["optuna", "hyperopt"], help="overrides search.searcher")
    p.add_argument("--root", default="runs", help="datasets, studies and mlflow.db go here (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, value in YAML (e.g. --set search.num_samples=4)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///ROOT/mlflow.db)")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved study as JSON and exit")
    args = p.parse_args(argv)

    def body() -> int:
        path = study_path(args.study, args.config)
        sets = list(args.set) + ([f"search.searcher={args.searcher}"] if args.searcher else [])
        config = load_config(str(path), sets)
        name = args.study or path.stem
        if args.print_config:
            check_space(config)
            print(json.dumps({"study": name, **to_dict(config)}, indent=1))
            return 0
        root = absolute_path(args.root, "--root", args.address)
        if root.exists() and not root.is_dir():
            raise ValueError(f"--root {args.root} is a file; it must be a folder")
        check_writable(root, "--root")
        if args.tracking_uri and not args.tracking_uri.startswith("sqlite:"):
            check_tracking_uri(args.tracking_uri)
        print_summary(run_study(config, name, root, args.tracking_uri, args.address), config)
        return 0

    run_main("raypd.tune", body)


if __name__ == "__main__":
    main()
