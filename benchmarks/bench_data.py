"""Training on datasets of any size, as a user waits for it: peak memory and wall time per
epoch of the whole `python -m raypd.train` command, with the series held in memory and
streamed through Ray Data, in one run on this machine.

    python benchmarks/bench_data.py --data DIR [DIR ...] [--config tune_configs/n2_cnn.yaml]
                                    [--epochs 1 3] [--modes memory stream] [--repeat 1] [--set KEY=VALUE ...]
    python benchmarks/bench_data.py --study --data DIR [--config tune_configs/n2_cnn.yaml] [--set ...]
    python benchmarks/bench_data.py --shuffle --data DIR [--shuffle-set shuffle_buffer=N]

Datasets: `python -m raypd.generate --n-actions 2 --samples K --seed 42 --mu-range 0 0 --out DIR`.
For each dataset and mode (memory: train.streaming=false, train and val held; stream:
train.streaming=true, the training split streamed, val held when it fits) the command runs
once per --epochs value; wall time per epoch is the difference of the two runs' wall times
divided by the extra epochs (start-up, the one pass over the files, evaluation and interval
calibration cancel out). Memory: every 0.25 s, the proportional set size (PSS: a shared
page, such as Ray's object store, counted once over the processes that map it) summed over
the command's process tree (the driver, Ray's processes, its workers), and the largest
single process's RSS; the peak of each over the run (--study: also each process's own peaks).

--shuffle: one epoch of the first dataset's stream, and how close its order is to a full
permutation (distinct files per batch; the share of the epoch between the quartiles of a
file's samples).

--study: one `python -m raypd.tune` study (the config's search, 4 trials by default through
--set search.num_samples=4) on the dataset, its peak memory and wall time; the dataset is
linked into a temporary ROOT/data under the name the study looks for.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raypd.config import load_config  # noqa: E402
from raypd.dataio import read_manifest  # noqa: E402


def tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory(pids: list[int]) -> dict[int, tuple[str, int, int]]:
    """{pid: (what it is, PSS, RSS in bytes)}: its command line (a Ray worker's says what it
    runs, e.g. ray::ImplicitFunc.train for a Tune trial)."""
    out = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:]}
        out[pid] = (" ".join(name.split()[:4])[:80], values.get("Pss", 0), values.get("Rss", 0))
    return out


# Ray's processes that serve the whole cluster, not a trial (Ray Data's two are per cluster)
CLUSTER_WIDE = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::_StatsActor", "ray::_AutoscalingCoordinatorActor")


def run(command: list[str], log: Path) -> dict:
    """Run a command to its end; its wall time and peak memory: of all its processes together
    (PSS), of each process (its peak PSS and RSS, under the name it had at its PSS peak), and
    per trial (a study): the PSS of the trials' processes and of every other Ray worker process
    (their stream readers and coordinators, idle workers too), over the number of trials
    running at that moment."""
    peak = {"pss": 0, "rss": 0, "per_trial": 0}
    processes: dict[int, dict] = {}
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)

        def sample():
            while process.poll() is None:
                now = memory(tree(process.pid))
                peak["pss"] = max(peak["pss"], sum(pss for _, pss, _ in now.values()))
                peak["rss"] = max([peak["rss"], *(rss for _, _, rss in now.values())])
                trials = sum("ImplicitFunc" in name for name, _, _ in now.values())
                if trials:
                    workers = sum(pss for name, pss, _ in now.values()
                                  if name.startswith("ray::") and not name.startswith(CLUSTER_WIDE))
                    peak["per_trial"] = max(peak["per_trial"], workers / trials)
                for pid, (name, pss, rss) in now.items():
                    seen = processes.setdefault(pid, {"name": name, "pss": 0, "rss": 0})
                    if pss > seen["pss"]:
                        seen.update(name=name, pss=pss)
                    seen["rss"] = max(seen["rss"], rss)
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log}")
    largest = sorted(processes.values(), key=lambda p: -p["pss"])[:8]
    return {"seconds": time.perf_counter() - started, "peak_pss_gb": peak["pss"] / 1e9,
            "peak_rss_gb": peak["rss"] / 1e9, "peak_per_trial_gb": peak["per_trial"] / 1e9,
            "processes": [{"name": p["name"], "peak_pss_gb": p["pss"] / 1e9, "peak_rss_gb": p["rss"] / 1e9}
                          for p in largest]}


def train_runs(args, work: Path) -> list[dict]:
    """Each dataset: --repeat rounds, each running every mode for both epoch counts in turn
    (memory and stream alternate, so a slow spell of a shared machine hits both); per mode the
    median over rounds of the differenced wall time per epoch."""
    import statistics

    rows = []
    for data in args.data:
        samples = read_manifest(data)["samples"]
        runs: dict[str, list] = {mode: [] for mode in args.modes}
        for round_ in range(args.repeat):
            for epochs in args.epochs:
                for mode in args.modes:
                    out = work / f"{Path(data).name}-{mode}-{epochs}-{round_}"
                    command = [sys.executable, "-m", "raypd.train", "--config", args.config, "--data", data,
                               "--out", str(out), "--set", f"train.epochs={epochs}", "--set", "train.patience=1000",
                               "--set", f"train.streaming={'true' if mode == 'stream' else 'false'}",
                               *[a for s in args.set for a in ("--set", s)]]
                    result = run(command, work / f"{out.name}.log")
                    metrics = json.loads((out / "metrics.json").read_text())
                    result.update(epochs=epochs, round=round_, mse=metrics["mse"], streamed=metrics.get("streamed"),
                                  inner=sum(h["epoch_seconds"] for h in metrics["history"][1:]) /
                                  max(len(metrics["history"]) - 1, 1))
                    runs[mode].append(result)
                    print(f"  {Path(data).name} {mode} {epochs} epochs: {result['seconds']:.1f} s, peak PSS "
                          f"{result['peak_pss_gb']:.2f} GB, largest process {result['peak_rss_gb']:.2f} GB",
                          flush=True)
        for mode, done in runs.items():
            per_epoch = []
            for round_ in range(args.repeat):
                first, last = (next(r for r in done if r["round"] == round_ and r["epochs"] == e) for e in args.epochs)
                per_epoch.append((last["seconds"] - first["seconds"]) / (last["epochs"] - first["epochs"]))
            rows.append({"data": data, "samples": samples, "mode": mode, "s_per_epoch": statistics.median(per_epoch),
                         "s_per_epoch_all": per_epoch,
                         "inner_s_per_epoch": statistics.median(r["inner"] for r in done if r["epochs"] == args.epochs[1]),
                         "peak_pss_gb": max(r["peak_pss_gb"] for r in done),
                         "peak_rss_gb": max(r["peak_rss_gb"] for r in done), "runs": done})
    return rows


def study_run(args, work: Path) -> dict:
    data = Path(args.data[0]).absolute()
    manifest = read_manifest(data)
    sets = [f"data.{key}={json.dumps(value)}" for key, value in manifest["settings"].items()]
    sets += ["search.num_samples=4", *args.set]
    config = load_config(args.config, sets)
    root = work / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / config.data.dataset_name()).symlink_to(data)
    command = [sys.executable, "-m", "raypd.tune", "--config", args.config, "--root", str(root),
               *[a for s in sets for a in ("--set", s)]]
    result = run(command, work / "study.log")
    summary = json.loads(next((root / "tune").glob("*/summary.json")).read_text())
    result.update(samples=manifest["samples"], trials=summary["num_trials"], epochs=summary["total_epochs"],
                  test_mse=summary["best_test_metrics"]["mse"] if summary["best_test_metrics"] else None)
    return result


def shuffle_run(args) -> dict:
    """One epoch of the first dataset's training split through raypd's stream (its files in a
    shuffled order, batches of 32 drawn from a shuffle buffer of train.shuffle_buffer rows):
    how close to a full permutation it is. Per batch, the number of distinct files its
    samples come from, against the expected number under a full permutation; per file, the
    share of the epoch between the quartiles of its samples' positions (~1/2 under a full
    permutation)."""
    import numpy as np
    import ray

    from raypd.config import TrainConfig
    from raypd.dataset import open_dataset, prepare, stream_split
    from raypd.train import stream_batches

    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    train = TrainConfig(input_norm="sample+scale", **{k: int(v) for k, v in (s.split("=", 1) for s in args.shuffle_set)})
    data = prepare(args.data[0], train, held=("val",))
    files = open_dataset(args.data[0]).manifest["files"]
    file_of = np.repeat(np.arange(len(files)), [f["rows"] for f in files])
    # a sample is known by its standardised targets (float32 rows; no two alike here)
    id_of = {row.tobytes(): i for row, i in zip(data.targets["train"], data.sample_ids["train"])}
    assert len(id_of) == len(data.sample_ids["train"]), "two training samples with the same targets"
    stream = stream_split(data, "train", shuffle_seed=0).streaming_split(1)[0]
    order = []
    distinct = []
    for _, y in stream_batches(stream, 32, data.input_norm, train.shuffle_buffer, seed=0):
        ids = [id_of[row.tobytes()] for row in y.numpy()]
        order += ids
        distinct.append(len(set(file_of[ids])))
    ray.shutdown()
    order = np.array(order)
    assert np.array_equal(np.sort(order), data.sample_ids["train"]), "not every sample once"
    per_file = np.bincount(file_of[data.sample_ids["train"]], minlength=len(files))
    # expected distinct files in 32 draws without replacement from the training rows
    expected = sum(1 - np.prod([(per_file.sum() - k - j) / (per_file.sum() - j) for j in range(32)])
                   for k in per_file if k)
    position = np.empty(len(order))
    position[np.argsort(order)] = np.arange(len(order)) / len(order)
    spans = []
    for f in range(len(files)):
        rows = np.searchsorted(data.sample_ids["train"], data.sample_ids["train"][file_of[data.sample_ids["train"]] == f])
        if rows.size:
            spans.append(np.percentile(position[rows], 75) - np.percentile(position[rows], 25))
    return {"samples": len(order), "files": len(files), "buffer": train.shuffle_buffer,
            "distinct_files_per_batch": float(np.mean(distinct[:-1])), "expected_full_permutation": float(expected),
            "file_span_median": float(np.median(spans)), "file_span_max": float(np.max(spans))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="dataset folders")
    p.add_argument("--config", default=str(REPO / "tune_configs" / "n2_cnn.yaml"))
    p.add_argument("--epochs", nargs=2, type=int, default=[1, 3])
    p.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
    p.add_argument("--repeat", type=int, default=1, help="rounds; s/epoch is the median over them")
    p.add_argument("--set", action="append", default=[], help="passed on to the command")
    p.add_argument("--study", action="store_true", help="one study of 4 trials on the first dataset")
    p.add_argument("--keep", help="keep the runs' folders and logs here (default: a temporary folder)")
    p.add_argument("--shuffle", action="store_true", help="how close the stream's order is to a full permutation")
    p.add_argument("--shuffle-set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig fields for --shuffle, e.g. shuffle_buffer=20000")
    args = p.parse_args()
    if args.shuffle:
        result = shuffle_run(args)
        print(f"one epoch of {result['samples']:,} training samples from {result['files']} files, shuffle buffer "
              f"{result['buffer']:,}: {result['distinct_files_per_batch']:.1f} distinct files per batch of 32 "
              f"(a full permutation: {result['expected_full_permutation']:.1f}); a file's samples spread over "
              f"{result['file_span_median']:.1%} of the epoch between their quartiles (median over files; max "
              f"{result['file_span_max']:.1%}; a full permutation: ~50%)")
        return
    args.set = ["train.num_workers=0", *args.set]
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        work = Path(tmp)
        if args.study:
            result = study_run(args, work)
            print(f"study of {result['trials']} trials ({result['epochs']} epochs in all) on {result['samples']:,} "
                  f"samples: {result['seconds'] / 60:.1f} min, peak PSS {result['peak_pss_gb']:.2f} GB (all "
                  f"processes), largest process {result['peak_rss_gb']:.2f} GB; per trial (its process, its "
                  f"stream's reader and coordinator, idle Ray workers shared out) at most "
                  f"{result['peak_per_trial_gb']:.2f} GB PSS; best test MSE {result['test_mse']}")
            print("the largest processes (peak PSS: its own pages, and its share of pages it maps with others, "
                  "such as the object store's; peak RSS counts every page it maps):")
            for p in result["processes"]:
                print(f"  {p['peak_pss_gb']:6.2f} GB PSS {p['peak_rss_gb']:6.2f} GB RSS  {p['name']}")
            return
        rows = train_runs(args, work)
    print(f"\n{'samples':>9} {'mode':<7} {'s/epoch':>8} {'inner':>7} {'peak PSS GB':>11} {'largest GB':>10}")
    for r in rows:
        print(f"{r['samples']:>9,} {r['mode']:<7} {r['s_per_epoch']:>8.2f} {r['inner_s_per_epoch']:>7.2f} "
              f"{r['peak_pss_gb']:>11.2f} {r['peak_rss_gb']:>10.2f}"
              + (f"   rounds: {', '.join(f'{v:.2f}' for v in r['s_per_epoch_all'])}" if args.repeat > 1 else ""))
    by = {(r["samples"], r["mode"]): r for r in rows}
    for samples in sorted({r["samples"] for r in rows}):
        if (samples, "memory") in by and (samples, "stream") in by:
            ratio = by[(samples, "stream")]["s_per_epoch"] / by[(samples, "memory")]["s_per_epoch"]
            print(f"{samples:,} samples: streaming epochs take {ratio:.2f}x the in-memory epochs (wall time)")
    sizes = sorted({r["samples"] for r in rows})
    for mode in args.modes:
        if (sizes[0], mode) in by and len(sizes) > 1:
            grow = by[(sizes[-1], mode)]["peak_pss_gb"] - by[(sizes[0], mode)]["peak_pss_gb"]
            print(f"{mode}: peak PSS grows by {grow:+.2f} GB from {sizes[0]:,} to {sizes[-1]:,} samples")


if __name__ == "__main__":
    main()
