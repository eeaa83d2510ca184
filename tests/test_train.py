"""raypd.train: config checks, the model, training on Ray Train (0, 1, 2 workers), resume,
metrics.json and predictions.parquet."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raypd.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from raypd.dataset import load_dataset, prepare
from raypd.generate import generate
from raypd.model import CNN1D
from raypd.train import make_train_step, read_state, state_kept, train_and_evaluate
from tests.conftest import run_cli

DATA = DataConfig(samples=120, seed=8, mu_range=(0.0, 0.0), time_points=64, time_span=(0.0, 63.0))


def tiny(**train):
    return Config(data=DATA, model=ModelConfig(filters=[8, 8], kernel_sizes=[3, 3], hidden=[16]),
                  train=TrainConfig(**{"epochs": 2, "batch_size": 16, "num_workers": 0, **train})).validate()


@pytest.fixture(scope="module")
def data_dir(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    generate(DATA, out, progress=False)
    return out


def test_model_shapes_and_a_linear_output():
    model = CNN1D(ModelConfig(filters=[4, 6], kernel_sizes=[3, 5], hidden=[7, 5]), 2, 3)
    assert model(torch.zeros(9, 2, 50)).shape == (9, 3)
    with torch.no_grad():
        model.head[-1].bias.fill_(-4.0)
        model.head[-1].weight.zero_()
    # the notebook's output ReLU could never predict v(0) < 0 or m(0) < 0
    assert (model(torch.randn(3, 2, 50)) == -4.0).all()


def test_train_local_mode_writes_metrics_and_predictions(data_dir, tmp_path):
    out = train_and_evaluate(tiny(), tmp_path / "run", data_dir)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["mse"] == pytest.approx(out["mse"])
    for key in ("mse", "rmse", "mae", "r2", "per_target", "target_names", "epochs", "history"):
        assert key in written
    assert written["target_names"] == ["g_1", "mu_1", "Pi_11", "Gamma_11", "v0_1", "m0_1"]
    assert written["epochs"] == 2 and [h["epoch"] for h in written["history"]] == [1, 2]
    table = pq.read_table(tmp_path / "run" / "predictions.parquet").to_pydict()
    y_true, y_pred = np.array(table["y_true"]), np.array(table["y_pred"])
    assert len(table["sample_id"]) == 18 and y_true.shape == (18, 6)  # 15% of 120
    assert np.mean((y_true - y_pred) ** 2) == pytest.approx(written["mse"])
    assert (y_pred[:, 1] == 0).all()  # mu is constant in this data: predicted as such
    assert (tmp_path / "run" / "checkpoints" / "best" / "state.pt").exists()
    # the intervals are calibrated on the calibration split (9 of the 18 validation samples),
    # not on the 9 that chose the best epoch
    from raypd.serve import SavedModel

    assert SavedModel.load(tmp_path / "run" / "checkpoints" / "best").calibration["n_calibration"] == 9
    assert [h["samples"] for h in written["history"]] == [84, 84]  # 70% of 120 trained on


def test_an_interrupted_run_continues_from_its_last_epoch(data_dir, tmp_path):
    first = train_and_evaluate(tiny(epochs=2, patience=50), tmp_path / "run", data_dir)
    second = train_and_evaluate(tiny(epochs=4, patience=50), tmp_path / "run", data_dir)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    assert second["history"][:2] == first["history"]  # the first two epochs were not re-run
    assert read_state(tmp_path / "run" / "checkpoints" / "last")["epoch"] == 4


def test_a_continued_run_takes_up_its_schedule_where_it_stands(data_dir, tmp_path):
    """A schedule is made again from the config at the run's epoch (the continued run may
    have more epochs): each epoch's rate is in the history, and MLflow's."""
    first = train_and_evaluate(tiny(epochs=2, patience=50, schedule="cosine", lr=0.01, optimizer="adamw"),
                               tmp_path / "run", data_dir)
    assert [h["lr"] for h in first["history"]] == pytest.approx([0.01, 0.005])
    # another optimiser's state cannot be taken up: refused before anything runs
    with pytest.raises(ValueError, match="trained with train.optimizer adamw; it cannot continue with sgd"):
        train_and_evaluate(tiny(epochs=4, optimizer="sgd"), tmp_path / "run", data_dir)
    second = train_and_evaluate(tiny(epochs=4, patience=50, schedule="cosine", lr=0.01, optimizer="adamw"),
                                tmp_path / "run", data_dir)
    assert second["history"][:2] == first["history"]
    assert [h["lr"] for h in second["history"][2:]] == pytest.approx([0.005, 0.005 * (1 + math.cos(0.75 * math.pi))])


def test_a_run_killed_between_the_two_renames_of_a_checkpoint_continues_from_it(data_dir, tmp_path):
    """save_checkpoint moves the old `last` away, then the new one into place: killed between
    the two, the new one is complete in `.last.tmp` and `last` is missing. The run continues
    from it; it does not start again from epoch 0."""
    first = train_and_evaluate(tiny(epochs=2, patience=50), tmp_path / "run", data_dir)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "last").rename(checkpoints / ".last.tmp")
    second = train_and_evaluate(tiny(epochs=3, patience=50), tmp_path / "run", data_dir)
    assert second["history"][:2] == first["history"]  # not re-run (their epoch_seconds would differ)
    assert read_state(checkpoints / "last")["epoch"] == 3 and not (checkpoints / ".last.tmp").exists()


def test_a_run_of_another_model_is_not_continued(data_dir, tmp_path):
    train_and_evaluate(tiny(epochs=1), tmp_path / "run", data_dir)
    other = tiny(epochs=2)
    other = Config(data=other.data, model=ModelConfig(filters=[8], kernel_sizes=[3], hidden=[16]), train=other.train)
    with pytest.raises(ValueError, match="holds a run of another model or dataset .differs in: model_config"):
        train_and_evaluate(other, tmp_path / "run", data_dir)
    assert read_state(tmp_path / "run" / "checkpoints" / "last")["epoch"] == 1


def test_a_checkpoint_of_a_cuda_graph_run_continues_on_a_cpu(data_dir, tmp_path):
    # A train.cuda_graph run saves Adam(capturable=True); a capturable Adam refuses CPU tensors.
    first = train_and_evaluate(tiny(epochs=2, patience=50), tmp_path / "run", data_dir)
    last = tmp_path / "run" / "checkpoints" / "last" / "state.pt"
    saved = torch.load(last, weights_only=True)
    for group in saved["optimizer"]["param_groups"]:
        group["capturable"] = True
    torch.save(saved, last)
    second = train_and_evaluate(tiny(epochs=3, patience=50), tmp_path / "run", data_dir)
    assert second["history"][:2] == first["history"] and second["epochs"] == 3


def test_early_stopping_and_seeded_reproducibility(data_dir, tmp_path):
    a = train_and_evaluate(tiny(epochs=30, patience=1, lr=0.05), tmp_path / "a", data_dir)
    b = train_and_evaluate(tiny(epochs=30, patience=1, lr=0.05), tmp_path / "b", data_dir)
    assert a["epochs"] < 30  # stopped by patience
    def losses(run):
        return [(h["epoch"], h["train_loss"], h["val_loss"]) for h in run["history"]]

    assert losses(a) == losses(b) and a["mse"] == b["mse"]


def plain_pytorch_losses(config: Config, data_dir) -> list[tuple[float, float]]:
    """(train_loss, val_loss) per epoch of a plain PyTorch loop written from the contract:
    model seeded by train.seed, epoch e's order randperm(seed * 100003 + e), batches of
    batch_size in that order, MSE, Adam, gradient-norm clipping; val MSE over all entries."""
    train = config.train
    data = prepare(load_dataset(data_dir), train)
    torch.manual_seed(train.seed)
    model = CNN1D(config.model, data.inputs("train").shape[1], data.n_outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    x, y = torch.tensor(data.inputs("train")), torch.tensor(data.targets["train"])
    x_val, y_val = torch.tensor(data.inputs("val")), torch.tensor(data.targets["val"])
    out = []
    for epoch in range(train.epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(train.seed * 100_003 + epoch))
        total = 0.0
        for start in range(0, len(x), train.batch_size):
            rows = order[start : start + train.batch_size]
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            total += loss.item() * len(rows)
        model.eval()
        with torch.no_grad():
            chunk = train.batch_size * 8
            val = sum(torch.nn.functional.mse_loss(model(x_val[i : i + chunk]), y_val[i : i + chunk],
                                                   reduction="sum").item() for i in range(0, len(x_val), chunk))
        out.append((total / len(x), val / y_val.numel()))
    return out


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_loop_trains_as_a_plain_pytorch_loop(data_dir, tmp_path, cuda_graph):
    # 84 training rows in batches of 16: five full batches and a partial one per epoch.
    # train.cuda_graph is a GPU setting: on a CPU it must change nothing.
    config = tiny(epochs=3, patience=50, cuda_graph=cuda_graph)
    run = train_and_evaluate(config, tmp_path / "run", data_dir)
    expected = plain_pytorch_losses(config, data_dir)
    got = [(h["train_loss"], h["val_loss"]) for h in run["history"]]
    assert np.allclose(got, expected, rtol=1e-12, atol=0), (got, expected)


def test_steps_taken_under_state_kept_leave_no_trace(data_dir):
    # What a CUDA graph's warm-up relies on, checked on the CPU: weights, Adam's state (a
    # resumed one, and the state a fresh Adam creates) and the random state come back.
    data = prepare(load_dataset(data_dir), TrainConfig())
    x, y = torch.tensor(data.inputs("train")), torch.tensor(data.targets["train"])
    config = ModelConfig(filters=[8], kernel_sizes=[3], hidden=[16], dropout=0.3)

    def losses(warm_up: bool, resumed: bool) -> list[float]:
        torch.manual_seed(0)
        model = CNN1D(config, x.shape[1], y.shape[1])
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        step = make_train_step(model, optimizer, 16, 1.0, cuda_graph=False)
        rows = [torch.arange(i, i + 16) for i in range(0, 64, 16)]
        if resumed:
            step(x[rows[0]], y[rows[0]])
        if warm_up:
            with state_kept(model, optimizer):
                for r in rows[::-1]:
                    step(x[r], y[r])
        return [step(x[r], y[r]).item() for r in rows for _ in range(2)]

    for resumed in (False, True):
        assert losses(True, resumed) == losses(False, resumed)
    assert losses(False, True) != losses(False, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_steps_train_as_eager_steps_on_a_gpu(data_dir):
    # 84 rows in batches of 16: five replays and one eager partial batch per epoch. Dropout 0:
    # in a graph the dropout masks come from the same generator, but not in eager order.
    data = prepare(load_dataset(data_dir), TrainConfig())
    x, y = (torch.tensor(a, device="cuda") for a in (data.inputs("train"), data.targets["train"]))
    config = ModelConfig(filters=[8, 8], kernel_sizes=[3, 3], hidden=[16], dropout=0.0)

    def losses(graph: bool) -> list[float]:
        torch.manual_seed(0)
        model = CNN1D(config, x.shape[1], y.shape[1]).cuda()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, capturable=graph)
        step = make_train_step(model, optimizer, 16, 1.0, graph, x.shape[1:], y.shape[1])
        out = []
        for epoch in range(3):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).cuda()
            out += [step(x[order[i : i + 16]], y[order[i : i + 16]]).item() for i in range(0, len(x), 16)]
        return out

    graphed, eager = losses(True), losses(False)
    assert len(graphed) == 18 and np.allclose(graphed, eager, rtol=1e-4), (graphed, eager)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_train_worker_groups(data_dir, tmp_path, workers):
    out = train_and_evaluate(tiny(num_workers=workers, epochs=2), tmp_path / "run", data_dir)
    assert out["epochs"] == 2 and np.isfinite(out["mse"])
    # Ray Train kept its own copy of the last checkpoint in the run's storage
    assert list((tmp_path / "run" / "ray" / "train").glob("checkpoint_*/state.pt"))


def test_a_test_split_of_one_sample_has_no_r2_and_the_command_says_so(data_dir, tmp_path):
    # 120 samples split 117/2/1 (the 2 validation samples: 1 for selection, 1 to calibrate):
    # no target varies over one test sample
    result = run_cli("raypd.train", "--config", "tune_configs/smoke.yaml", "--data", str(data_dir),
                     "--out", str(tmp_path / "run"), "--set", "train.split=[0.975,0.0167,0.0083]",
                     "--set", "train.epochs=1", "--set", "model.filters=[4]", "--set", "model.kernel_sizes=[3]",
                     timeout=300)
    assert result.returncode == 0, result.stderr
    assert "r2 n/a" in result.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["r2"] is None


def test_missing_config_file_and_set_values_parse_as_yaml(tmp_path):
    result = run_cli("raypd.train", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file" in result.stderr and "does not exist" in result.stderr
    config = load_config("tune_configs/base.yaml", ["model.filters=[64,128]", "model.kernel_sizes=[3,3]",
                                                      "train.lr=1e-3", "train.use_gpu=false"])
    assert config.model.filters == [64, 128] and config.train.lr == 1e-3 and config.train.use_gpu is False
    assert config.data.mu_range == (0.0, 0.0) and config.data.samples == 10_000


@pytest.mark.slow
def test_training_killed_after_a_checkpoint_continues_from_it(data_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    args = ["raypd.train", "--config", str(REPO / "tune_configs" / "base.yaml"), "--data", str(data_dir),
            "--out", str(tmp_path / "run"), "--set", "train.epochs=400", "--set", "train.patience=400",
            "--set", "train.num_workers=0", "--set", "model.filters=[8]", "--set", "model.hidden=[8]"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if read_state(last)["epoch"] >= 3:
                break
        except ValueError:  # not written yet, or caught mid-write
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_state(last)
    assert 3 <= killed_at["epoch"] < 400 and not (tmp_path / "run" / "metrics.json").exists()

    result = run_cli(*args, timeout=300)  # the same command again
    assert result.returncode == 0, result.stderr[-2000:]
    done = read_state(last)
    assert done["epoch"] == 400 and json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 400
    assert done["history"][: killed_at["epoch"]] == killed_at["history"]  # continued, not restarted
