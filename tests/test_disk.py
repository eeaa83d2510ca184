"""A full disk, for real (a small tmpfs, mounted by the test; skipped where mounting is not
allowed): generation that cannot fit is refused before it starts; a disk that fills while
generate or train writes ends with exit 2 and one line naming the path, nothing
half-published, and the same command continues once there is space."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypd.train import read_state
from tests.conftest import REPO, run_cli


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB at tmp_path/disk; size it with remount(size)."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def remount(size: str) -> Path:
        options = f"size={size}" if not os.path.ismount(disk) else f"remount,size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            reason = f"this machine does not let the tests mount a tmpfs: {done.stderr.strip()}"
            if os.environ.get("RAYPD_REQUIRE_TMPFS") == "1":  # CI: a full disk must be tested there
                pytest.fail(reason + "; RAYPD_REQUIRE_TMPFS=1 makes that a failure")
            pytest.skip(reason)
        return disk

    yield remount
    if os.path.ismount(disk):
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """A file that takes every free byte of `disk`."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def start(args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fill_when(ready, proc: subprocess.Popen, disk: Path) -> Path:
    """Fill `disk` as soon as ready() holds, while `proc` still runs."""
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    return fill(disk)


def finish(proc: subprocess.Popen) -> str:
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return stderr


def ours(stderr: str, prog: str) -> str:
    """raypd's line (Ray's forwarded worker logs may follow it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_generate_on_a_disk_too_small_is_refused_before_it_starts(small_disk):
    disk = small_disk("6m")
    result = run_cli("raypd.generate", "--samples", "10000", "--out", str(disk / "D"), "--no-progress")
    assert result.returncode == 2, result.stderr[-2000:]
    line = ours(result.stderr, "raypd.generate")
    assert f"--out {disk / 'D'}: the dataset needs about " in line and "6.0 MiB free" in line
    assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_a_disk_that_fills_while_generating_then_frees_up(small_disk):
    disk = small_disk("200m")
    args = ["raypd.generate", "--samples", "200000", "--block-size", "2000", "--out", str(disk / "D"),
            "--no-progress"]
    proc = start(args)
    staging = disk / ".D.staging"
    filler = fill_when(lambda: len(list(staging.glob("part-*.parquet"))) >= 2, proc, disk)
    stderr = finish(proc)
    assert proc.returncode == 2, stderr[-3000:]
    line = ours(stderr, "raypd.generate")
    assert f"cannot write {disk}" in line and "no space left on its device" in line
    assert "run the same command again to continue" in line
    assert not (disk / "D").exists()  # nothing half-published
    kept = {p.name for p in staging.glob("part-*.parquet")}
    assert len(kept) >= 2 and not list(staging.glob(".tmp-*"))

    filler.unlink()
    result = run_cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((disk / "D" / "_manifest.json").read_text())
    assert manifest["samples"] == 200000 and kept <= {f["path"] for f in manifest["files"]}


@pytest.mark.slow
def test_a_disk_that_fills_while_training_keeps_the_last_checkpoint(small_disk, smoke_data):
    disk = small_disk("3m")
    args = ["raypd.train", "--config", str(REPO / "tune_configs" / "base.yaml"), "--data", str(smoke_data),
            "--out", str(disk / "run"), "--set", "train.epochs=200", "--set", "train.patience=200",
            "--set", "train.num_workers=0", "--set", "model.filters=[8]", "--set", "model.hidden=[8]"]
    proc = start(args)
    last = disk / "run" / "checkpoints" / "last"

    def epochs() -> int:
        try:
            return read_state(last)["epoch"]
        except ValueError:
            return 0

    filler = fill_when(lambda: epochs() >= 3, proc, disk)
    stderr = finish(proc)
    assert proc.returncode == 2, stderr[-3000:]
    line = ours(stderr, "raypd.train")
    assert f"cannot write {disk / 'run' / 'checkpoints'}" in line and "no space left on its device" in line
    stopped = read_state(last)  # the last good checkpoint is whole
    assert stopped["epoch"] >= 3 and not (disk / "run" / "metrics.json").exists()

    filler.unlink()
    result = run_cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    done = read_state(last)
    assert done["epoch"] == 200 and done["history"][: stopped["epoch"]] == stopped["history"]
