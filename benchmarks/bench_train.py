"""Training speed as a user waits for it: `python -m raypd.train` against a plain PyTorch loop
over the same tensors, in one run on this machine.

    python benchmarks/bench_train.py [--samples 10000] [--short 3] [--long 13] [--workers 0 1 2]
                                     [--repeat 1]

For each worker count, the whole command runs twice, for --short and --long epochs; its wall
time per epoch is the difference divided by the extra epochs, so Ray's and Ray Train's
start-up cancel out and everything an epoch costs (reports, checkpoints) stays in. Start-up
varies by a few seconds from run to run on a loaded machine, so a large --long (33) and
--repeat 3 (the median of three pairs, with the range) give steadier figures. Beside it:
the inner-loop figure (the epochs' own `epoch_seconds`, which leaves the per-epoch reporting
out) and a plain loop with as many torch threads as the run uses (1 per Ray Train worker; the
machine's default in local mode, num_workers 0).

All runs: the notebook's first model (filters [64], kernel 3, hidden [32], dropout 0.3), Adam,
batch 64, n=1 samples split 70/15/15; an epoch is a pass over the training split plus the
validation loss. Held in memory or streamed through Ray Data, and how that scales with the
dataset's size: benchmarks/bench_data.py.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raypd.config import load_config  # noqa: E402
from raypd.dataset import load_dataset, prepare  # noqa: E402
from raypd.model import CNN1D  # noqa: E402

BASE = str(REPO / "tune_configs" / "base.yaml")


def plain_epochs(config, data, epochs: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CNN1D(config.model, data.inputs("train").shape[1], data.n_outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    x, y = torch.tensor(data.inputs("train")), torch.tensor(data.targets["train"])
    xv, yv = torch.tensor(data.inputs("val")), torch.tensor(data.targets["val"])
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


def timed_cli(*args) -> float:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--short", type=int, default=3)
    ap.add_argument("--long", type=int, default=13)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs per worker count (median reported)")
    args = ap.parse_args()
    sets = [f"data.samples={args.samples}", "train.batch_size=64", "train.patience=1000"]
    config = load_config(BASE, sets)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        timed_cli("raypd.generate", "--n-actions", "1", "--samples", str(args.samples), "--seed", "42",
                  "--mu-range", "0", "0", "--out", str(data_dir), "--no-progress")
        data = prepare(load_dataset(data_dir), config.train)
        rows = []
        for index, workers in enumerate(args.workers):
            per_epoch, inner = [], []
            for repeat in range(args.repeat):
                walls = {}
                for epochs in (args.short, args.long):
                    out = Path(tmp) / f"run-{index}-{repeat}-{epochs}"  # a fresh folder: no resuming
                    walls[epochs] = timed_cli("raypd.train", "--config", BASE, "--data", str(data_dir), "--out",
                                              str(out), *[f"--set={s}" for s in sets],
                                              f"--set=train.num_workers={workers}", f"--set=train.epochs={epochs}")
                    history = json.loads((out / "metrics.json").read_text())["history"]
                    assert len(history) == epochs, "the run stopped early: raise train.patience"
                per_epoch.append((walls[args.long] - walls[args.short]) / (args.long - args.short))
                inner += [h["epoch_seconds"] for h in history[1:]]
            threads = workers or torch.get_num_threads()
            plain = plain_epochs(config, data, args.long, threads)
            plain_epoch = float(np.mean(plain[1:]))  # the first warms up allocators and kernels
            rows.append((workers, threads, per_epoch, float(np.median(inner)), plain_epoch))
    print(f"{args.samples} n=1 samples, batch 64, base model; wall per epoch = "
          f"(wall of {args.long} epochs - wall of {args.short}) / {args.long - args.short}, "
          f"median of {args.repeat} pair(s)")
    for workers, threads, per_epoch, inner_epoch, plain_epoch in rows:
        name = f"{workers} worker(s)" if workers else "local mode"
        wall_epoch = float(np.median(per_epoch))
        spread = f" (pairs: {', '.join(f'{v:.3f}' for v in per_epoch)})" if len(per_epoch) > 1 else ""
        print(f"raypd.train, {name}: {wall_epoch:.3f} s per epoch{spread}; inner loop {inner_epoch:.3f} s; "
              f"plain loop ({threads} thread(s)) {plain_epoch:.3f} s; ratio wall/plain {wall_epoch / plain_epoch:.2f}x, "
              f"inner/plain {inner_epoch / plain_epoch:.2f}x")


if __name__ == "__main__":
    main()
