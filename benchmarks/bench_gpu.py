"""Studies on a GPU: what the user waits for, and how busy the GPU is meanwhile (issue 11).

    python benchmarks/bench_gpu.py [--gpus-per-trial 0.125] [--samples 10000] [--device cuda]

On a CUDA machine it prints, in one run:
- a plain PyTorch epoch of the notebook's best model (filters [64, 128], hidden [128]) over
  the reference dataset's training split, at batch 32 and at batch 256 (the launch-bound and
  the arithmetic-bound reference points);
- the filters study's wall time with its dataset already present
  (`python -m raypd.tune --study filters --set train.gpus_per_worker=G`), its best val_loss and
  test MSE, and the GPU's utilisation (nvidia-smi, every 0.5 s) while it ran: median and the
  share of samples >= 50%.
Without a CUDA device it says so and exits 0 (`--device cpu` runs the plain-loop part on the
CPU, to check the script itself).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raypd.config import load_config  # noqa: E402
from raypd.dataset import load_dataset, prepare  # noqa: E402
from raypd.model import CNN1D  # noqa: E402
from raypd.train import dataset_dir  # noqa: E402

FILTERS = str(REPO / "tune_configs" / "filters.yaml")
BEST = ["model.filters=[64,128]", "model.kernel_sizes=[3,3]", "model.hidden=[128]"]


def plain_epoch(config, data, batch: int, device: str, epochs: int = 3) -> float:
    """Seconds per epoch (the last epochs' mean) of a plain loop, synchronised at epoch end."""
    torch.manual_seed(0)
    model = CNN1D(config.model, data.inputs["train"].shape[1], data.n_outputs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    x = torch.tensor(data.inputs["train"], device=device)
    y = torch.tensor(data.targets["train"], device=device)
    times = []
    for _ in range(epochs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), batch):
            rows = order[i : i + batch]
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


def sample_utilisation(samples: list, stop: threading.Event) -> None:
    """nvidia-smi's GPU utilisation (%) every 0.5 s until `stop`."""
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                             "-lms", "500"], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if stop.is_set():
                break
            if line.strip().split(",")[0].strip().isdigit():
                samples.append(int(line.strip().split(",")[0]))
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus-per-trial", type=float, default=0.125)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run this on a GPU machine)")
        return
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"device: {where}")
    config = load_config(FILTERS, [*BEST, f"data.samples={args.samples}"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        data_dir = dataset_dir(config, root)
        subprocess.run([sys.executable, "-m", "raypd.generate", "--n-actions", "1", "--samples", str(args.samples),
                        "--seed", str(config.data.seed), "--mu-range", "0", "0", "--out", str(data_dir),
                        "--no-progress"], cwd=REPO, env=env, check=True, capture_output=True)
        data = prepare(load_dataset(data_dir), config.train)
        for batch in (32, 256):
            print(f"plain loop, best model, batch {batch}: {plain_epoch(config, data, batch, args.device):.3f} s/epoch")
        if args.device != "cuda":
            return
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sample_utilisation, args=(samples, stop), daemon=True)
        sampler.start()
        start = time.perf_counter()
        study = subprocess.run([sys.executable, "-m", "raypd.tune", "--study", "filters", "--root", str(root),
                                "--set", f"data.samples={args.samples}",
                                "--set", f"train.gpus_per_worker={args.gpus_per_trial}"],
                               cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        stop.set()
        if study.returncode != 0:
            sys.exit(f"the filters study failed:\n{study.stderr[-3000:]}")
        summary = json.loads((root / "tune" / "filters" / "summary.json").read_text())
        busy = np.array(samples or [0])
        print(f"filters study, {args.gpus_per_trial:g} GPU per trial, dataset present: {wall:.1f} s wall, "
              f"{summary['num_trials']} trials, {summary['total_epochs']} epochs, best val_loss "
              f"{summary['best_val_loss']:.4f}, test mse {summary['best_test_metrics']['mse']:.4f}")
        print(f"GPU utilisation while it ran ({busy.size} samples): median {np.median(busy):.0f}%, "
              f"mean {busy.mean():.0f}%, >= 50% in {100 * (busy >= 50).mean():.0f}% of samples")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
