"""Reading a generated dataset back, checked against its manifest, and turning it into model
inputs and targets: a deterministic 70/15/15 split by sample_id, inputs normalised per sample
and per group (desires, efforts) by their standard deviation without mean shift, targets
(parameters + initial conditions) standardised with train-split statistics.

A target that is constant in the data (mu with --mu-range 0 0) has no spread to standardise
by and nothing to learn: it is left out of the model's outputs and the loss, and predicted as
that constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypd.config import INPUT_NORMS, DataConfig, TrainConfig, check_split, from_dict, split_rows, split_sizes
from raypd.dataio import MANIFEST, read_manifest


@dataclass
class Dataset:
    """A dataset read into memory, rows in sample_id order."""

    manifest: dict
    sample_id: np.ndarray  # (N,) int64
    params: np.ndarray  # (N, 2n + 2n²) float64
    ic: np.ndarray  # (N, 2n) float64
    series: np.ndarray  # (N, 2n, T) float32

    @property
    def n_actions(self) -> int:
        return int(self.manifest["n_actions"])

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest["param_names"]) + list(self.manifest["ic_names"])

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate([self.params, self.ic], axis=1)


@dataclass
class DatasetFiles:
    """A dataset folder whose manifest has been checked; its Parquet files are read one at a
    time (read_part), so what is held in memory is one file, not the dataset."""

    folder: Path
    manifest: dict
    widths: dict  # values per row of params, ic and series

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    @property
    def series_shape(self) -> tuple[int, int]:
        channels, steps = self.manifest["series_shape"]
        return int(channels), int(steps)

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest["param_names"]) + list(self.manifest["ic_names"])

    @property
    def paths(self) -> list[Path]:
        return [self.folder / entry["path"] for entry in self.manifest["files"]]

    def parts(self, columns=("params", "ic", "series")):
        """(sample_ids, {column: (rows, width) array}) of each file in sample_id order, each
        checked against the manifest (a mismatch is a ValueError naming the file)."""
        next_id = 0
        for entry in self.manifest["files"]:
            ids, values = read_part(self.folder / entry["path"], entry["rows"], next_id,
                                    {name: self.widths[name] for name in columns})
            next_id += ids.size
            yield ids, values
        if next_id != self.samples:
            raise ValueError(f"{self.folder / MANIFEST}: lists {next_id} rows in its files, says "
                             f"samples={self.samples}")


def open_dataset(folder: str | Path) -> DatasetFiles:
    """Check a dataset folder's manifest (not yet its files); a mismatch is a ValueError naming
    the file."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"dataset {folder} is a file; a dataset is a folder (the one that holds {MANIFEST})")
    if not folder.is_dir():
        raise ValueError(f"dataset {folder} does not exist (generate it with raypd.generate)")
    manifest = read_manifest(folder)
    try:
        config = from_dict(DataConfig, manifest["settings"])
        n, (channels, steps) = config.n_actions, manifest["series_shape"]
        int(manifest["samples"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{folder / MANIFEST}: not a raypd manifest ({type(exc).__name__}: {exc})") from None
    n_params, n_ic = 2 * n + 2 * n * n, 2 * n
    if [channels, steps] != [2 * n, config.time_points]:
        raise ValueError(f"{folder / MANIFEST}: series_shape {manifest['series_shape']} does not "
                         f"match n_actions {n} and time_points {config.time_points}")
    check_manifest_keys(manifest, folder / MANIFEST, n_params, n_ic, steps)
    return DatasetFiles(folder, manifest, {"params": n_params, "ic": n_ic, "series": channels * steps})


def read_part(path: Path, rows: int, first_id: int, widths: dict) -> tuple[np.ndarray, dict]:
    """One Parquet file of a dataset: its sample_ids (first_id.. in order, `rows` of them) and
    the columns named in widths as (rows, width) arrays, checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["sample_id", *widths])
    except FileNotFoundError:
        raise ValueError(f"{path}: listed in {MANIFEST} but missing") from None
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable raypd Parquet file ({str(exc).splitlines()[0]})") from None
    for field in table.schema:
        ok = (pa.types.is_integer(field.type) if field.name == "sample_id" else
              pa.types.is_list(field.type) and pa.types.is_floating(field.type.value_type))
        if not ok:
            allowed = "integers" if field.name == "sample_id" else "lists of floating-point numbers"
            raise ValueError(f"{path}: column {field.name} is {field.type}; it must hold {allowed}")
    if table.num_rows != rows:
        raise ValueError(f"{path}: {table.num_rows} rows, {MANIFEST} says {rows}")
    ids = table.column("sample_id").to_numpy()
    if not np.array_equal(ids, np.arange(first_id, first_id + rows)):
        raise ValueError(f"{path}: sample_id is not {first_id}..{first_id + rows - 1} in order")
    columns = {}
    for name, width in widths.items():
        column = table.column(name).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        if values.size != rows * width or (rows and (np.diff(column.offsets.to_numpy()) != width).any()):
            raise ValueError(f"{path}: column {name} must hold {width} values per row")
        values = values.reshape(rows, width)
        if not np.isfinite(values).all():
            raise ValueError(f"{path}: column {name} holds NaN or infinite values")
        columns[name] = values
    return ids.astype(np.int64), columns


def load_dataset(folder: str | Path) -> Dataset:
    """Read and check a whole dataset folder into memory (small datasets: tests, refinement
    benchmarks); any mismatch is a ValueError naming the file. Training and evaluation read
    the files one at a time instead (prepare, split_series)."""
    files = open_dataset(folder)
    parts = list(files.parts())
    channels, steps = files.series_shape

    def joined(name, dtype):
        return np.concatenate([p[1][name] for p in parts]).astype(dtype) if parts else \
            np.zeros((0, files.widths[name]), dtype)

    return Dataset(
        manifest=files.manifest,
        sample_id=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
        params=joined("params", np.float64),
        ic=joined("ic", np.float64),
        series=joined("series", np.float32).reshape(-1, channels, steps),
    )


def check_manifest_keys(manifest: dict, path: Path, n_params: int, n_ic: int, steps: int) -> None:
    """What the stages read from a manifest beyond its settings, with the right types and sizes."""
    def names(key: str, count: int) -> bool:
        value = manifest.get(key)
        return isinstance(value, list) and len(value) == count and all(isinstance(v, str) for v in value)

    files = manifest["files"]
    checks = [
        ("files", isinstance(files, list) and all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and type(e.get("rows")) is int and e["rows"] >= 0
            for e in files), "a list of {path: file name, rows: count}"),
        ("n_actions", manifest.get("n_actions") == n_ic // 2, f"{n_ic // 2}, as in its settings"),
        ("param_names", names("param_names", n_params), f"a list of {n_params} names"),
        ("ic_names", names("ic_names", n_ic), f"a list of {n_ic} names"),
        ("time_points", isinstance(manifest.get("time_points"), list) and len(manifest["time_points"]) == steps
         and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in manifest["time_points"]),
         f"a list of {steps} times"),
        ("content_hash", isinstance(manifest.get("content_hash"), str), "a string"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{path}: {key} must be {allowed} (got {json.dumps(manifest.get(key))[:60]})")


def split_ids(sample_ids: np.ndarray, fractions: tuple[float, float, float], seed: int,
              calibration: float = 0.5) -> dict[str, np.ndarray]:
    """Deterministic train/val/calib/test split by sample_id: a seeded permutation of the ids,
    cut by `fractions` into train, validation and test; the first `calibration` of the
    validation part is the calibration split (the test split does not depend on it)."""
    order = np.random.default_rng(seed).permutation(np.sort(sample_ids))
    n_train, n_val, _ = split_sizes(order.size, fractions)
    n_calib = split_rows(order.size, fractions, calibration)["calib"]
    return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train + n_calib:n_train + n_val]),
            "calib": np.sort(order[n_train:n_train + n_calib]), "test": np.sort(order[n_train + n_val:])}


def normalise_inputs(series: np.ndarray, scales: bool = False):
    """Divide each sample's desires (first n channels) and efforts (last n) by that group's
    standard deviation over channels and time; no mean shift (it carries the steady state).
    A flat group (std 0) is left as it is. With scales=True, also return each channel's
    divisor (N, 2n): what this normalisation throws away."""
    n = series.shape[1] // 2
    out = np.empty_like(series, dtype=np.float32)
    divisors = np.empty(series.shape[:2], dtype=np.float64)
    for group in (slice(0, n), slice(n, 2 * n)):
        std = series[:, group].std(axis=(1, 2), keepdims=True, dtype=np.float64)
        out[:, group] = series[:, group] / np.where(std > 0, std, 1.0)
        divisors[:, group] = std[:, :, 0]
    return (out, divisors) if scales else out


class ChannelSpread:
    """Each channel's standard deviation over samples and time, accumulated a chunk of series
    at a time (Chan et al.'s pairwise update in float64: one pass, no copy of the data)."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    @classmethod
    def of(cls, series: np.ndarray) -> "ChannelSpread":
        spread = cls(series.shape[1])
        spread.add(series)
        return spread

    def add(self, series: np.ndarray) -> None:
        count = series.shape[0] * series.shape[2]
        if count == 0:
            return
        mean = series.mean(axis=(0, 2), dtype=np.float64)
        m2 = ((series - mean[None, :, None]) ** 2).sum(axis=(0, 2))
        delta, total = mean - self.mean, self.count + count
        self.mean += delta * count / total
        self.m2 += m2 + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


# The input normalisation as saved with a model: a plain dict that names its kind and holds
# its parameters (JSON-able, loadable with torch.load(weights_only=True)). Kinds
# (train.input_norm):
#   sample:       each sample's channel groups (desires, efforts) divided by that group's
#                 standard deviation over its channels and time, no mean shift (the notebook's).
#   sample+scale: the same, plus one more input channel per series channel holding
#                 log(1 + the divisor it was normalised by), constant over time: the scale
#                 that `sample` throws away (log1p: a flat group, divisor 0, gives 0).
#   global:       every sample divided by one scale per channel (its standard deviation over
#                 the training split's samples and times), no mean shift: levels are kept.
def fit_input_norm(kind: str, train: np.ndarray | ChannelSpread) -> dict:
    """Input normalisation `kind`, fitted on the training split: its series (N, 2n, T), or
    their ChannelSpread accumulated while reading them."""
    spread = train if isinstance(train, ChannelSpread) else ChannelSpread.of(train)
    n = spread.mean.size // 2
    if kind == "global":
        return {"kind": kind, "scale": [float(v) if v > 0 else 1.0 for v in spread.std], "mean_shift": False}
    assert kind in INPUT_NORMS, kind
    return {"kind": kind, "groups": [list(range(n)), list(range(n, 2 * n))], "mean_shift": False}


def input_channels(norm: dict, channels: int) -> int:
    """Model input channels for series of `channels` channels (sample+scale adds one each)."""
    return 2 * channels if norm["kind"] == "sample+scale" else channels


def apply_input_norm(series: np.ndarray, norm: dict) -> np.ndarray:
    """Raw series (N, 2n, T) -> model inputs (float32), by a saved input normalisation."""
    kind, channels = norm.get("kind"), series.shape[1]
    if kind in ("sample", "sample+scale"):
        groups = [list(range(channels // 2)), list(range(channels // 2, channels))]
        if norm["groups"] != groups:
            raise ValueError(f"input normalisation {kind!r} with groups {norm['groups']} does not fit "
                             f"{channels} channels")
        if kind == "sample":
            return normalise_inputs(series)
        normalised, divisors = normalise_inputs(series, scales=True)
        levels = np.broadcast_to(np.log1p(divisors)[:, :, None], series.shape)
        return np.concatenate([normalised, levels.astype(np.float32)], axis=1)
    if kind == "global":
        scale = np.asarray(norm["scale"], dtype=np.float64)
        if scale.shape != (channels,):
            raise ValueError(f"input normalisation 'global' has {scale.size} channel scales; the series have "
                             f"{channels} channels")
        return (series / scale[None, :, None]).astype(np.float32)
    raise ValueError(f"unknown input normalisation {kind!r} (known: {', '.join(INPUT_NORMS)})")


def targets_to_raw(standardised: np.ndarray, mean: np.ndarray, std: np.ndarray, varying: np.ndarray) -> np.ndarray:
    """(N, k) model outputs for the k varying targets -> (N, n_targets) raw-unit predictions;
    a constant target is predicted as its constant (its mean)."""
    out = np.tile(np.asarray(mean, dtype=np.float64), (standardised.shape[0], 1))
    varying = np.asarray(varying, dtype=bool)
    out[:, varying] = (standardised.astype(np.float64) * np.asarray(std, dtype=np.float64)[varying]
                       + np.asarray(mean, dtype=np.float64)[varying])
    return out


class Relabel:
    """Training augmentation train.relabel: each sample of a batch under a random relabelling
    of its actions (raypd.ode.relabellings), its raw series' channels and its targets
    permuted together. Targets come and go standardised (the model's (B, k)); they are
    relabelled in raw units, as the series are."""

    def __init__(self, data: "Prepared", seed: int):
        from raypd.ode import relabellings

        self.perms = relabellings(data.series_shape[0] // 2)
        self.mean, self.std, self.varying = data.mean, data.std, data.varying
        self.rng = np.random.default_rng(seed)

    def __call__(self, series: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        which = self.rng.integers(len(self.perms), size=len(targets))
        raw = targets_to_raw(targets, self.mean, self.std, self.varying)
        out_series, out_raw = np.empty_like(series), np.empty_like(raw)
        for j, (target_index, channel_index) in enumerate(self.perms):
            rows = which == j
            out_series[rows] = series[rows][:, channel_index]
            out_raw[rows] = raw[rows][:, target_index]
        return out_series, standardise_targets(out_raw, self.mean, self.std, self.varying)


SPLITS = ("train", "val", "calib", "test")  # calib: the intervals' calibration, apart from any choice
TRAINING_SPLITS = ("train", "val")  # what training reads: held in memory, or streamed


@dataclass
class Prepared:
    """What training and evaluation need of a dataset, small enough to hand to every trial:
    the split (sample_ids), raw and standardised targets, the statistics of the training
    split, and, when training holds them in memory, the raw float32 series of the train and
    val splits (one copy, shared by a node's trials through Ray's object store). Otherwise
    the series stay in the dataset's files: raypd.train streams them, split_series reads
    them a file at a time. Inputs are made from raw series a batch at a time (input_norm)."""

    folder: str | None  # the dataset folder (None: prepared from a Dataset in memory)
    files: list[str]  # its Parquet files, in sample_id order
    targets: dict[str, np.ndarray]  # standardised float32 (N, k), the k varying targets
    sample_ids: dict[str, np.ndarray]
    raw_targets: dict[str, np.ndarray]
    series: dict[str, np.ndarray]  # raw float32 (N, 2n, T) of the splits held in memory
    target_names: list[str]
    varying: np.ndarray  # (n_targets,) bool: targets the model predicts
    mean: np.ndarray  # (n_targets,) train mean; the prediction of a constant target
    std: np.ndarray  # (n_targets,) train std (1 where constant)
    input_norm: dict  # how inputs are made from raw series (see apply_input_norm)
    series_shape: tuple[int, int]  # of the raw series (2n, T); inputs may have more channels
    time_points: list[float]  # the dataset's observation times

    @property
    def n_outputs(self) -> int:
        return int(self.varying.sum())

    @property
    def input_channels(self) -> int:
        return input_channels(self.input_norm, self.series_shape[0])

    def held(self, split: str) -> bool:
        """Whether the split's series are in memory (else: in the dataset's files)."""
        return split in self.series

    def inputs(self, split: str) -> np.ndarray:
        """Model inputs of a split held in memory (tests and benchmarks; training makes them a
        batch at a time)."""
        return apply_input_norm(self.series[split], self.input_norm)

    def to_raw(self, standardised: np.ndarray) -> np.ndarray:
        """(N, k) model outputs -> (N, n_targets) raw-unit predictions."""
        return targets_to_raw(standardised, self.mean, self.std, self.varying)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """(N, n_targets) raw targets -> the model's (N, k) float32 training targets."""
        return standardise_targets(raw, self.mean, self.std, self.varying)


def standardise_targets(raw: np.ndarray, mean, std, varying) -> np.ndarray:
    """(N, n_targets) raw targets -> the model's (N, k) float32 targets (targets_to_raw's inverse)."""
    return ((raw - mean) / std)[:, varying].astype(np.float32)


def series_bytes(samples: int, series_shape, train: TrainConfig, split: str) -> int:
    """Bytes of a split's float32 series."""
    rows = split_rows(samples, train.split, train.calibration)[split]
    return rows * int(np.prod(series_shape)) * 4


def prepare(source: "Dataset | str | Path", train: TrainConfig, held=TRAINING_SPLITS) -> Prepared:
    """Split a dataset (a folder, or a Dataset already in memory) and compute the target and
    input statistics of its training split, in one pass over its files, one file at a time;
    keep the series of the `held` splits (float32, nothing else of them)."""
    if isinstance(source, Dataset):
        parts, samples, shape = [(source.sample_id, {"params": source.params, "ic": source.ic,
                                                     "series": source.series.reshape(len(source.series), -1)})], \
            source.sample_id.size, tuple(int(d) for d in source.series.shape[1:])
        manifest, folder, files, held = source.manifest, None, [], SPLITS
    else:
        dataset = open_dataset(source)
        parts, samples, shape = dataset.parts(), dataset.samples, dataset.series_shape
        manifest, folder = dataset.manifest, str(Path(source).absolute())
        files = [str(p.absolute()) for p in dataset.paths]
    check_split(samples, train.split, "the dataset's", train.calibration)
    ids = split_ids(np.arange(samples), train.split, train.split_seed, train.calibration)
    split_of = np.empty(samples, dtype=np.int8)
    for index, name in enumerate(SPLITS):
        split_of[ids[name]] = index
    names = list(manifest["param_names"]) + list(manifest["ic_names"])
    raw = np.empty((samples, len(names)))
    series = {name: np.empty((ids[name].size, *shape), dtype=np.float32) for name in held}
    spread = ChannelSpread(shape[0])
    for part_ids, columns in parts:
        assert part_ids.size == 0 or part_ids[-1] < samples, "sample_ids are 0..samples-1"
        raw[part_ids] = np.concatenate([columns["params"], columns["ic"]], axis=1)
        values = columns["series"].reshape(-1, *shape)
        where = split_of[part_ids]
        if train.input_norm == "global":
            spread.add(values[where == 0])
        for name in held:
            rows = where == SPLITS.index(name)
            series[name][np.searchsorted(ids[name], part_ids[rows])] = values[rows]
    if folder is not None:
        import pyarrow as pa

        # Arrow's allocator keeps what the reads freed (~1.5 KB a sample) for reuse: give it back
        pa.default_memory_pool().release_unused()
    train_raw = raw[ids["train"]]
    mean, std = train_raw.mean(axis=0), train_raw.std(axis=0)
    varying = std > 1e-12 * np.maximum(1.0, np.abs(mean))
    std = np.where(varying, std, 1.0)
    out = Prepared(
        folder=folder, files=files, targets={}, sample_ids=ids,
        raw_targets={name: raw[ids[name]] for name in SPLITS}, series=series, target_names=names,
        varying=varying, mean=mean, std=std, input_norm=fit_input_norm(train.input_norm, spread),
        series_shape=shape, time_points=[float(t) for t in manifest["time_points"]])
    out.targets = {name: out.standardise(out.raw_targets[name]) for name in SPLITS}
    return out


def split_series(data: Prepared, split: str, limit: int | None = None):
    """(sample_ids, raw targets, raw float32 series (rows, 2n, T)) of a split in chunks (a
    file's rows at a time when the series are not in memory), in sample_id order: memory
    holds one file, whatever the size of the dataset. limit: the split's first `limit` rows."""
    wanted = data.sample_ids[split][:limit]
    if split in data.series:
        for start in range(0, wanted.size, 4096):
            rows = slice(start, min(start + 4096, wanted.size))
            yield wanted[rows], data.raw_targets[split][rows], data.series[split][rows]
        return
    assert data.folder is not None, "a Prepared without its folder holds every split"
    dataset = open_dataset(data.folder)
    done = 0
    for part_ids, columns in dataset.parts(columns=("series",)):
        if done == wanted.size:
            break
        rows = np.isin(part_ids, wanted, assume_unique=True)
        if rows.any():
            positions = np.arange(done, done + int(rows.sum()))
            done += positions.size
            yield wanted[positions], data.raw_targets[split][positions], \
                columns["series"][rows].reshape(-1, *data.series_shape)


class SplitRows:
    """Ray Data's map over the dataset's files: a file's rows of one split as raw float32
    series ("series", (rows, 2n, T)) and standardised targets ("y"), STREAM_READ_ROWS rows of
    the file at a time (a block each). A reader holds a slice of a file, not the file and its
    copies (a 7,143-sample file read whole: +250 MB in the reader; in slices of 1,024: +40
    MB, as fast), and the series travel raw (sample+scale inputs have twice their channels):
    the trial makes inputs a chunk at a time (raypd.train.stream_batches), as it does from
    series held in memory. It holds what it needs of a Prepared (the split's membership and
    the target statistics), not its targets or series."""

    def __init__(self, data: Prepared, split: str):
        self.member = np.zeros(sum(ids.size for ids in data.sample_ids.values()), dtype=bool)
        self.member[data.sample_ids[split]] = True
        self.shape, self.read_rows = data.series_shape, STREAM_READ_ROWS
        self.mean, self.std, self.varying = data.mean, data.std, data.varying

    def __call__(self, batch: dict):
        import pyarrow.parquet as pq

        (path,) = batch["path"]
        columns = ["sample_id", "params", "ic", "series"]
        for table in pq.ParquetFile(path).iter_batches(batch_size=self.read_rows, columns=columns):
            rows = self.member[table.column("sample_id").to_numpy()]
            if not rows.any():
                continue
            params, ic, series = (list_values(table.column(name))[rows] for name in ("params", "ic", "series"))
            yield {"series": series.astype(np.float32, copy=False).reshape(-1, *self.shape),
                   "y": standardise_targets(np.concatenate([params, ic], axis=1), self.mean, self.std, self.varying)}


def list_values(column) -> np.ndarray:
    """An Arrow list column whose rows have one length as a (rows, length) array (a view where
    Arrow allows; the files were checked by prepare's pass, read_part)."""
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def stream_split(data: Prepared, split: str, shuffle_seed: int | None = None):
    """A split of the dataset's Parquet files as a Ray Dataset of raw series and standardised
    targets (SplitRows), read afresh at each iteration: blocks of up to STREAM_READ_ROWS rows
    of a file, STREAM_READS files read at a time. shuffle_seed: the files come in another
    order at every iteration (an epoch), deterministic given the seed.

    Not ray.data.read_parquet: in Ray 2.60 it coalesces the files into a few blocks of up to
    128 MiB (three for 100,000 n=2 samples: nothing left for a file shuffle to move), and its
    conversion step runs as a separate operator whose tasks start a worker process each.
    The tasks ask for no CPU: a study's trials may hold every CPU of the cluster, and a read
    that waited for one would wait for ever (Ray Data schedules its tasks outside the Tune
    trial's placement group). Reading is a small part of a step's work."""
    import ray.data
    from ray.data import RandomSeedConfig

    assert data.folder is not None, "streaming reads the dataset's files"
    files = ray.data.from_items([{"path": path} for path in data.files], override_num_blocks=len(data.files))
    if shuffle_seed is not None:
        files = files.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    stream = files.map_batches(SplitRows(data, split), batch_size=1, num_cpus=0,
                               compute=ray.data.TaskPoolStrategy(size=STREAM_READS))
    stream.context.execution_options = stream_options()
    # no progress bars of Ray Data's own in the command's output: the coordinator would
    # forward one to the driver's log every epoch (~30 KB of terminal codes an epoch), beside
    # raypd.train's progress and Tune's table (the Ray dashboard still shows the stream)
    stream.context.enable_progress_bars = False
    return stream


# files a stream reads at a time: one reader (~50,000 rows a second on this machine's CPU)
# outruns a trial's training (~4,000 rows a second here, ~14,000 on an H200), and each more
# is a worker process of ~0.3 GB
STREAM_READS = 1
STREAM_READ_ROWS = 1024  # rows of a file a reader decodes at a time (SplitRows)
# object store bytes a stream's blocks may take (left alone, Ray Data reads ahead into up to
# half of the object store: 3 GB on this 24 GB machine, for data a trial eats at ~15 MB/s)
STREAM_STORE_BYTES = 256 * 2**20


def stream_options():
    """Ray Data's execution options for a training stream: Ray Train's for data ingest, with
    the stream's object store use bounded (STREAM_STORE_BYTES) and its files delivered in the
    shuffled order, not as their reads finish: with the seeded local shuffle (stream_batches)
    a single-process run is then the same run every time (a worker group's workers still take
    blocks as they ask for them)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.resource_limits = options.resource_limits.copy(object_store_memory=STREAM_STORE_BYTES)
    options.preserve_order = True
    return options
