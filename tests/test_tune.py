"""raypd.tune: a real study (Ray Tune, Optuna/HyperOpt, ASHA, MLflow on sqlite), resume
after a kill, summary, and bad study input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.cluster import Capacity, NodeType, node_types_from_config
from raypd.cluster import use_gpu
from raypd.train import ddp_backend
from raypd.tune import TrialPlan, resolve, run_study, trial_resources
from tests.conftest import REPO, run_cli, snapshot

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")


def runs_of(root: Path, study: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"raypd-{study}")
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    return root, run_study(load_config(SMOKE), "smoke", root)


def test_smoke_study_end_to_end(smoke):
    root, summary = smoke
    assert summary["num_trials"] == 4 and len({t["trial_id"] for t in summary["trials"]}) == 4
    assert all(t["status"] == "TERMINATED" and 1 <= t["epochs"] <= 3 for t in summary["trials"])
    assert summary["total_epochs"] < 12  # ASHA stopped some trials early
    best = min(summary["trials"], key=lambda t: t["val_loss"])
    assert summary["best_trial_id"] == best["trial_id"] and summary["best_val_loss"] == best["val_loss"]
    assert 1e-3 <= summary["best_config"]["train.lr"] <= 1e-2
    assert Path(summary["best_checkpoint"], "state.pt").exists()
    test = summary["best_test_metrics"]
    assert test["target_names"][1] == "mu_1" and test["per_target"]["mu_1"]["mse"] == 0.0
    assert json.loads((root / "tune" / "smoke" / "summary.json").read_text()) == summary


def test_the_optuna_study_is_kept_in_the_study_folder_for_optunas_own_tools(smoke):
    """optuna-dashboard and optuna.load_study read ROOT/tune/NAME/optuna.db: every trial is
    there, complete, with its best val_loss (the value summary.json gives it, also for the
    trials ASHA stopped), and the notebook's plots draw from it."""
    import optuna
    import optuna.visualization.matplotlib as plots

    root, summary = smoke
    study = optuna.load_study(study_name="raypd-smoke", storage=f"sqlite:///{root / 'tune' / 'smoke' / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == summary["num_trials"] == 4
    assert sorted(t.value for t in complete) == pytest.approx(sorted(t["val_loss"] for t in summary["trials"]))
    assert sorted(t.params["train.lr"] for t in complete) == pytest.approx(
        sorted(t["config"]["train.lr"] for t in summary["trials"]))
    assert study.best_value == pytest.approx(summary["best_val_loss"])
    assert plots.plot_parallel_coordinate(study) is not None and plots.plot_slice(study) is not None


def test_mlflow_has_one_run_per_trial_with_tags_and_epochs(smoke):
    root, summary = smoke
    client, runs = runs_of(root, "smoke")
    assert len(runs) == 4
    assert {r.data.tags["trial_id"] for r in runs} == {t["trial_id"] for t in summary["trials"]}
    for run in runs:
        tags = run.data.tags
        assert tags["study"] == "smoke" and tags["content_hash"].startswith("sha256:")
        assert tags["data_seed"] == "42" and tags["raypd_version"]
        assert "train.lr" in run.data.params
        trial = next(t for t in summary["trials"] if t["trial_id"] == tags["trial_id"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert len(history) == trial["epochs"]
    best = [r for r in runs if r.data.tags.get("best_trial") == "true"]
    assert len(best) == 1 and best[0].data.tags["best_checkpoint"] == summary["best_checkpoint"]


def test_finished_study_prints_its_summary(smoke):
    root, summary = smoke
    before = snapshot(root / "tune")
    start = time.perf_counter()
    result = run_cli("raypd.tune", "--study", "smoke", "--root", str(root), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"best: {summary['best_trial_id']}" in result.stdout and time.perf_counter() - start < 20
    assert snapshot(root / "tune") == before


def test_same_root_other_settings_is_refused(smoke):
    root, _ = smoke
    with pytest.raises(ValueError, match="run with other settings"):
        run_study(load_config(SMOKE, ["train.epochs=2"]), "smoke", root)


def test_hyperopt_with_derived_space(ray_local, tmp_path):
    config = load_config(SMOKE, [
        "search.searcher=hyperopt", "search.num_samples=3", "train.epochs=1",
        "search.space={conv_layers: {int: [1, 2]}, train.lr: {choice: [0.001, 0.003]}}",
        "search.derive={model.filters: {repeat: [8, conv_layers]}, model.kernel_sizes: {repeat: [3, conv_layers]}}"])
    summary = run_study(config, "hyper", tmp_path)
    assert summary["num_trials"] == 3 and summary["searcher"] == "hyperopt"
    for trial in summary["trials"]:
        assert trial["config"]["conv_layers"] in (1, 2) and trial["config"]["train.lr"] in (0.001, 0.003)
        model = resolve(config, trial["config"]).model
        assert model.filters == [8] * trial["config"]["conv_layers"] == [8] * len(model.kernel_sizes)


def live(**resources) -> Capacity:
    return Capacity((NodeType("node", resources, 1),), "live nodes")


def test_concurrency_fits_the_cluster():
    local = load_config(SMOKE)
    assert trial_resources(local, live(CPU=2)) == TrialPlan({"cpu": 1, "gpu": 0}, 2, False, 0)
    group = load_config(SMOKE, ["train.num_workers=1"])
    assert trial_resources(group, live(CPU=2)).concurrent == 1  # two such trials deadlock on 2 CPUs
    assert trial_resources(load_config(SMOKE, ["train.num_workers=1", "train.use_gpu=true"]),
                           live(CPU=16, GPU=2)).concurrent == 2
    half = load_config(SMOKE, ["train.num_workers=2", "train.use_gpu=true", "train.gpus_per_worker=0.5"])
    assert trial_resources(half, live(CPU=16, GPU=1))[1:] == (1, True, 1.0)  # two workers share one GPU
    assert trial_resources(load_config(SMOKE, ["train.use_gpu=true", "train.gpus_per_worker=0.25"]),
                           live(CPU=16, GPU=1)) == TrialPlan({"cpu": 1, "gpu": 0.25}, 4, True, 0.25)
    with pytest.raises(ValueError, match="one trial needs 3 CPUs"):
        trial_resources(load_config(SMOKE, ["train.num_workers=2"]), live(CPU=2))


def test_resources_come_from_what_an_autoscaling_cluster_can_grow_to():
    """cluster.yaml right after `ray up`: nothing but a 0-CPU head is up. The node types
    decide: trials ask for GPUs (so the GPU type starts) and run as many at once as the
    types' max_workers hold; a trial no node type can hold is refused, naming the types."""
    import copy

    import yaml
    from ray.autoscaler._private.util import prepare_config

    launcher = prepare_config(copy.deepcopy(yaml.safe_load((REPO / "cluster.yaml").read_text())))
    grown = Capacity(node_types_from_config(launcher), "cluster.yaml")
    assert {t.name: t.max_nodes for t in grown.node_types} == {
        "ray.head.default": 1, "ray.worker.gpu": 4, "ray.worker.cpu": 4}
    filters = load_config(str(REPO / "tune_configs" / "filters.yaml"))
    assert trial_resources(filters, grown) == TrialPlan({"cpu": 1, "gpu": 1.0}, 4, True, 1.0)  # 4 GPU nodes of 1 GPU
    quarter = load_config(str(REPO / "tune_configs" / "filters.yaml"), ["train.gpus_per_worker=0.25"])
    assert trial_resources(quarter, grown).concurrent == 12  # num_samples caps 16
    cpu_only = load_config(str(REPO / "tune_configs" / "filters.yaml"), ["train.use_gpu=false"])
    assert trial_resources(cpu_only, grown) == TrialPlan({"cpu": 1, "gpu": 0}, 12, False, 0)  # 4 x 4 + 4 x 16 CPUs
    assert not use_gpu(filters, Capacity(grown.node_types[:1], "head only"))
    two_gpus = load_config(str(REPO / "tune_configs" / "filters.yaml"), ["train.gpus_per_worker=2"])
    with pytest.raises(ValueError, match="no node can hold it: cluster.yaml: ray.head.default"):
        trial_resources(two_gpus, grown)


def test_ddp_backend_allows_ranks_that_share_a_gpu():
    assert ddp_backend(load_config(SMOKE).train, gpu=False) == "gloo"
    assert ddp_backend(load_config(SMOKE, ["train.gpus_per_worker=1"]).train, gpu=True) == "nccl"
    # NCCL refuses two ranks on one device ("Duplicate GPU detected"); gloo does not
    assert ddp_backend(load_config(SMOKE, ["train.gpus_per_worker=0.5"]).train, gpu=True) == "gloo"


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_or_doubling(tmp_path):
    args = ["raypd.tune", "--study", "smoke", "--root", str(tmp_path), "--set", "train.epochs=6",
            "--set", "search.num_samples=6", "--set", "search.scheduler=fifo"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "tune" / "smoke" / "trials"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(trials.glob("*/checkpoints/last/state.pt"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from raypd.train import read_state

    before = {p.parents[2].name: read_state(p.parent)["history"] for p in trials.glob("*/checkpoints/last/state.pt")}
    assert len(before) >= 3 and not (tmp_path / "tune" / "smoke" / "summary.json").exists()

    result = run_cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "tune" / "smoke" / "summary.json").read_text())
    assert summary["num_trials"] == 6 and len({t["trial_id"] for t in summary["trials"]}) == 6
    assert all(t["epochs"] == 6 for t in summary["trials"])
    for trial_id, history in before.items():  # epochs done before the kill were kept, not re-run
        after = read_state(trials / trial_id / "checkpoints" / "last")["history"]
        assert after[: len(history)] == history
    client, runs = runs_of(tmp_path, "smoke")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])
    for run in runs:  # every epoch exactly once, at its own step, also in the trials that resumed
        for key in ("epoch", "val_loss"):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(1, 7)), (run.data.tags["trial_id"], key)
        assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch"),
                                        key=lambda m: m.step)] == list(range(1, 7))


def test_missing_study_and_print_config(tmp_path):
    result = run_cli("raypd.tune", "--study", "nope")
    assert result.returncode == 2 and "no study 'nope': tune_configs/ holds" in result.stderr
    assert "filters" in result.stderr and "smoke" in result.stderr
    result = run_cli("raypd.tune", "--study", "layers", "--print-config", "--set", "search.num_samples=3")
    printed = json.loads(result.stdout)
    assert printed["study"] == "layers" and printed["search"]["num_samples"] == 3
    assert printed["search"]["derive"]["model.filters"] == {"repeat": [64, "conv_layers"]}


def test_trials_that_hold_every_cpu_stream_the_training_split(ray_local, tmp_path):
    """Two trials at a time on this module's 2-CPU Ray, each holding 1 CPU, stream the
    training split through Ray Data (train.streaming): the stream's tasks take no CPU, so
    they run beside the trials instead of waiting for ever; every epoch sees every sample."""
    from raypd.train import read_state

    config = load_config(SMOKE, ["train.streaming=true", "search.num_samples=2", "train.epochs=2",
                                 "search.scheduler=fifo"])
    summary = run_study(config, "stream", tmp_path)
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED"] * 2
    for trial in summary["trials"]:
        history = read_state(Path(trial["path"]) / "checkpoints" / "last")["history"]
        assert [h["samples"] for h in history] == [420, 420]  # 70% of 600
    assert summary["best_test_metrics"]["n_test"] == 90
    assert (tmp_path / "tune" / "stream" / "test_split.parquet").exists()


def test_a_diverging_trial_is_an_error_and_the_study_goes_on(ray_local, tmp_path):
    """lr 1e30 drives the weights to inf: the loop stops with FloatingPointError; Tune and
    MLflow record that trial as failed, the other trials finish."""
    config = load_config(SMOKE, ["search.num_samples=4", "train.epochs=2", "search.scheduler=fifo",
                                 "search.max_failures=0",  # the failure is deterministic: no retries
                                 "search.space={train.lr: {choice: [1.0e+30, 0.001]}}", "search.seed=0"])
    summary = run_study(config, "nan", tmp_path)
    errored = [t for t in summary["trials"] if t["status"] == "ERROR"]
    fine = [t for t in summary["trials"] if t["status"] == "TERMINATED"]
    assert errored and fine and len(errored) + len(fine) == 4  # Optuna, seed 0: one of four
    assert all(t["config"]["train.lr"] == 1e30 for t in errored)
    assert all(t["error"].startswith("FloatingPointError: validation loss became") for t in errored)
    assert summary["best_config"]["train.lr"] == 0.001
    client, runs = runs_of(tmp_path, "nan")
    status = {r.data.tags["trial_id"]: r.info.status for r in runs}
    assert {status[t["trial_id"]] for t in errored} == {"FAILED"}
    assert {status[t["trial_id"]] for t in fine} == {"FINISHED"}


def test_two_studies_of_one_name_under_two_roots_keep_each_others_runs(ray_local, tmp_path):
    """A tracking server shared by two ROOTs (a cluster head's; here one sqlite store): the
    second study's end removes only its own leftovers, never the first study's runs."""
    small = ["search.num_samples=2", "train.epochs=1", "search.scheduler=fifo"]
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    first = run_study(load_config(SMOKE, small), "smoke", tmp_path / "a", tracking_uri=uri)
    second = run_study(load_config(SMOKE, small), "smoke", tmp_path / "b", tracking_uri=uri)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("raypd-smoke").experiment_id])
    trial_ids = sorted(t["trial_id"] for s in (first, second) for t in s["trials"])
    assert sorted(r.data.tags["trial_id"] for r in runs) == trial_ids  # all four, none deleted
    instances = {json.loads((tmp_path / r / "tune" / "smoke" / "instance.json").read_text())["study_instance"]
                 for r in ("a", "b")}
    assert {r.data.tags["study_instance"] for r in runs} == instances and len(instances) == 2


FAMILIES = [
    "search.scheduler=fifo", "search.num_samples=6", "train.epochs=1", "search.seed=3",
    "search.space={model.family: {choice: [cnn, resnet]}, "
    "width: {int: [4, 8, 4], when: {model.family: cnn}}, "
    "model.width: {int: [4, 8, 4], when: {model.family: resnet}}, "
    "model.blocks: {int: [2, 3], when: {model.family: resnet}}, "
    "train.optimizer: {choice: [adam, sgd]}, "
    "train.momentum: {uniform: [0.8, 0.95], when: {train.optimizer: sgd}}}",
    "search.derive={model.filters: {list: [width]}}"]
OWN = {"cnn": {"width"}, "resnet": {"model.width", "model.blocks"}}


@pytest.mark.parametrize("searcher", ["optuna", "hyperopt"])
def test_a_family_parameter_is_sampled_only_with_its_family(ray_local, tmp_path, searcher):
    """A mixed-family study (conditions with `when`): each trial's config, its Optuna trial
    and its MLflow run hold a family's (an optimiser's) parameters only where it was chosen,
    and each trial trained the family it names (its checkpoint's model)."""
    import optuna

    from raypd.serve import SavedModel

    config = load_config(SMOKE, [f"search.searcher={searcher}", *FAMILIES])
    summary = run_study(config, "families", tmp_path)
    families = set()
    for trial in summary["trials"]:
        params = trial["config"]
        family = params["model.family"]
        families.add(family)
        assert set(params) == ({"model.family", "train.optimizer"} | OWN[family]
                               | ({"train.momentum"} if params["train.optimizer"] == "sgd" else set()))
        model = SavedModel.load(Path(trial["path"]) / "checkpoints" / "last").config
        resolved = resolve(config, params).model
        assert model.family == family and model == resolved
        if family == "cnn":
            assert model.filters == [params["width"]]
        else:
            assert (model.width, model.blocks) == (params["model.width"], params["model.blocks"])
    assert families == {"cnn", "resnet"}  # search.seed 3 draws both: the check above saw each
    _, runs = runs_of(tmp_path, "families")
    by_trial = {r.data.tags["trial_id"]: r.data.params for r in runs}
    for trial in summary["trials"]:
        assert set(by_trial[trial["trial_id"]]) == set(trial["config"])
    if searcher == "optuna":
        study = optuna.load_study(study_name="raypd-families",
                                  storage=f"sqlite:///{tmp_path / 'tune' / 'families' / 'optuna.db'}")
        assert sorted(sorted(t.params.items()) for t in study.trials) == sorted(
            sorted(t["config"].items()) for t in summary["trials"])
        import optuna.visualization.matplotlib as plots

        assert plots.plot_parallel_coordinate(study) is not None
