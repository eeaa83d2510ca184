"""Training speed: an epoch of raypd.train on Ray Train (1 worker) against a plain PyTorch
loop over pre-stacked tensors of the same shapes, in one run on this machine.

    python benchmarks/bench_train.py [--epochs 3] [--samples 10000]

Both: the notebook's first model (filters [64], kernel 3, hidden [32], dropout 0.3), Adam,
batch 64, 10,000 n=1 samples split 70/15/15, one epoch = a pass over the 7,000 training
samples plus the validation loss on 1,500, with the same number of torch threads. The epoch
time of raypd.train is measured inside the Ray Train worker; Ray Train's start-up (worker
group, data to the worker, model set-up) is the rest of the fit's wall time.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypd.cli import init_ray  # noqa: E402
from raypd.config import load_config  # noqa: E402
from raypd.dataset import load_dataset, prepare  # noqa: E402
from raypd.generate import generate  # noqa: E402
from raypd.model import CNN1D  # noqa: E402
from raypd.train import fit, read_state  # noqa: E402


def plain_epochs(config, data, epochs: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CNN1D(config.model, data.inputs["train"].shape[1], data.n_outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    x, y = torch.tensor(data.inputs["train"]), torch.tensor(data.targets["train"])
    xv, yv = torch.tensor(data.inputs["val"]), torch.tensor(data.targets["val"])
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), config.train.batch_size):
            batch = order[i : i + config.train.batch_size]
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
        model.eval()
        with torch.no_grad():
            sum(torch.nn.functional.mse_loss(model(xv[i : i + 512]), yv[i : i + 512]).item()
                for i in range(0, len(xv), 512))
        times.append(time.perf_counter() - start)
    return times


def dataset_shard_loop(loop_config: dict) -> None:
    """The same epoch with the data streamed by Ray Data: get_dataset_shard +
    iter_torch_batches (the documented path), for comparison with raypd's object-store path."""
    import ray.train
    import ray.train.torch

    config = loop_config["config"]
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(CNN1D(config.model, loop_config["channels"], loop_config["outputs"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config.train.epochs):
        start = time.perf_counter()
        model.train()
        for batch in shard.iter_torch_batches(batch_size=config.train.batch_size, local_shuffle_buffer_size=1000):
            loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
        seconds = time.perf_counter() - start
        ray.train.report({"epoch": epoch + 1, "epoch_seconds": seconds})
        with open(loop_config["log"], "a") as log:  # one machine: a file is the simplest way back
            log.write(f"{seconds}\n")


def run_dataset_shard(config, data, log: Path) -> list[float]:
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    train = ray.data.from_items([{"x": x, "y": y} for x, y in zip(data.inputs["train"], data.targets["train"])])
    trainer = TorchTrainer(dataset_shard_loop, datasets={"train": train},
                           train_loop_config={"config": config, "channels": data.inputs["train"].shape[1],
                                              "outputs": data.n_outputs, "log": str(log)},
                           scaling_config=ScalingConfig(num_workers=1))
    trainer.fit()
    return [float(line) for line in log.read_text().split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=10_000)
    args = ap.parse_args()
    init_ray(None)
    import ray

    config = load_config(str(Path(__file__).resolve().parents[1] / "tune_configs" / "base.yaml"),
                         [f"data.samples={args.samples}", "train.batch_size=64", "train.num_workers=1",
                          f"train.epochs={args.epochs}", "train.patience=1000"])
    with tempfile.TemporaryDirectory() as tmp:
        generate(config.data, Path(tmp) / "data", progress=False)
        data = prepare(load_dataset(Path(tmp) / "data"), config.train)

        @ray.remote(num_cpus=1)
        def worker_threads() -> int:  # what a 1-CPU Ray worker gives torch
            import torch

            return torch.get_num_threads()

        threads = ray.get(worker_threads.remote())
        start = time.perf_counter()
        fit(config, ray.put(data), Path(tmp) / "run")
        wall = time.perf_counter() - start
        history = read_state(Path(tmp) / "run" / "checkpoints" / "last")["history"]
        shard_epochs = run_dataset_shard(config, data, Path(tmp) / "shard_epochs.txt")
    ray_epochs = [h["epoch_seconds"] for h in history]
    plain = plain_epochs(config, data, args.epochs, threads)
    # the first epoch of each warms up allocators and kernels: compare the others
    ray_epoch, plain_epoch = np.median(ray_epochs[1:] or ray_epochs), np.median(plain[1:] or plain)
    print(f"torch threads per worker: {threads}")
    print(f"raypd.train (Ray Train, 1 worker): epoch {ray_epoch:.2f} s (all: {', '.join(f'{t:.2f}' for t in ray_epochs)})")
    print(f"plain PyTorch loop:                epoch {plain_epoch:.2f} s (all: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"ratio raypd / plain: {ray_epoch / plain_epoch:.2f}x")
    shard_epoch = np.median(shard_epochs[1:] or shard_epochs)
    print(f"the same epoch through get_dataset_shard + iter_torch_batches: {shard_epoch:.2f} s "
          f"({shard_epoch / plain_epoch:.2f}x plain; all: {', '.join(f'{t:.2f}' for t in shard_epochs)})")
    print(f"Ray Train start-up and wrap-up (fit wall time minus its epochs): {wall - sum(ray_epochs):.1f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
