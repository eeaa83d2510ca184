"""Stage 2: train the CNN data-parallel on Ray Train; evaluate the best checkpoint.

    python -m raypd.train --config tune_configs/base.yaml [--data DIR] [--out DIR] [--set k=v ...]

The driver reads the dataset's files once, a file at a time (raypd.dataset.prepare): the split,
the target and input statistics, and the raw float32 series of what training holds in memory.
That goes to the workers through Ray's object store, one copy per node whatever the number of
trials. A dataset too big to hold (raypd.train.held_splits) streams its training split from
its Parquet files through Ray Data every epoch instead (get_dataset_shard on a worker group;
the stream itself in a single-process Tune trial), files in a new order each epoch and rows
drawn from a local shuffle buffer. Inputs are made a batch at a time. In memory, each worker
trains on its own slice of every epoch's permutation; DDP averages gradients.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from raypd.cli import ArgumentParser, absolute_path, check_shared, check_writable, init_ray, run_main
from raypd.cluster import use_gpu
from raypd.config import Config, ModelConfig, TrainConfig, dataset_dir, from_dict, load_config, to_dict, with_defaults
from raypd.dataio import naming, write_json
from raypd.dataset import (TRAINING_SPLITS, DatasetFiles, Prepared, Relabel, apply_input_norm, open_dataset,
                           prepare, series_bytes, split_series, stream_options, stream_split)
from raypd.intervals import metrics
from raypd.model import check_fits
from raypd.serve import CHECKPOINT_FILE, model_meta


# --------------------------------------------------------------------------- the loop


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker's training loop (Ray Train calls it on every worker, or in this process in
    local mode). Resumes from checkpoint_dir/last when it exists."""
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    import ray.tune
    import torch

    from raypd.model import build_model

    config = from_dict(Config, loop_config["config"])
    train = config.train
    quiet_worker_logs()
    # from the object store, once per node: the split and statistics, and the series when
    # training holds them (read-only views of the node's one copy)
    data: Prepared = ray.get(loop_config["data"])
    checkpoint_dir = Path(loop_config["checkpoint_dir"])
    in_tune = loop_config.get("report_to") == "tune"

    if loop_config["use_gpu"] and not torch.cuda.is_available():
        context = ray.get_runtime_context()
        raise RuntimeError(f"training asks for GPUs (train.use_gpu) but node {context.get_node_id()} has no "
                           f"CUDA device (this process holds {context.get_assigned_resources()})")
    torch.manual_seed(train.seed)
    model = build_model(config.model, data.input_channels, data.n_outputs)
    if in_tune:  # a single-process trial inside Tune: no Train session here, no DDP needed
        rank, world = 0, 1
        device = torch.device("cuda" if loop_config["use_gpu"] else "cpu")
        model = model.to(device)
    else:
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        model = ray.train.torch.prepare_model(model)  # moves it to this worker's device; DDP if world > 1
        device = ray.train.torch.get_device()
    # see make_train_step; a graph bakes in the learning rate: not with a schedule
    graphed = train.cuda_graph and device.type == "cuda" and world == 1 and train.schedule == "none"
    optimizer = make_optimizer(model, train, graphed)
    unwrapped = model.module if hasattr(model, "module") else model
    meta = model_meta(config, data)  # saved with every checkpoint: the model carries its normalisation

    def stream(split: str):
        """A split streamed from the dataset's files: this worker's shard of it (Ray Train's
        get_dataset_shard), or the whole stream (a single-process Tune trial, Train's local
        mode). A whole Dataset would run Ray Data's executor in this process, its thread
        taking the GIL from the loop (epochs 1.3x-2x slower here): a split of one runs it in
        a coordinator actor, as a worker group's shards do."""
        shard = loop_config["streams"][split] if in_tune else ray.train.get_dataset_shard(split)
        return shard.streaming_split(1)[0] if isinstance(shard, ray.data.Dataset) else shard

    streams = {split: stream(split) for split in TRAINING_SPLITS if not data.held(split)}

    state = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "history": []}
    if rank == 0:
        recover_checkpoints(checkpoint_dir)  # a run killed while it replaced a checkpoint
    if (checkpoint_dir / "last" / CHECKPOINT_FILE).exists():  # continue an interrupted run
        saved = torch.load(checkpoint_dir / "last" / CHECKPOINT_FILE, map_location=device, weights_only=True)
        unwrapped.load_state_dict(saved["model"])
        # Adam's groups carry the saving run's `capturable` flag, and loading would restore it:
        # a graph run's state would then fail on a CPU, and an eager run's could not be captured.
        for group in saved["optimizer"]["param_groups"]:
            if "capturable" in group:
                group["capturable"] = graphed
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # the rate comes from the config (and its schedule)
            group["lr"] = train.lr
            for key in ("initial_lr", "max_lr", "min_lr"):
                group.pop(key, None)
        state = saved["state"]
    schedule = make_schedule(optimizer, train, state["epoch"])  # at the run's epoch

    step = make_train_step(model, optimizer, train.batch_size, train.grad_clip, graphed,
                           (data.input_channels, data.series_shape[1]), data.n_outputs)
    # what raypd.train shows while it trains (a study shows Tune's table instead)
    progress = EpochProgress(train.epochs, state["epoch"], enabled=rank == 0 and not in_tune)
    for epoch in range(state["epoch"], train.epochs):
        started = time.perf_counter()
        model.train()
        seed = train.seed * 100_003 + epoch
        # train.relabel: each sample under a random relabelling of its actions
        relabel = Relabel(data, seed * 1_009 + rank) if train.relabel else None
        if data.held("train"):  # each worker its slice of one permutation of the training split
            batches = memory_batches(data, "train", epoch_shard(len(data.targets["train"]), seed, rank, world),
                                     train.batch_size, relabel)
        else:  # file order shuffled each epoch by Ray Data, rows by a local shuffle buffer
            batches = stream_batches(streams["train"], train.batch_size, data.input_norm, train.shuffle_buffer,
                                     seed=seed, relabel=relabel)
        # the loss is summed on the device (float64, as Python floats were): no host sync per
        # step, so a GPU is fed kernels without waiting for each step's result
        lr = optimizer.param_groups[0]["lr"]  # this epoch's (train.schedule)
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for x, y in batches:
            total += step(x.to(device), y.to(device))
            count += len(y)
        val_batches = (memory_batches(data, "val", np.arange(len(data.targets["val"])), train.batch_size * 8)
                       if data.held("val") else stream_batches(streams["val"], train.batch_size * 8, data.input_norm))
        val_loss = evaluate_loss(model, val_batches, device)
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss became {val_loss} at epoch {epoch}: lower train.lr")
        improved = val_loss < state["best_val"]
        metrics_ = {"epoch": epoch + 1, "train_loss": total.item() / count, "val_loss": val_loss,
                    "best_val_loss": min(val_loss, state["best_val"]),
                    "epoch_seconds": time.perf_counter() - started, "samples": count, "lr": lr}
        state = {"epoch": epoch + 1, "best_val": metrics_["best_val_loss"],
                 "bad_epochs": 0 if improved else state["bad_epochs"] + 1,
                 "history": state["history"] + [metrics_], "optimizer": train.optimizer}
        progress.show(metrics_)
        if schedule is not None and epoch + 1 < train.epochs:
            schedule.step()  # the next epoch's learning rate
        if rank == 0:
            save_checkpoint(checkpoint_dir, unwrapped, optimizer, state, best=improved, meta=meta)
        if in_tune:  # the trial's folder holds the checkpoints; Tune takes the metrics
            ray.tune.report({**metrics_, "node_id": ray.get_runtime_context().get_node_id()})
        elif rank == 0:
            # Ray records the metrics and copies the checkpoint into the run's storage.
            ray.train.report(metrics_, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir / "last"),
                             delete_local_checkpoint_after_upload=False)
        else:
            ray.train.report(metrics_)
        if state["bad_epochs"] >= train.patience:
            break
    progress.close()


def make_optimizer(model, train: TrainConfig, graphed: bool = False):
    """train.optimizer over the model's parameters: Adam, AdamW (decoupled weight decay), or
    SGD with train.momentum (Nesterov). graphed: Adam's state on the device, for capture."""
    import torch

    params = model.parameters()
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.momentum > 0,
                               weight_decay=train.weight_decay)
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=train.lr, weight_decay=train.weight_decay, capturable=graphed)


def make_schedule(optimizer, train: TrainConfig, epoch: int = 0):
    """train.schedule over train.epochs, stepped once an epoch, at `epoch` (a resumed run's:
    the schedule is made again from the config, not saved; None: a constant rate)."""
    import warnings

    import torch

    if train.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs)
    elif train.schedule == "onecycle":  # also cycles Adam's beta1 / SGD's momentum, as torch does
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=train.epochs,
                                                       pct_start=train.warmup)
    else:
        return None
    with warnings.catch_warnings():  # "step() before optimizer.step()": on purpose, to reach `epoch`
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(min(epoch, train.epochs - 1)):
            schedule.step()
    return schedule


def quiet_worker_logs() -> None:
    """Ray Train logs each report ("Reporting training result 3: TrainingReport(...)") at INFO
    under a logger named by its file's path, which RunConfig's LoggingConfig does not reach:
    raypd's own epoch lines say what a user needs."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_shard(rows: int, seed: int, rank: int, world: int) -> np.ndarray:
    """Worker `rank`'s rows of one epoch: its slice of randperm(rows, seed), padded by wrapping
    to the same size on every worker (DDP needs the same number of steps)."""
    import torch

    per_worker = math.ceil(rows / world)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return order.repeat(2)[: per_worker * world][rank::world].numpy()


def memory_batches(data: Prepared, split: str, rows: np.ndarray, batch_size: int, relabel=None):
    """(inputs, targets) float32 tensors of a split held in memory, `rows` in that order;
    inputs are made a batch at a time (the raw series are the only copy), after `relabel`
    (a raypd.dataset.Relabel) where given."""
    import torch

    series, targets = data.series[split], data.targets[split]
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        x, y = series[batch], targets[batch]
        if relabel is not None:
            x, y = relabel(x, y)
        yield torch.from_numpy(apply_input_norm(x, data.input_norm)), torch.from_numpy(y)


STREAM_CHUNK = 1024  # rows Ray Data hands over at a time; the loop cuts them into batches


def stream_batches(stream, batch_size: int, input_norm: dict, shuffle_buffer: int = 0, seed: int | None = None,
                   relabel=None):
    """(inputs, targets) float32 tensors of a streamed split (a Ray Dataset, or Train's shard
    of one: raypd.stream), inputs made from its raw series by input_norm a chunk at a time.
    With shuffle_buffer, Ray Data draws chunks of STREAM_CHUNK rows at random from a local
    buffer of that many rows, and each chunk's rows come in a random order: per-row batches
    straight from Ray Data cost ~4 ms each on this loop's CPU."""
    import torch

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for chunk in stream.iter_batches(batch_size=STREAM_CHUNK if shuffle_buffer else batch_size, batch_format="numpy",
                                     local_shuffle_buffer_size=shuffle_buffer or None,
                                     local_shuffle_seed=seed if shuffle_buffer else None):
        # inputs made here, a chunk at a time; y copied (Ray's arrays are read-only)
        series, targets = (relabel(chunk["series"], chunk["y"]) if relabel is not None
                           else (chunk["series"], chunk["y"]))
        x, y = torch.from_numpy(apply_input_norm(series, input_norm)), torch.tensor(targets)
        order = torch.randperm(len(y), generator=generator) if shuffle_buffer else torch.arange(len(y))
        for start in range(0, len(y), batch_size):
            rows = order[start : start + batch_size]
            yield x[rows], y[rows]


class EpochProgress:
    """Epoch, train and validation loss and the time left, while raypd.train trains: a tqdm bar
    on a terminal, else (a log, a Ray worker's forwarded output) one line at the first and
    last epoch and whenever LINE_SECONDS have passed."""

    LINE_SECONDS = 10.0

    def __init__(self, epochs: int, done: int, enabled: bool, stream=None):
        self.epochs, self.done, self.enabled = epochs, done, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_line = -math.inf
        self.seconds: list[float] = []
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=done, desc="train", unit="epoch", file=self.stream)

    def show(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.seconds.append(metrics["epoch_seconds"])
        loss = f"train_loss {metrics['train_loss']:.4f}, val_loss {metrics['val_loss']:.4f} " \
               f"(best {metrics['best_val_loss']:.4f})"
        if self.bar is not None:
            self.bar.set_postfix_str(loss, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        epoch = metrics["epoch"]
        if epoch in (self.done + 1, self.epochs) or now - self.last_line >= self.LINE_SECONDS:
            self.last_line = now
            left = (self.epochs - epoch) * sum(self.seconds) / len(self.seconds)
            print(f"raypd.train: epoch {epoch}/{self.epochs}: {loss}, {self.seconds[-1]:.2f} s/epoch, at most "
                  f"{left // 60:.0f} min {left % 60:.0f} s left (early stopping may end it sooner)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_train_step(model, optimizer, batch_size: int, grad_clip: float, cuda_graph: bool, input_shape=None,
                    n_outputs: int | None = None):
    """step(x, y) -> the batch's summed loss (a float64 device tensor), after one optimiser
    step (MSE, gradient clipping, Adam) on inputs x (B, channels, T) and targets y (B, k).

    cuda_graph: full batches replay one CUDA graph of the whole step (PyTorch's whole-network
    capture; the optimizer must be Adam(capturable=True)). The studies' small models at batch
    32 are launch-bound on a GPU (issue 11: 0.49 s per epoch on an H200 whether or not each
    step syncs, for ~2 ms of arithmetic): a replay launches the step's ~100 kernels at once.
    Other batch sizes (an epoch's last, partial batch) run eagerly on the same weights and
    optimizer state. Capture needs a few warm-up steps (Adam's state, cuBLAS workspaces);
    they run on a side stream and weights, optimizer state and CUDA RNG are put back after
    them, so the run trains as if they never happened. One process only (no DDP).
    """
    import torch

    def eager(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach().double() * len(y)

    if not cuda_graph:
        return eager

    device = next(model.parameters()).device
    # the graph reads its batch from these (a replay copies each batch in)
    static_x = torch.ones((batch_size, *input_shape), device=device)
    static_y = torch.zeros((batch_size, n_outputs), device=device)
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    with state_kept(model, optimizer):  # restores on the current stream, after the side's work
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(3):
                eager(static_x, static_y)
        current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # With no gradients before capture (zero_grad sets them to None, launching nothing), the
    # graph's backward writes them rather than adding to them.
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = eager(static_x, static_y)

    def replay(x, y):
        if len(y) != batch_size:
            return eager(x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return static_loss

    return replay


@contextlib.contextmanager
def state_kept(model, optimizer):
    """Whatever runs inside leaves weights, optimizer state and the device's random state as
    they were, each tensor restored in place (a CUDA graph captured afterwards uses these
    tensors); optimizer state created inside is zeroed, as a fresh Adam's."""
    import torch

    device = next(model.parameters()).device
    params = list(model.state_dict().values())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    saved = [t.clone() for t in params + state]
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    yield
    with torch.no_grad():
        for t, before in zip(params + state, saved):
            t.copy_(before)
        known = {id(t) for t in state}
        for s in optimizer.state.values():
            for t in s.values():
                if torch.is_tensor(t) and id(t) not in known:
                    t.zero_()
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng, device)
    else:
        torch.set_rng_state(rng)


def evaluate_loss(model, batches, device) -> float:
    """Mean squared error over every entry of (inputs, targets) batches."""
    import torch

    model.eval()
    total, entries = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for x, y in batches:
            total += torch.nn.functional.mse_loss(model(x.to(device)), y.to(device), reduction="sum").double()
            entries += y.numel()
    return total.item() / entries


def recover_checkpoints(checkpoint_dir: Path) -> None:
    """A checkpoint is replaced by two renames (the old one away, the new one into place): a
    run killed between them left `last` (or `best`) missing, the new one complete in its
    temporary folder and the old one beside it. Put the new one in place (else the old)."""
    for name in ("last", "best"):
        target = checkpoint_dir / name
        if target.exists():
            continue
        for source in (checkpoint_dir / f".{name}.tmp", checkpoint_dir / f".{name}.old"):
            if (source / CHECKPOINT_FILE).exists():
                source.rename(target)
                break


def save_checkpoint(checkpoint_dir: Path, model, optimizer, state: dict, best: bool, meta: dict) -> None:
    """checkpoint_dir/last (and /best when improved), each replaced whole. meta: what turns
    raw series into raw-unit predictions (raypd.serve.model_meta), saved beside the weights."""
    import torch

    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state, "meta": meta}
    # serialised in memory, then written: on a full disk torch.save fails with "unexpected pos
    # 64 vs 0", a write with ENOSPC naming the file (raypd.cli: one line)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    for name in ("last", "best") if best else ("last",):
        tmp = checkpoint_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with naming(tmp / CHECKPOINT_FILE):
                (tmp / CHECKPOINT_FILE).write_bytes(buffer.getbuffer())
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # the last good checkpoint stays as it was
            raise
        old = checkpoint_dir / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (checkpoint_dir / name).exists():
            (checkpoint_dir / name).rename(old)
        tmp.rename(checkpoint_dir / name)
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- driver side


def ddp_backend(train: TrainConfig, gpu: bool) -> str:
    """NCCL when every worker owns whole GPUs; gloo on CPUs and when workers hold fractions of
    a GPU, since then two ranks may sit on one device and NCCL refuses that ("Duplicate GPU
    detected")."""
    return "nccl" if gpu and train.gpus_per_worker >= 1 else "gloo"


def fit(config: Config, data_ref, workdir: Path, name: str = "train", in_tune: bool = False) -> None:
    """Train with checkpoints in workdir/checkpoints; data_ref is the prepared data in the
    object store.

    On Ray Train: a TorchTrainer with train.num_workers workers (0: Train's local mode, in
    this process). Inside a Tune trial, a worker group reports to Tune through
    TuneReportCallback; a single-process trial (num_workers 0) runs the loop right here and
    reports to Tune itself, since Train's API is not available to a Tune function.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raypd.cli import quiet_libraries

    quiet_libraries()  # also in a trial's own process
    workdir.mkdir(parents=True, exist_ok=True)
    loop_config = {"config": to_dict(config), "data": data_ref, "checkpoint_dir": str(workdir / "checkpoints"),
                   "use_gpu": use_gpu(config)}
    data: Prepared = ray.get(data_ref)
    # streamed splits: the training split's files shuffled each epoch; validation in order
    streams = {split: stream_split(data, split, shuffle_seed=config.train.seed if split == "train" else None)
               for split in TRAINING_SPLITS if not data.held(split)}
    if in_tune and config.train.num_workers == 0:
        train_loop_per_worker({**loop_config, "report_to": "tune", "streams": streams})
        return
    # Ray Train V2's controller collects a worker's report every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
    # (2 s) and a worker holds one uncollected report: with sub-second epochs every report
    # waited for the next poll (1.8 s wall per 0.6 s epoch). The driver's value is passed on
    # to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # each worker its share of the training stream, and the whole validation split
        datasets=streams, dataset_config=DataConfig(datasets_to_split=["train"] if "train" in streams else [],
                                                    execution_options=stream_options()),
        torch_config=TorchConfig(backend=ddp_backend(config.train, loop_config["use_gpu"])),
        scaling_config=ScalingConfig(
            num_workers=config.train.num_workers, use_gpu=loop_config["use_gpu"],
            resources_per_worker={"CPU": 1, "GPU": config.train.gpus_per_worker} if loop_config["use_gpu"] else None),
        run_config=RunConfig(name=name, storage_path=str(workdir / "ray"), callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             # not every report, checkpoint and worker start at INFO: raypd shows epochs
                             logging_config=LoggingConfig(log_level="WARNING")),
    ).fit()


def check_resumable(workdir: Path, meta: dict, optimizer: str = "adam") -> None:
    """A run continues from workdir's last checkpoint only if that checkpoint is of the same
    model on the same prepared data (its saved meta) and its optimiser state is of
    train.optimizer; other settings (epochs, patience, the rate and its schedule) may differ."""
    from raypd.serve import read_checkpoint

    last = workdir / "checkpoints" / "last" / CHECKPOINT_FILE
    if not last.exists():
        return
    payload = read_checkpoint(last)
    kind = (payload.get("state") or {}).get("optimizer", "adam")  # an older raypd's runs: Adam
    if kind != optimizer:
        raise ValueError(f"--out {workdir} holds a run trained with train.optimizer {kind}; it cannot continue "
                         f"with {optimizer}: choose another --out, or set train.optimizer={kind}")
    saved = payload.get("meta") or {}
    if isinstance(saved.get("model_config"), dict):  # the keys a newer raypd added, at their defaults
        saved = {**saved, "model_config": with_defaults(ModelConfig, saved["model_config"]) or saved["model_config"]}
    differs = [key for key in meta if saved.get(key) != meta[key]]
    if differs:
        raise ValueError(f"--out {workdir} holds a run of another model or dataset (differs in: "
                         f"{', '.join(differs)}); choose another --out, or remove it to start afresh")


def read_state(checkpoint: Path) -> dict:
    """The training state saved with a checkpoint: epoch, best_val, bad_epochs, history."""
    from raypd.serve import read_checkpoint

    file = checkpoint / CHECKPOINT_FILE
    state = read_checkpoint(file).get("state")
    if not isinstance(state, dict):
        raise ValueError(f"{file}: a checkpoint without its training state")
    return state


def train_and_evaluate(config: Config, workdir: str | Path, data_dir: str | Path | None = None,
                       root: str | Path = "runs", address: str | None = None) -> dict:
    """Train, evaluate the best checkpoint on the test split, write metrics.json and
    predictions.parquet into workdir; return the metrics. Without data_dir, the dataset that
    config.data names (under root/data) is used, and generated when missing."""
    from raypd.generate import generate

    # absolute: Ray Train's storage takes no relative path, and Ray's workers do not share
    # this process's current folder
    workdir, root = Path(workdir).absolute(), Path(root).absolute()
    data_dir = None if data_dir is None else Path(data_dir).absolute()
    if data_dir is None:
        check_fits(config, config.data.time_points)  # before any Ray work
        data_dir = dataset_dir(config, Path(root))
        generate(config.data, data_dir, address=address)
    files = open_dataset(data_dir)
    check_fits(config, files.series_shape[1])
    # the one pass over the files, before Ray starts (a damaged file stops here): what this
    # machine's object store could hold is held, then dropped if a smaller node could not
    data = prepare(data_dir, config.train, held=held_splits(config.train, files, local_store_bytes()))
    init_ray(address)
    import ray

    for split in set(data.series) - set(held_splits(config.train, files)):
        del data.series[split]
    # the one copy of what training holds: in the object store (the driver's is dropped)
    data_ref = ray.put(data)
    data = ray.get(data_ref)
    check_shared(workdir.parent)
    from raypd.lock import hold

    workdir.mkdir(parents=True, exist_ok=True)
    # one writer, also across nodes: training and what evaluation writes (the calibration in
    # checkpoints/best, metrics.json, predictions.parquet)
    with hold(workdir / ".raypd.lock", f"training folder {workdir}"):
        if (workdir / "checkpoints").is_dir():
            recover_checkpoints(workdir / "checkpoints")
        check_resumable(workdir, model_meta(config, data), config.train.optimizer)
        fit(config, data_ref, workdir)
        best = workdir / "checkpoints" / "best"
        out, y_true, y_pred = evaluate_best(best, data)
        history = read_state(workdir / "checkpoints" / "last")["history"]
        out.update(epochs=history[-1]["epoch"], best_val_loss=min(h["val_loss"] for h in history),
                   history=history, dataset=str(data_dir), content_hash=files.manifest["content_hash"],
                   checkpoint=str(best), streamed=[split for split in TRAINING_SPLITS if not data.held(split)])
        write_predictions(workdir / "predictions.parquet", data.sample_ids["test"], y_true, y_pred)
        write_json(workdir / "metrics.json", out)
    return out


# Training holds a split's series in memory (one float32 copy per node, in Ray's object
# store, read by every trial on the node) while what it holds takes at most this share of the
# smallest node's object store; it streams the rest from the dataset's files.
IN_MEMORY_SHARE = 1 / 8


def local_store_bytes() -> float:
    """The object store Ray gives this machine when it starts here: 30% of its memory
    (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)."""
    return 0.3 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def held_splits(train: TrainConfig, files: DatasetFiles, store_bytes: float | None = None) -> tuple[str, ...]:
    """The splits training holds in memory: train and val when they fit in IN_MEMORY_SHARE of
    the smallest node's object store (store_bytes; default: the connected cluster's), else
    val alone when it fits (a streamed val split would be read whole, with every file, every
    epoch), else none. train.streaming true streams the training split whatever its size;
    false holds both. The object store holds the one copy whatever the number of trials, and
    no device holds it (batches are made on the host), so the count of concurrent trials
    does not enter."""
    import ray

    if train.streaming is False:
        return TRAINING_SPLITS
    if store_bytes is None:
        store_bytes = min((n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]),
                          default=0)
    budget = IN_MEMORY_SHARE * store_bytes
    size = {split: series_bytes(files.samples, files.series_shape, train, split) for split in TRAINING_SPLITS}
    if train.streaming is None and size["train"] + size["val"] <= budget:
        return TRAINING_SPLITS
    return ("val",) if size["val"] <= budget else ()


CALIBRATION_ROWS = 20_000  # calibration-split series the model-only intervals are calibrated on


def evaluate_best(best: Path, data: Prepared, split_files: dict | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """The model in checkpoint folder `best` evaluated: its model-only intervals calibrated on
    (at most CALIBRATION_ROWS of) the validation split, clean and noisy (raypd.intervals), and
    saved in its meta; then its test metrics in raw units, with the coverage of its 90%
    intervals clean and with 2% observation noise (not the validation split's noise draws).
    Returns (metrics with "intervals", raw test targets, raw test predictions).

    One read of each split's files, a file at a time: split_files {split: path} are written
    from the same reads (raypd.tune's split files, write_test_split)."""
    from raypd.intervals import DEFAULT_LEVEL, add_noise, coverage
    from raypd.serve import SavedModel, add_calibration, write_test_split

    split_files = split_files or {}

    def read(split, use, limit=None):  # each chunk to `use`, and to the split's file if it has one
        chunks = split_series(data, split, limit=None if split in split_files else limit)
        used = (use(*chunk) or chunk for chunk in chunks)
        if split in split_files:
            write_test_split(split_files[split], used)
        else:
            for _ in used:
                pass

    calibration, calibration_rows = [], 0

    def calibrate(_, raw, series):  # the first CALIBRATION_ROWS (a split file wants them all read)
        nonlocal calibration_rows
        if calibration_rows < CALIBRATION_ROWS:
            calibration.append((raw, series))
            calibration_rows += len(raw)

    # the calibration split: no choice was made on it (the best epoch, ASHA and the best trial
    # used the validation split), so the intervals' coverage holds on new series
    read("calib", calibrate, limit=CALIBRATION_ROWS)
    targets, series = (np.concatenate(parts)[:CALIBRATION_ROWS] for parts in zip(*calibration))
    add_calibration(best, series, targets, seed=int(data.sample_ids["calib"][0]))

    model = SavedModel.load(best)
    rng = np.random.default_rng(12345)
    kinds = (("clean", 0.0), ("noise_2pct", 0.02))
    raw_targets, estimates, bounds = [], [], {name: [] for name, _ in kinds}

    def test(_, raw, series):
        raw_targets.append(raw)
        for name, noise in kinds:  # (clean draws no noise: the noisy draws come as before)
            observed = add_noise(series, noise, rng).astype(np.float32) if noise else series
            estimate, lower, upper = model.predict_with_intervals(observed, DEFAULT_LEVEL)
            bounds[name].append((lower, upper))
            if not noise:
                estimates.append(estimate)

    read("test", test)
    y_true, y_pred = np.concatenate(raw_targets), np.concatenate(estimates)
    out = metrics(y_true, y_pred, data.target_names)
    out["intervals"] = {"level": DEFAULT_LEVEL}
    for name, _ in kinds:
        out["intervals"][name] = coverage(np.concatenate([b[0] for b in bounds[name]]),
                                          np.concatenate([b[1] for b in bounds[name]]), y_true, data.target_names)
    return out, y_true, y_pred


def write_predictions(path: Path, sample_ids: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> None:
    import pyarrow as pa

    from raypd.dataio import list_column, write_table_atomic

    write_table_atomic(pa.table({"sample_id": pa.array(sample_ids, type=pa.int64()),
                                 "y_true": list_column(y_true, pa.float64()),
                                 "y_pred": list_column(y_pred, pa.float64())}), path)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.train", description="Train the CNN on Ray Train.")
    p.add_argument("--config", required=True, help="YAML config (e.g. tune_configs/base.yaml)")
    p.add_argument("--data", help="dataset folder (default: generated from the config's data section)")
    p.add_argument("--out", help="output folder (default runs/train/<config name>)")
    p.add_argument("--root", default="runs", help="root for datasets and outputs (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value in YAML (e.g. --set model.filters=[64,128])")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS, else a new local Ray)")
    args = p.parse_args(argv)

    def body() -> int:
        config = load_config(args.config, args.set)
        root = absolute_path(args.root, "--root", args.address)
        out = (absolute_path(args.out, "--out", args.address) if args.out
               else root / "train" / Path(args.config).stem)
        data = absolute_path(args.data, "--data", args.address) if args.data else None
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; it must be a folder")
        check_writable(out, "--out")
        if data is None:  # the dataset is generated under ROOT/data when missing
            check_writable(root, "--root")
        result = train_and_evaluate(config, out, data, root, args.address)
        names = ", ".join(f"{k} {v['mse']:.3g}" for k, v in result["per_target"].items())
        print(f"{out}: test mse {result['mse']:.4f} (raw units; per target: {names}), "
              f"r2 {'n/a' if result['r2'] is None else format(result['r2'], '.3f')}, {result['epochs']} epochs")
        return 0

    run_main("raypd.train", body)


if __name__ == "__main__":
    main()
