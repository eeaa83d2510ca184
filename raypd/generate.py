"""Stage 1: generate a dataset of ODE samples on Ray Data.

    python -m raypd.generate --n-actions 1 --samples 10000 --seed 42 --mu-range 0 0 --out DIR

Sample i is a pure function of (seed, i): it draws from its own random stream
(SeedSequence(seed, spawn_key=(i,))), and a draw that fails the stability filter or diverges
is redrawn from that same stream. A dataset is therefore identical whatever the block size or
the cluster. Ray Data runs range(blocks) -> map_batches(one block -> one Parquet file in a
staging folder); the driver only collects a 16-byte digest per row, writes manifest.json and
renames the staging folder into place, so a dataset appears whole or not at all. An
interrupted run leaves its finished blocks in the staging folder and the same command picks
them up again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from raypd import __version__, ode
from raypd.cli import ArgumentParser, check_shared, init_ray, run_main
from raypd.config import RANGE_FIELDS, DataConfig, from_dict, to_dict

MANIFEST = "manifest.json"
# Blocks: at least 4 when there are enough samples, at most 8192 samples each (a block's
# solver state stays below ~100 MB). Few, large blocks pay off: the slowest trajectory of a
# block sets how many steps its solver loop runs, a fixed cost per block (~0.2 s for n=1,
# ~1.4 s for n=3 on this machine's cores), so more blocks than cores mostly adds such tails.
MAX_BLOCK_SIZE = 8192


def default_block_size(samples: int) -> int:
    return min(MAX_BLOCK_SIZE, max(256, -(-samples // 4)))

# A sample that finds no stable, bounded draw in this many tries means the sampling ranges
# (almost) never give one: stop with a clear error instead of looping forever.
MAX_DRAWS_PER_SAMPLE = 20_000
# Draws tried at once per pending sample: about two expected successes' worth (DESIGN §1:
# n=1 keeps ~100% of draws, n=2 ~36%, n=3 ~2.4%). Only speed depends on it, never content.
_DRAWS_PER_ROUND = {1: 2, 2: 8, 3: 96}


# --------------------------------------------------------------------------- samples


def sample_stream(seed: int, sample_id: int) -> np.random.Generator:
    """Sample `sample_id`'s own random stream."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(sample_id,))))


def generate_samples(config: DataConfig, sample_ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Draw, filter and solve the samples `sample_ids`.

    Returns the columns (sample_id, params, ic, series float32 (B, 2n, T)) and the number of
    draws it took. Each sample consumes its own stream in order, one draw (2n + 2n² + 2n
    uniforms) at a time, and keeps its first draw that passes the stability filter and stays
    bounded; drawing several per round only batches the work.
    """
    n = config.n_actions
    n_p = ode.num_params(n)
    lo, hi = config.bounds()
    width = lo.size
    per_round = _DRAWS_PER_ROUND.get(n, 96)

    ids = np.asarray(sample_ids, dtype=np.int64)
    streams = [sample_stream(config.seed, int(i)) for i in ids]
    unused = [np.empty((0, width)) for _ in ids]  # drawn but not yet tried, in stream order
    draws = np.zeros(ids.size, dtype=np.int64)
    chosen = np.empty((ids.size, width))

    def next_stable(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's next draw that passes the stability filter."""
        pending = np.asarray(rows)
        while pending.size:
            worst = pending[draws[pending].argmax()]
            if draws[worst] >= MAX_DRAWS_PER_SAMPLE:
                raise ValueError(
                    f"sample {int(ids[worst])} found no stable, bounded draw in "
                    f"{MAX_DRAWS_PER_SAMPLE} tries: the sampling ranges give (almost) only "
                    "unstable or diverging systems; widen or move them")
            uniforms = np.stack([
                np.concatenate([unused[r], streams[r].random((per_round - len(unused[r]), width))])
                for r in pending
            ])
            values = lo + (hi - lo) * uniforms  # (pending, per_round, width)
            stable = ode.is_stable(ode.Params.unpack(values.reshape(-1, width)[:, :n_p], n))
            stable = stable.reshape(pending.size, per_round)
            found = stable.any(axis=1)
            first = stable.argmax(axis=1)
            # Draws up to and including the first stable one are used up; later ones wait.
            draws[pending] += np.where(found, first + 1, per_round)
            for row, r in enumerate(pending):
                unused[r] = uniforms[row, first[row] + 1 :] if found[row] else uniforms[row, :0]
            chosen[pending[found]] = values[found, first[found]]
            pending = pending[~found]
        return chosen[rows, :n_p], chosen[rows, n_p:]

    # A draw that diverges is replaced inside the solver's loop by the row's next stable draw.
    series, ok = ode.solve(*next_stable(np.arange(ids.size)), config.times(), n,
                           rtol=config.rtol, atol=config.atol, refill=next_stable)
    assert ok.all() and np.isfinite(series).all()
    columns = {"sample_id": ids, "params": chosen[:, :n_p], "ic": chosen[:, n_p:],
               "series": series.astype(np.float32)}
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


def row_digests(columns: dict[str, np.ndarray]) -> bytes:
    """16-byte BLAKE2b digest of each row's bytes (sample_id, params, ic, series), concatenated."""
    out = bytearray()
    for i in range(columns["sample_id"].size):
        h = hashlib.blake2b(digest_size=16)
        h.update(columns["sample_id"][i : i + 1].astype("<i8").tobytes())
        h.update(columns["params"][i].astype("<f8").tobytes())
        h.update(columns["ic"][i].astype("<f8").tobytes())
        h.update(columns["series"][i].astype("<f4").tobytes())
        out += h.digest()
    return bytes(out)


def content_hash(digests: bytes) -> str:
    """content_hash of a dataset: SHA-256 over its row digests in sample_id order."""
    return "sha256:" + hashlib.sha256(digests).hexdigest()


def list_column(values: np.ndarray, value_type):
    """One Parquet list column from the rows of `values` (each row flattened)."""
    import pyarrow as pa

    flat = values.reshape(values.shape[0], -1)
    offsets = np.arange(0, flat.size + 1, max(flat.shape[1], 1), dtype=np.int32)[: flat.shape[0] + 1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel(), type=value_type))


def write_table_atomic(table, path: Path) -> None:
    """Write a Parquet file whole or not at all (temporary file, then rename)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    pq.write_table(table, tmp, compression="zstd")  # smaller and faster than snappy here
    os.replace(tmp, path)


def to_table(columns: dict[str, np.ndarray]):
    """The Parquet schema of DESIGN §2: series is row-major (channel, time), float32."""
    import pyarrow as pa

    return pa.table({
        "sample_id": pa.array(columns["sample_id"], type=pa.int64()),
        "params": list_column(columns["params"], pa.float64()),
        "ic": list_column(columns["ic"], pa.float64()),
        "series": list_column(columns["series"], pa.float32()),
    })


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
        digest_path.write_bytes(digests)
        digest_path.with_suffix(".json").write_text(json.dumps({"draws": draws}))
        write_table_atomic(to_table(columns), path)  # last: the Parquet file marks the block done
        out["block"].append(int(block))
        out["draws"].append(draws)
        out["digests"].append(digests)
        out["node"].append(node)
    return {k: np.array(v, dtype=object if k in ("digests", "node") else np.int64) for k, v in out.items()}


# --------------------------------------------------------------------------- the dataset


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest.json: not a raypd dataset (run raypd.generate)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: manifest.json is not valid JSON ({exc})") from None


def check_out_dir(config: DataConfig, out: Path) -> dict | None:
    """The manifest if `out` already holds this dataset; None if `out` is free.

    Raises ValueError (changing nothing) if `out` is a file, or holds something else.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a folder (new, empty, or this dataset)")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MANIFEST).exists():
        raise ValueError(f"--out {out} is a non-empty folder without {MANIFEST}; "
                         "choose a new or empty folder")
    manifest = read_manifest(out)
    if manifest.get("settings") != to_dict(config):
        theirs = manifest.get("settings") or {}
        diff = [k for k in to_dict(config) if theirs.get(k) != to_dict(config)[k]]
        raise ValueError(f"--out {out} already holds a different dataset (differs in: "
                         f"{', '.join(diff) or 'format'}); choose another --out")
    return manifest


def generate(config: DataConfig, out: str | os.PathLike, block_size: int | None = None,
             address: str | None = None, progress: bool = True) -> dict:
    """Generate the dataset `config` into folder `out` (if it is not there yet); return its
    manifest. Joins the Ray cluster at `address`/$RAY_ADDRESS or starts local Ray."""
    config.validate()
    block_size = default_block_size(config.samples) if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    out = Path(out).absolute()
    existing = check_out_dir(config, out)
    if existing is not None:
        return existing

    check_feasible(config)
    import ray

    init_ray(address)
    check_shared(out.parent)
    settings = to_dict(config)
    plan = _block_plan(config.samples, block_size)
    staging = out.with_name(f".{out.name}.staging")
    _prepare_staging(staging, settings, plan)

    start = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, in samples, below
    # The dashboard shows these tasks as MapBatches(generate_block).
    ds = ray.data.range(len(plan), override_num_blocks=len(plan)).map_batches(
        generate_block, batch_size=1, num_cpus=1,
        fn_kwargs={"config": settings, "staging": str(staging), "plan": plan},
    )
    digests: list[bytes | None] = [None] * len(plan)
    draws = 0
    nodes = set()
    bar = _progress_bar(config.samples, f"generate {out.name}", progress)
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


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="samples", disable=not enabled, file=sys.stderr)


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
                   help="samples per Ray Data block and Parquet file (default: samples/4, "
                        f"between 256 and {MAX_BLOCK_SIZE}); the dataset does not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    def body() -> int:
        names = [f.name for f in dataclasses.fields(DataConfig) if f.name not in ("rtol", "atol")]
        config = from_dict(DataConfig, {k: getattr(args, k) for k in names}).validate()
        out = Path(args.out) if args.out else Path("runs") / "data" / config.dataset_name()
        manifest = generate(config, out, block_size=args.block_size, address=args.address,
                            progress=not args.no_progress)
        print(f"{out}: {manifest['samples']} samples, {manifest['content_hash']}")
        return 0

    run_main("raypd.generate", body)


if __name__ == "__main__":
    main()
