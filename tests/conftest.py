import os
import socket
import subprocess
import sys
from pathlib import Path

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
    copy it under their own ROOT (raypd.train.dataset_dir)."""
    from raypd.config import load_config
    from raypd.train import dataset_dir

    smoke = load_config(str(REPO / "tune_configs" / "smoke.yaml"))
    out = dataset_dir(smoke, tmp_path_factory.mktemp("data"))
    result = run_cli("raypd.generate", "--samples", "600", "--mu-range", "0", "0", "--time-span", "0", "100",
                     "--time-points", "101", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    return out
