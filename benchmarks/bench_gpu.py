"""Studies on a GPU: what the user waits for, and how busy the GPU is meanwhile (issue 11).

    python benchmarks/bench_gpu.py [--gpus-per-trial 0.125] [--samples 10000] [--device cuda]
                                   [--studies eager,graph,graph+mps]

On a CUDA machine it prints, in one run:
- epochs of the notebook's best model (filters [64, 128], hidden [128]), and of the residual
  1d CNN (width 64, 4 blocks, batch norm), over the reference
  dataset's training split at batch 32 and 256: a plain PyTorch loop, and raypd.train's step
  (make_train_step) eager and as a CUDA graph (train.cuda_graph), with the graph's speed-up;
- the filters study's wall time with its dataset already present
  (`python -m raypd.tune --study filters --set train.gpus_per_worker=G`) for each variant:
  eager steps, `train.cuda_graph=true`, and the graph with a CUDA MPS daemon of its own
  running (kernels of the trials' processes then overlap instead of time-slicing); its best
  val_loss and test MSE, and the GPU's utilisation (nvidia-smi, every 0.5 s) while it ran:
  median, mean and the share of samples >= 50%.
Without a CUDA device it says so and exits 0 (`--device cpu` runs the epoch part on the CPU,
to check the script itself).
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
from raypd.model import build_model  # noqa: E402
from raypd.config import dataset_dir  # noqa: E402
from raypd.train import make_train_step  # noqa: E402

FILTERS = str(REPO / "tune_configs" / "filters.yaml")
BEST = ["model.filters=[64,128]", "model.kernel_sizes=[3,3]", "model.hidden=[128]"]
# the residual 1d CNN of tune_configs/n2.yaml's space at its widest (issue 31)
RESNET = ["model.family=resnet", "model.width=64", "model.blocks=4", "model.norm=batch"]


def epoch_seconds(config, data, batch: int, device: str, how: str, epochs: int = 4) -> float:
    """Seconds per epoch (mean of the epochs after the first), synchronised at epoch end.
    how: "plain" (a plain PyTorch loop), "eager" or "graph" (raypd.train.make_train_step)."""
    torch.manual_seed(0)
    model = build_model(config.model, data.inputs("train").shape[1], data.n_outputs).to(device)
    graph = how == "graph"
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, capturable=graph)
    x = torch.tensor(data.inputs("train"), device=device)
    y = torch.tensor(data.targets["train"], device=device)
    step = None if how == "plain" else make_train_step(model, optimizer, batch, config.train.grad_clip, graph,
                                                       x.shape[1:], y.shape[1])
    times = []
    for _ in range(epochs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(x), batch):
            rows = order[i : i + batch]
            if step is not None:
                total += step(x[rows], y[rows])
                continue
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)  # as raypd's step
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


class MPS:
    """A CUDA MPS control daemon of our own (its pipe and log folders in a temp dir, so it
    touches no other daemon), for the processes started with `env`; quit on exit."""

    def __init__(self, folder: Path):
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        for sub in ("pipe", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)

    def __enter__(self):
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True)
        return self

    def __exit__(self, *exc):
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env)


def run_study(root: Path, samples: int, gpus_per_trial: float, graph: bool, env: dict) -> None:
    """The filters study in its own root (the dataset linked from the shared root), timed,
    with the GPU's utilisation; prints one line for it."""
    shared, root = root, root / f"study-{len(list(root.glob('study-*')))}"
    root.mkdir()
    (root / "data").symlink_to(shared / "data")
    busy, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_utilisation, args=(busy, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    study = subprocess.run([sys.executable, "-m", "raypd.tune", "--study", "filters", "--root", str(root),
                            "--set", f"data.samples={samples}",
                            "--set", f"train.gpus_per_worker={gpus_per_trial}",
                            "--set", f"train.cuda_graph={'true' if graph else 'false'}"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    if study.returncode != 0:
        print(f"  the study failed:\n{study.stderr[-3000:]}")
        return
    summary = json.loads((root / "tune" / "filters" / "summary.json").read_text())
    busy = np.array(busy or [0])
    print(f"  {wall:.1f} s wall, {summary['num_trials']} trials, {summary['total_epochs']} epochs, "
          f"best val_loss {summary['best_val_loss']:.4f}, test mse {summary['best_test_metrics']['mse']:.4f}; "
          f"GPU utilisation ({busy.size} samples): median {np.median(busy):.0f}%, mean {busy.mean():.0f}%, "
          f">= 50% in {100 * (busy >= 50).mean():.0f}% of samples", flush=True)


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
    ap.add_argument("--studies", default="eager,graph,graph+mps",
                    help="comma-separated study variants: eager, graph, graph+mps (default %(default)s)")
    args = ap.parse_args()
    unknown = set(args.studies.split(",")) - {"eager", "graph", "graph+mps"}
    if unknown:
        ap.error(f"--studies: unknown variant(s) {', '.join(sorted(unknown))}; choose from eager, graph, graph+mps")
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
        resnet = load_config(FILTERS, [*BEST, *RESNET, f"data.samples={args.samples}"])
        for name, model_config in (("best model", config), ("residual model (width 64, 4 blocks)", resnet)):
            for batch in (32, 256):
                seconds = {how: epoch_seconds(model_config, data, batch, args.device, how)
                           for how in (("plain", "eager", "graph") if args.device == "cuda" else ("plain", "eager"))}
                line = ", ".join(f"{how} {t:.3f} s" for how, t in seconds.items())
                if "graph" in seconds:
                    line += f" (graph: {seconds['eager'] / seconds['graph']:.1f}x faster than eager)"
                print(f"{name}, batch {batch}, per epoch: {line}", flush=True)
        if args.device != "cuda":
            return
        for variant in args.studies.split(","):
            print(f"filters study, {args.gpus_per_trial:g} GPU per trial, dataset present, {variant}:", flush=True)
            if variant == "graph+mps":
                if shutil.which("nvidia-cuda-mps-control") is None:
                    print("  skipped: no nvidia-cuda-mps-control on this machine")
                    continue
                try:
                    with MPS(root / "mps") as mps:
                        run_study(root, args.samples, args.gpus_per_trial, True, {**env, **mps.env})
                except subprocess.CalledProcessError as exc:
                    print(f"  skipped: the MPS daemon did not start ({exc})")
            else:
                run_study(root, args.samples, args.gpus_per_trial, variant == "graph", env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
