import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module, shut down by the module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a process the test started in its own session: SIGTERM to its group, SIGKILL if it
    lingers (never anything by name)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run `python -m ...` as a user would; never joins a cluster outside this test."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict:
    """Every file under root with its size and mtime: 'nothing on disk changed' is equality."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (each held until all are chosen: picked one at a
    time, two could come out the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """The smoke study's dataset, generated once per module by the command a user runs; tests
    copy it under their own ROOT (raypd.config.dataset_dir)."""
    from raypd.config import load_config
    from raypd.config import dataset_dir

    smoke = load_config(str(REPO / "tune_configs" / "smoke.yaml"))
    out = dataset_dir(smoke, tmp_path_factory.mktemp("data"))
    result = run_cli("raypd.generate", "--samples", "600", "--mu-range", "0", "0", "--time-span", "0", "100",
                     "--time-points", "101", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    return out


# --------------------------------------------------------------------------- shared by the tests' modules

TIMES = np.linspace(0.0, 200.0, 201)  # the science tests' time grid


def stable_draws(n, count, seed=0, mu_range=(-10.0, 0.0)):
    """`count` draws from the default ranges that pass raypd's filter and stay bounded."""
    from raypd import ode
    from raypd.config import DataConfig

    cfg = DataConfig(n_actions=n, mu_range=mu_range)
    lo, hi = cfg.bounds()
    rng = np.random.default_rng(seed)
    draws = lo + (hi - lo) * rng.random((count * 80, lo.size))
    n_p = ode.num_params(n)
    keep = draws[ode.is_stable(ode.Params.unpack(draws[:, :n_p], n))][: count * 2]
    series, ok = ode.solve(keep[:, :n_p], keep[:, n_p:], TIMES, n, cfg.rtol, cfg.atol)
    assert ok.sum() >= count
    return keep[ok][:count, :n_p], keep[ok][:count, n_p:], series[ok][:count]


MANIFEST_DAMAGE = {  # the manifest as a hand edit or another tool might leave it
    "entry without rows": lambda m: {**m, "files": [{"path": m["files"][0]["path"]}, *m["files"][1:]]},
    "files not a list": lambda m: {**m, "files": {"part-0.parquet": 1}},
    "no content_hash": lambda m: {k: v for k, v in m.items() if k != "content_hash"},
    "no param_names": lambda m: {k: v for k, v in m.items() if k != "param_names"},
    "time_points cut short": lambda m: {**m, "time_points": m["time_points"][:3]},
    "manifest a list": lambda m: [m],
}
COLUMN_DAMAGE = {  # a part file rewritten with other column types
    "params as plain numbers": lambda t: ("params", pa.array(np.zeros(t.num_rows))),
    "series as strings": lambda t: ("series", pa.array([["1"]] * t.num_rows)),
}


def corrupt(dataset_dir, tmp_path, how):
    """A copy of a dataset folder damaged as `how` says: (the copy, its first part file)."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from raypd.dataio import MANIFEST

    bad = tmp_path / "bad"
    shutil.copytree(dataset_dir, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    first = bad / manifest["files"][0]["path"]
    if how == "no manifest":
        (bad / MANIFEST).unlink()
    elif how == "truncated":
        first.write_bytes(first.read_bytes()[:200])
    elif how == "missing file":
        first.unlink()
    elif how == "foreign parquet":
        pq.write_table(pa.table({"x": [1, 2, 3]}), first)
    elif how == "row count":
        manifest["files"][0]["rows"] += 1
        (bad / MANIFEST).write_text(json.dumps(manifest))
    elif how == "shape":
        manifest["settings"]["time_points"] = 34
        (bad / MANIFEST).write_text(json.dumps(manifest))
    elif how == "nan":
        table = pq.read_table(first)
        series = table.column("series").combine_chunks()
        values = series.flatten().to_numpy().copy()
        values[5] = np.nan
        fixed = pa.ListArray.from_arrays(series.offsets, pa.array(values, pa.float32()))
        pq.write_table(table.set_column(3, "series", fixed), first)
    elif how == "manifest not json":
        (bad / MANIFEST).write_text("{oops")
    elif how in MANIFEST_DAMAGE:
        (bad / MANIFEST).write_text(json.dumps(MANIFEST_DAMAGE[how](manifest)))
    elif how in COLUMN_DAMAGE:
        table = pq.read_table(first)
        name, column = COLUMN_DAMAGE[how](table)
        pq.write_table(table.set_column(table.schema.get_field_index(name), name, column), first)
    return bad, first
