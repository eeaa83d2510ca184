"""Dataset folders on disk: the manifest's name, the Parquet row schema, list columns,
whole-or-nothing writes and the content hash. raypd.generate writes through this module,
raypd.dataset reads back through it, train and predict write their Parquet files with it.

A dataset folder holds part-*.parquet files and _manifest.json. The leading underscore makes
Arrow's dataset discovery skip the manifest (as it skips Spark's _SUCCESS), so the folder
opens as a table with `pandas.read_parquet(DIR)`, `pyarrow.dataset.dataset(DIR)` and
`ray.data.read_parquet(DIR)`. Folders written before that name was chosen hold
manifest.json; they are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # earlier datasets: pandas and pyarrow trip over it


def manifest_path(folder: str | os.PathLike) -> Path | None:
    """The folder's manifest file (the current name first, then the legacy one), or None."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def read_manifest(folder: str | os.PathLike) -> dict:
    path = manifest_path(folder)
    if path is None:
        raise ValueError(f"{Path(folder) / MANIFEST}: no {MANIFEST}: not a raypd dataset (run raypd.generate)")
    return read_json(path)


def write_json(path: Path, payload: dict) -> None:
    """A JSON object written whole or not at all (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def read_json(path: Path, hint: str = "") -> dict:
    """A JSON object from `path`; missing, unreadable or not an object is a ValueError naming
    the file (hint: what to do about it)."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}){hint}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object (got {type(value).__name__}){hint}")
    return value


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, as "sha256:<hex>"."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def row_digests(columns: dict[str, np.ndarray]) -> bytes:
    """16-byte BLAKE2b digest of each row's bytes (sample_id <i8, params <f8, ic <f8,
    series <f4, in that order), concatenated."""
    count = columns["sample_id"].size
    if count == 0:
        return b""
    parts = [np.ascontiguousarray(columns["sample_id"], dtype="<i8").reshape(count, -1),
             np.ascontiguousarray(columns["params"], dtype="<f8").reshape(count, -1),
             np.ascontiguousarray(columns["ic"], dtype="<f8").reshape(count, -1),
             np.ascontiguousarray(columns["series"], dtype="<f4").reshape(count, -1)]
    rows = np.concatenate([p.view(np.uint8) for p in parts], axis=1)
    width = rows.shape[1]
    flat = memoryview(rows.reshape(-1))
    return b"".join(hashlib.blake2b(flat[i * width : (i + 1) * width], digest_size=16).digest()
                    for i in range(count))


def content_hash(digests: bytes) -> str:
    """content_hash of a dataset: SHA-256 over its row digests in sample_id order."""
    return "sha256:" + hashlib.sha256(digests).hexdigest()


def list_column(values: np.ndarray, value_type):
    """One Parquet list column from the rows of `values` (each row flattened)."""
    import pyarrow as pa

    flat = values.reshape(values.shape[0], -1)
    offsets = np.arange(0, flat.size + 1, max(flat.shape[1], 1), dtype=np.int32)[: flat.shape[0] + 1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel(), type=value_type))


@contextmanager
def naming(path):
    """An OSError while writing `path` names it: a failed write() or close() (a full disk)
    does not, and pyarrow's never does. raypd.cli turns a full disk into one line with it."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise


@contextmanager
def atomic_file(path):
    """Write `path` whole or not at all, the one way raypd replaces a file: the block writes
    the temporary path this yields (beside `path`, this writer's own); when the block ends it
    is renamed over `path` (when the block wrote nothing, nothing is), and when it raises (a
    full disk, Ctrl-C, bad input) it is removed. An OSError names `path` (naming)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        with naming(path):
            yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if tmp.exists():
        os.replace(tmp, path)


def write_table_atomic(table, path: Path) -> None:
    """Write a Parquet file whole or not at all."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")  # smaller and faster than snappy here


def write_tables_atomic(tables, path: Path) -> None:
    """Write Parquet tables of one schema (an iterable: one in memory at a time) as one file,
    whole or not at all; no table leaves no file."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        writer = None
        try:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
        except BaseException:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            raise
        if writer is not None:
            writer.close()


def to_table(columns: dict[str, np.ndarray]):
    """The Parquet schema of docs/contracts.md §2: series is row-major (channel, time), float32."""
    import pyarrow as pa

    return pa.table({
        "sample_id": pa.array(columns["sample_id"], type=pa.int64()),
        "params": list_column(columns["params"], pa.float64()),
        "ic": list_column(columns["ic"], pa.float64()),
        "series": list_column(columns["series"], pa.float32()),
    })
