"""One writer per study, dataset and training folder (raypd.lock): a second process is refused
at once with one line naming the holder; a holder that died blocks nobody; the same study
started twice at once runs once."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.lock import STALE_SECONDS, hold
from raypd.config import dataset_dir
from tests.conftest import REPO, run_cli

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")

HOLD = "from raypd.lock import hold; import sys, time\nwith hold(sys.argv[1], 'the thing'):\n    print('held', flush=True); time.sleep(60)\n"


def test_a_second_holder_is_refused_with_the_holder_named_and_a_dead_one_blocks_nobody(tmp_path):
    lock = tmp_path / ".raypd.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError) as refused:
            with hold(lock, "study x in /r/tune/x"):
                pass
        message = str(refused.value)
        assert message.startswith("study x in /r/tune/x is in use by ")
        assert f"{socket.gethostname()} pid {holder.pid} since " in message
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # killed: it could not clean up; its pid is gone now
    with hold(lock, "study x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released


def test_a_lock_of_another_host_is_stale_only_once_its_heartbeat_stopped(tmp_path):
    lock = tmp_path / ".raypd.lock"
    lock.write_text(json.dumps({"host": "node-7", "pid": 1, "since": "then", "command": "raypd.tune"}))
    with pytest.raises(ValueError, match="in use by node-7 pid 1 since then"):
        with hold(lock, "dataset d"):
            pass
    old = time.time() - STALE_SECONDS - 5  # node-7 stopped touching it a minute ago
    os.utime(lock, (old, old))
    with hold(lock, "dataset d"):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


@pytest.mark.slow
def test_the_same_study_started_twice_at_once_runs_once(smoke_data, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_data, dataset_dir(load_config(SMOKE), root))
    args = [sys.executable, "-m", "raypd.tune", "--study", "smoke", "--root", str(root)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (root / "tune" / "smoke" / ".raypd.lock").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = run_cli("raypd.tune", "--study", "smoke", "--root", str(root), timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert first.poll() is None  # at once: while the first still runs, not after it finished
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"raypd.tune: error: study smoke in {root / 'tune' / 'smoke'} is in use by "
                               f"{socket.gethostname()} pid {first.pid} since ")
        _, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    assert summary["num_trials"] == 4
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raypd-smoke").experiment_id])
    assert len(runs) == 4 and len(client.search_model_versions("name = 'raypd-smoke'")) == 1
    assert not (root / "tune" / "smoke" / ".raypd.lock").exists()


def live_holding(**changes) -> dict:
    """A lock's content as a holder on this host writes it (raypd.lock.identity), changed."""
    from raypd.lock import identity

    return {**identity(), "token": "t", "since": "then", "command": "raypd.tune", **changes}


def test_a_takeover_moves_only_the_stale_holding_it_judged(tmp_path):
    """B judges the lock stale; before B acts, A takes it over and writes its own: B must put
    A's lock back, not run beside it (injected by calling the steps in that order)."""
    from raypd.lock import _read, _stale, _take_over, identity

    lock = tmp_path / ".raypd.lock"
    dead = live_holding(pid=2**22 + 7, started=1)  # no such pid: dead
    lock.write_text(json.dumps(dead))
    assert _stale(_read(lock), lock, identity())  # B's judgement
    a_holding = live_holding(token="a")  # A, meanwhile: takes over and writes its own
    lock.unlink()
    lock.write_text(json.dumps(a_holding))
    _take_over(lock, dead, "b")  # B goes on with what it judged
    assert _read(lock) == a_holding and not list(tmp_path.glob("*.away"))
    with pytest.raises(ValueError, match="in use by"):  # and A's live lock refuses B
        with hold(lock, "study x"):
            pass


def test_a_reused_pid_or_the_callers_own_pid_does_not_keep_a_dead_holders_lock(tmp_path):
    lock = tmp_path / ".raypd.lock"
    me = live_holding()
    # a container restart gives the same small pids: the pid lives, but it started at another time
    lock.write_text(json.dumps({**me, "started": me["started"] - 1}))
    with hold(lock, "study x"):
        assert json.loads(lock.read_text())["token"] != "t"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps(live_holding(pid=sleeper.pid, started=1)))  # an unrelated process's pid
        with hold(lock, "study x"):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_holder_in_another_pid_namespace_is_stale_only_by_its_heartbeat(tmp_path):
    """Containers that share a hostname but not a pid namespace: its pid says nothing here."""
    lock = tmp_path / ".raypd.lock"
    lock.write_text(json.dumps(live_holding(pid=2**22 + 7, pid_ns="pid:[1]")))
    with pytest.raises(ValueError, match="in use by"):
        with hold(lock, "dataset d"):
            pass
    old = time.time() - STALE_SECONDS - 5
    os.utime(lock, (old, old))
    with hold(lock, "dataset d"):
        pass


def test_a_lock_whose_write_fails_is_never_left_behind(tmp_path, monkeypatch):
    """The lock appears whole or not at all: a full disk while its holder is written leaves
    nothing that would refuse the re-run the full-disk message recommends."""
    import errno

    lock = tmp_path / ".raypd.lock"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        with hold(lock, "study x"):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    with hold(lock, "study x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


LOSE = """
import json, sys, time
from pathlib import Path
from raypd.lock import hold
lock = Path(sys.argv[1])
try:
    with hold(lock, 'study x'):
        print('held', flush=True)
        time.sleep(30)
    print('finished')
except ValueError as exc:
    print(exc)
"""


def test_a_holder_that_lost_its_lock_stops_its_work(tmp_path):
    lock = tmp_path / ".raypd.lock"
    proc = subprocess.Popen([sys.executable, "-c", LOSE, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        other = live_holding(host="node-7", token="other")  # taken over while it paused
        lock.unlink()
        lock.write_text(json.dumps(other))
        out, _ = proc.communicate(timeout=20)  # not after its 30 s of work
    finally:
        proc.kill()
    assert "study x: this process lost its lock" in out and "held now by node-7" in out, out
    assert json.loads(lock.read_text()) == other  # and it left the new holder's lock alone
