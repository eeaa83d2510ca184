"""One writer per study, dataset and training folder, also across the nodes that share ROOT.

A lock is a file created with O_CREAT | O_EXCL, which is atomic on local file systems and on
NFS v3 and later, EFS included (NFS v4.1): of two processes, on one node or on two, exactly one
creates it. It holds who holds it (host, pid, since when, the command) and the holder touches
it every HEARTBEAT_SECONDS. A lock left by a holder that died blocks nobody: on the same host a
holder whose pid is gone is dead; on another host, one whose lock has not been touched for
STALE_SECONDS is (the nodes' clocks must agree to within a few seconds: NTP). A stale lock is
taken over by renaming it away first (a rename succeeds for one process only), so two
processes that both find it stale cannot both take it. fcntl/flock locks are not used: they
need lockd on NFS v3, and a flock on NFS is local to one node on some kernels.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(holder: dict, path: Path) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: try again
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"])
    return age > STALE_SECONDS


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written this instant, or damaged
        return {}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def hold(path: str | os.PathLike, what: str):
    """Hold the lock file `path` (its folder must exist) while the block runs; if another
    living process holds it, a ValueError naming the holder. `what` names the locked thing
    in that message (e.g. "study smoke in runs/tune/smoke")."""
    path = Path(path)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}
    for attempt in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile
            if holder == {} and attempt < 10:  # a holder writing its name: look again
                time.sleep(0.1)
                continue
            if _stale(holder, path):
                away = path.with_name(f"{path.name}.stale-{me['host']}-{me['pid']}")
                try:
                    os.rename(path, away)
                    away.unlink()
                except FileNotFoundError:  # another process took it over first
                    pass
                continue
            who = (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('since', '?')}"
                   if holder else "an unreadable lock")
            raise ValueError(f"{what} is in use by {who} ({holder.get('command', '') or 'raypd'}); wait for it to "
                             f"end or stop it (the lock {path} goes with it)") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise ValueError(f"{what}: could not take the lock {path} (it keeps changing hands)")

    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(path)
            except OSError:
                pass

    beat = threading.Thread(target=heartbeat, name="raypd-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _read(path) == me:
            path.unlink(missing_ok=True)
