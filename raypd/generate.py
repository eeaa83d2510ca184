"""Stage 1: generate a dataset of ODE samples on Ray Data.

    python -m raypd.generate --n-actions 1 --samples 10000 --seed 42 --mu-range 0 0 --out DIR

Sample i is a pure function of (seed, i): it draws from its own random stream (Philox4x64
keyed by (seed, i), raypd.ode), and a draw that fails the stability filter or diverges is
redrawn from that same stream; draws, filter and solver run compiled, one sample at a time.
A dataset is therefore identical whatever the block size or the cluster. Ray Data runs
from_items(block numbers) -> map_batches(one block -> one Parquet file in a staging folder);
the driver only collects a 16-byte digest per row, writes _manifest.json and renames the
staging folder into place, so a dataset appears whole or not at all. An interrupted run leaves its finished
blocks in the staging folder and the same command picks them up again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from raypd import __version__, ode
from raypd.cli import ArgumentParser, absolute_path, check_shared, check_writable, init_ray, progress_bar, run_main
from raypd.cluster import cluster_cpus
from raypd.config import RANGE_FIELDS, DataConfig, from_dict, to_dict
from raypd.lock import hold
from raypd.dataio import (MANIFEST, content_hash, manifest_path, naming, read_manifest, row_digests, to_table,
                          write_table_atomic)


# Blocks (one Ray Data task and one Parquet file each). Each sample is solved on its own, so
# a block costs the sum of its samples and small blocks waste nothing but per-task overhead
# (~10 ms): the plan gives every CPU the cluster has, or can grow to, at least
# BLOCKS_PER_CPU blocks, in whole rounds of one block per CPU, so that no core idles while
# samples remain. MAX_BLOCK_SIZE bounds a block's memory (its columns, Arrow table and
# Parquet buffers: ~40 MB at n=3, 201 time points), MIN_BLOCK_SIZE its overhead.
MAX_BLOCK_SIZE = 8192
MIN_BLOCK_SIZE = 256
BLOCKS_PER_CPU = 2


def default_block_size(samples: int, cpus: float = 2) -> int:
    """Samples per block for `samples` samples on a cluster of `cpus` CPUs."""
    cpus = max(1, int(cpus))
    blocks = max(BLOCKS_PER_CPU * cpus, -(-samples // MAX_BLOCK_SIZE))
    blocks = -(-blocks // cpus) * cpus  # whole rounds
    return max(1, min(MAX_BLOCK_SIZE, max(MIN_BLOCK_SIZE, -(-samples // blocks))))


# How a sample is made from (seed, sample_id); the manifest records it. A folder with the same
# settings but another sampler (raypd before the compiled solver drew from SeedSequence
# streams) holds other rows, so it is not "this dataset".
SAMPLER = ("sample i: Philox4x64-10 keyed (seed, i) (numpy's Philox(key=[seed, i]) read by "
           "Generator.random()); draws of 2n+2n²+2n uniforms until one passes the stability "
           "filter and stays bounded; Dormand-Prince 5(4) per sample, steps landing on the times")

# A sample that finds no stable, bounded draw in this many tries means the sampling ranges
# (almost) never give one: stop with a clear error instead of looping forever.
MAX_DRAWS_PER_SAMPLE = 20_000


# --------------------------------------------------------------------------- samples


def generate_samples(config: DataConfig, sample_ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Draw, filter and solve the samples `sample_ids`.

    Returns the columns (sample_id, params, ic, series float32 (B, 2n, T)) and the number of
    draws it took. Each sample consumes its own stream (ode.sample_uniforms(seed, id, ...))
    in order, one draw (2n + 2n² + 2n uniforms) at a time, and keeps its first draw that
    passes the stability filter and stays bounded.
    """
    config.validate()
    lo, hi = config.bounds()
    ids = np.asarray(sample_ids, dtype=np.int64)
    columns, draws, failed = ode.draw_samples(config.seed, ids, lo, hi, config.n_actions, config.times(),
                                              config.rtol, config.atol, MAX_DRAWS_PER_SAMPLE)
    if failed >= 0:
        raise ValueError(
            f"sample {int(ids[failed])} found no stable, bounded draw in "
            f"{MAX_DRAWS_PER_SAMPLE} tries: the sampling ranges give (almost) only "
            "unstable or diverging systems; widen or move them")
    return columns, int(draws.sum())


def check_feasible(config: DataConfig, tries: int = 20_000) -> None:
    """Fail fast, before any cluster work, when the ranges (almost) never give a stable,
    bounded draw: a probe of `tries` draws must find at least one."""
    n = config.n_actions
    n_p = ode.num_params(n)
    lo, hi = config.bounds()
    values = lo + (hi - lo) * np.random.default_rng(0).random((tries, lo.size))
    stable = values[ode.is_stable(ode.Params.unpack(values[:, :n_p], n))][:64]
    if stable.size:
        _, ok = ode.solve(stable[:, :n_p], stable[:, n_p:], config.times(), n, config.rtol, config.atol)
        if ok.any():
            return
    what = "stays bounded" if stable.size else "passes the stability filter"
    raise ValueError(f"no draw in {tries} tries from these sampling ranges {what}: "
                     "widen or move the ranges")


# --------------------------------------------------------------------------- blocks on Ray Data


def _block_file(first: int, count: int) -> str:
    return f"part-{first:010d}-{count:08d}.parquet"


def _block_plan(samples: int, block_size: int) -> list[tuple[int, int]]:
    return [(first, min(block_size, samples - first)) for first in range(0, samples, block_size)]


def generate_block(batch: dict, config: dict, staging: str, plan: list) -> dict:
    """Ray Data map_batches body: generate each listed block into its own Parquet file.

    A block whose file is already in the staging folder (an earlier, interrupted run) is not
    generated again. Files appear by rename, so a file that exists is complete.
    """
    cfg = from_dict(DataConfig, config)
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = {"block": [], "draws": [], "digests": [], "node": []}
    for block in batch["id"]:
        first, count = plan[int(block)]
        path = Path(staging) / _block_file(first, count)
        digest_path = path.with_suffix(".digest")
        if path.exists() and digest_path.exists():
            meta = json.loads(digest_path.with_suffix(".json").read_text())
            out["block"].append(int(block))
            out["draws"].append(meta["draws"])
            out["digests"].append(digest_path.read_bytes())
            out["node"].append(node)
            continue
        columns, draws = generate_samples(cfg, np.arange(first, first + count))
        digests = row_digests(columns)
        with naming(digest_path):
            digest_path.write_bytes(digests)
            digest_path.with_suffix(".json").write_text(json.dumps({"draws": draws}))
        write_table_atomic(to_table(columns), path)  # last: the Parquet file marks the block done
        out["block"].append(int(block))
        out["draws"].append(draws)
        out["digests"].append(digests)
        out["node"].append(node)
    return {k: np.array(v, dtype=object if k in ("digests", "node") else np.int64) for k, v in out.items()}


# --------------------------------------------------------------------------- the dataset


def check_out_dir(config: DataConfig, out: Path) -> dict | None:
    """The manifest if `out` already holds this dataset; None if `out` is free.

    Raises ValueError (changing nothing) if `out` is a file, or holds something else.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder (new, empty, or this dataset)")
    if not out.exists() or not any(out.iterdir()):
        return None
    if manifest_path(out) is None:  # a dataset of an older raypd has manifest.json
        raise ValueError(f"--out {out} is a non-empty folder without {MANIFEST}; "
                         "choose a new or empty folder")
    manifest = read_manifest(out)
    if manifest.get("settings") != to_dict(config):
        theirs = manifest["settings"] if isinstance(manifest.get("settings"), dict) else {}
        diff = [k for k in to_dict(config) if theirs.get(k) != to_dict(config)[k]]
        raise ValueError(f"--out {out} already holds a different dataset (differs in: "
                         f"{', '.join(diff) or 'format'}); choose another --out")
    if manifest.get("sampler") != SAMPLER:
        raise ValueError(f"--out {out} holds these settings drawn by an earlier raypd from other "
                         "random streams (other rows); choose another --out, or remove the folder "
                         "to make it again")
    return manifest


def generate(config: DataConfig, out: str | os.PathLike, block_size: int | None = None,
             address: str | None = None, progress: bool = True) -> dict:
    """Generate the dataset `config` into folder `out` (if it is not there yet); return its
    manifest. Joins the Ray cluster at `address`/$RAY_ADDRESS or starts local Ray."""
    config.validate()
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    out = Path(out).absolute()
    existing = check_out_dir(config, out)
    if existing is not None:
        return existing

    # Compile (first run of this raypd: ~10-30 s) or load (~0.5 s) the solver here, once: it
    # lands in numba's on-disk cache, from which every Ray worker then loads it.
    ode.warm_up(config.n_actions)
    check_feasible(config)
    check_space(config, out, out.with_name(f".{out.name}.staging"))
    import ray

    init_ray(address)
    check_shared(out.parent)
    cpus = cluster_cpus()
    if block_size is None:
        block_size = default_block_size(config.samples, cpus)
    settings = to_dict(config)
    plan = _block_plan(config.samples, block_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one writer per dataset, also across the nodes that share ROOT (raypd.lock)
    with hold(out.parent / f".{out.name}.lock", f"dataset {out}"):
        existing = check_out_dir(config, out)  # published by another process meanwhile
        if existing is not None:
            return existing
        staging = out.with_name(f".{out.name}.staging")
        _prepare_staging(staging, settings, plan)

        # On an autoscaling cluster, ask now for the CPUs this plan can use at once: Ray Data
        # queues only as many tasks as the nodes that are up can take, so demand alone grows the
        # cluster about one node at a time (seen on the fake autoscaler: all blocks on one node).
        # Without an autoscaler this is a no-op; the request is withdrawn when generation ends.
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"CPU": 1}] * min(len(plan), int(cpus)))
        start = time.perf_counter()
        # One input row per block, made here rather than by read tasks (ray.data.range would run
        # one ReadRange task per block first, each taking a CPU). The dashboard shows the tasks
        # as MapBatches(generate_block).
        ds = ray.data.from_items([{"id": i} for i in range(len(plan))], override_num_blocks=len(plan))
        ds = ds.map_batches(generate_block, batch_size=1, num_cpus=1,
                            fn_kwargs={"config": settings, "staging": str(staging), "plan": plan})
        # Settings of this dataset only (ds.context is its own copy of the DataContext):
        ds.context.enable_progress_bars = False  # one bar, in samples, below
        # Ray Data reserves a share of the CPUs for each operator of a pipeline; here, with one
        # map operator behind the input, that held every other CPU idle until a few tasks had
        # finished, and left a gap before each task (8 half-second tasks on 2 CPUs: 3.05 s with
        # the reservation, 2.1 s without). This pipeline has nothing to starve.
        ds.context.op_resource_reservation_enabled = False
        digests: list[bytes | None] = [None] * len(plan)
        draws = 0
        nodes = set()
        bar = progress_bar(config.samples, f"generate {out.name}", progress)
        try:
            for row in ds.iter_rows():
                digests[row["block"]] = row["digests"]
                draws += int(row["draws"])
                nodes.add(row["node"])
                bar.update(plan[row["block"]][1])
        except Exception as exc:  # a user error raised inside a block comes back wrapped
            cause = _user_error(exc)
            if cause is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise cause from None
        finally:
            bar.close()
            request_resources(bundles=[])  # back to scaling on demand
        assert all(d is not None for d in digests)

        manifest = {
            "format": "raypd-dataset/1",
            "raypd_version": __version__,
            "settings": settings,
            "n_actions": config.n_actions,
            "samples": config.samples,
            "seed": config.seed,
            "ranges": {name: list(getattr(config, name)) for name in RANGE_FIELDS},
            "time_span": list(config.time_span),
            "time_points": config.times().tolist(),
            "series_shape": [2 * config.n_actions, config.time_points],
            "param_names": ode.param_names(config.n_actions),
            "ic_names": ode.ic_names(config.n_actions),
            "channel_names": ode.channel_names(config.n_actions),
            "columns": {"sample_id": "int64", "params": "list<double>", "ic": "list<double>",
                        "series": "list<float> (channel, time) row-major"},
            "files": [{"path": _block_file(f, c), "first_sample_id": f, "rows": c} for f, c in plan],
            "sampler": SAMPLER,
            "content_hash": content_hash(b"".join(digests)),
            "content_hash_method": "sha256 over the rows' 16-byte blake2b digests of "
                                   "(sample_id <i8, params <f8, ic <f8, series <f4), in sample_id order",
            "draws": draws,
            "acceptance": config.samples / draws,
            "generation_seconds": round(time.perf_counter() - start, 3),
            "generation_nodes": len(nodes),  # how many Ray nodes generated blocks (not content)
        }
        _publish(staging, out, manifest)
        return manifest


def estimated_bytes(config: DataConfig) -> int:
    """What the dataset will take on disk: the Parquet bytes per row of its first 256 samples
    (written to memory; zstd saves 1.4-2.6x on these series, more for n=1), 15% more for
    samples that compress worse, and the staging folder's 16-byte digests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = min(256, config.samples)
    columns, _ = generate_samples(config, np.arange(rows))
    sink = pa.BufferOutputStream()
    pq.write_table(to_table(columns), sink, compression="zstd")
    return int(config.samples * (1.15 * sink.getvalue().size / rows + 16)) + 2**20


def check_space(config: DataConfig, out: Path, staging: Path) -> None:
    """Before any block is generated: the file system that will hold `out` has room for the
    dataset (blocks already staged by an interrupted run count as written)."""
    import shutil

    staged = sum(p.stat().st_size for p in staging.glob("*")) if staging.is_dir() else 0
    needed = max(0, estimated_bytes(config) - staged)
    holder = out.parent
    while not holder.exists():  # the folder that will hold it may not be made yet
        holder = holder.parent
    free = shutil.disk_usage(holder).free
    if needed > free:
        raise ValueError(f"--out {out}: the dataset needs about {needed / 2**20:.1f} MiB and the file system of "
                         f"{holder} has {free / 2**20:.1f} MiB free; free space or choose another --out")


def _prepare_staging(staging: Path, settings: dict, plan: list) -> None:
    """Reuse the staging folder of an interrupted run of the same command; else start anew."""
    marker = staging / "staging.json"
    wanted = {"settings": settings, "plan": plan}
    if staging.exists():
        try:
            same = json.loads(marker.read_text()) == json.loads(json.dumps(wanted))
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(staging)
    if not staging.exists():
        staging.mkdir(parents=True)
        with naming(marker):
            marker.write_text(json.dumps(wanted))
    for stale in staging.glob(".tmp-*"):  # half-written files of a killed run
        stale.unlink()


def _publish(staging: Path, out: Path, manifest: dict) -> None:
    for path in list(staging.glob("*.digest")) + list(staging.glob("*.json")):
        path.unlink()
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():  # an empty folder (checked before we started)
        out.rmdir()
    os.replace(staging, out)


def _user_error(exc: BaseException) -> ValueError | None:
    """The ValueError raised inside a Ray task, if that is what `exc` wraps."""
    seen = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, ValueError) and "found no stable, bounded draw" in str(seen):
            return ValueError(str(seen).strip().splitlines()[-1].split("ValueError: ")[-1])
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return None


# --------------------------------------------------------------------------- command line


def _parser() -> ArgumentParser:
    defaults = DataConfig()
    p = ArgumentParser(prog="python -m raypd.generate",
                       description="Generate a dataset of preference-dynamics ODE samples on Ray Data.")
    p.add_argument("--n-actions", type=int, default=defaults.n_actions, help="n: 1, 2 or 3 (default %(default)s)")
    p.add_argument("--samples", type=int, default=defaults.samples, help="number of samples K (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="dataset seed (default %(default)s)")
    for name in RANGE_FIELDS:
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=float, nargs=2, metavar=("LO", "HI"), default=getattr(defaults, name),
                       help="uniform sampling range (default %(default)s)")
    p.add_argument("--time-span", type=float, nargs=2, metavar=("T0", "T1"), default=defaults.time_span,
                   help="time span (default %(default)s)")
    p.add_argument("--time-points", type=int, default=defaults.time_points,
                   help="number of evenly spaced observation times T (default %(default)s)")
    p.add_argument("--out", help="dataset folder (default runs/data/<name from the settings>)")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--block-size", type=int,
                   help=f"samples per Ray Data block and Parquet file (default: {BLOCKS_PER_CPU} or "
                        "more blocks per CPU the cluster has or can grow to, in whole rounds, "
                        f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} samples each); the dataset does not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    def body() -> int:
        names = [f.name for f in dataclasses.fields(DataConfig) if f.name not in ("rtol", "atol")]
        config = from_dict(DataConfig, {k: getattr(args, k) for k in names}).validate()
        out = absolute_path(args.out or Path("runs") / "data" / config.dataset_name(), "--out", args.address)
        check_writable(out, "--out", beside=True)  # the blocks are staged beside it
        manifest = generate(config, out, block_size=args.block_size, address=args.address,
                            progress=not args.no_progress)
        print(f"{out}: {manifest['samples']} samples, {manifest['content_hash']}")
        return 0

    run_main("raypd.generate", body)


if __name__ == "__main__":
    main()
