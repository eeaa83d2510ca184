"""One writer per study, dataset and training folder, also across the nodes that share ROOT.

A lock is a file that appears whole: its holder writes who it is into a file of its own and
hard-links that file to the lock's name, which succeeds for exactly one process, on local
file systems and on NFS v3 and later, EFS included (a file system without hard links falls
back to O_CREAT | O_EXCL). It holds the holder's identity (host, boot id, pid namespace, pid,
the process's start time), when and what it runs, and a token of this holding; the holder
touches it every HEARTBEAT_SECONDS and checks every CHECK_SECONDS that it is still its own.

A lock whose holder died blocks nobody. On the same host and boot, in the same pid namespace,
the holder is dead when its pid is gone or now belongs to a process that started at another
time (a pid reused, after a container restart for instance). Anywhere else (another host,
another boot, a container that shares the hostname but not the pid namespace) it is dead
once its lock has not been touched for STALE_SECONDS (the nodes' clocks must agree to within
a few seconds: NTP).

A stale lock is taken over by renaming it to a name of this process's own (a rename moves a
given file for one process only) and then checking that what was moved is the holding judged
stale: if another process took the lock over and wrote its own meanwhile, that lock is put
back where it was and this process looks again. A holder that finds the lock is not its own
any more (taken over after a pause longer than STALE_SECONDS, or removed) stops its work:
`hold` ends with a ValueError naming who holds it now. fcntl/flock locks are not used: they
need lockd on NFS v3, and a flock on NFS is local to one node on some kernels.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from raypd.cli import redact

HEARTBEAT_SECONDS = 10.0
CHECK_SECONDS = 1.0
STALE_SECONDS = 60.0


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (Linux /proc), or None."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: count after its last ")"
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict:
    """Who a process is, beyond its pid: host, boot, pid namespace and start time."""
    pid = os.getpid() if pid is None else pid
    ns = None
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        pass
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": ns, "pid": pid, "started": _start_time(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _same_process_space(holder: dict, me: dict) -> bool:
    """Whether this process can see the holder's pid: same host, same boot, same pid namespace."""
    return (holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"] is not None
            and holder.get("pid_ns") == me["pid_ns"] is not None)


def _stale(holder: dict, path: Path, me: dict) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: look again
    pid = holder.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and _same_process_space(holder, me):
        if not _alive(pid):
            return True
        started = _start_time(pid)
        return started is not None and holder.get("started") is not None and started != holder["started"]
    if isinstance(pid, int) and holder.get("host") == me["host"] and "boot_id" not in holder:
        return not _alive(pid)  # a lock of an earlier raypd (host and pid only)
    return age > STALE_SECONDS


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # damaged (a lock of an earlier raypd could be empty)
        return {}
    return holder if isinstance(holder, dict) else {}


def _publish(path: Path, content: str, token: str) -> bool:
    """Create the lock file `path` holding `content`, whole: False if it exists."""
    draft = path.with_name(f"{path.name}.{token}.new")
    try:
        with open(draft, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(draft, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
        # no hard links here: O_EXCL, then the content (a lock that stays empty is stale after STALE_SECONDS)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        draft.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict, token: str) -> None:
    """Remove the lock at `path` if it is still the holding `stale` (judged stale); put back
    any other lock found there instead."""
    away = path.with_name(f"{path.name}.{token}.away")
    try:
        os.rename(path, away)
    except FileNotFoundError:  # another process took it over first
        return
    moved = _read(away)
    if moved == stale:
        away.unlink(missing_ok=True)
        return
    try:  # a lock written meanwhile: back where it was, unless yet another one is there now
        os.link(away, path)
    except FileExistsError:
        pass
    away.unlink(missing_ok=True)


class LockLost(Exception):
    pass


@contextmanager
def hold(path: str | os.PathLike, what: str):
    """Hold the lock file `path` (its folder must exist) while the block runs; if another
    living process holds it, a ValueError naming the holder. `what` names the locked thing
    in that message (e.g. "study smoke in runs/tune/smoke"). If the lock stops being this
    holding's while the block runs, the block is interrupted (in the main thread, as by
    Ctrl-C) and hold ends with a ValueError saying so."""
    path = Path(path)
    me = identity()
    token = uuid.uuid4().hex
    mine = {**me, "token": token, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": redact(" ".join(sys.argv))[:300]}
    content = json.dumps(mine)
    for _ in range(50):
        holder = _read(path)  # looked at first: a process that is refused writes nothing at all
        if holder is None:
            if _publish(path, content, token):
                break
            continue  # taken meanwhile: look at who holds it
        if _stale(holder, path, me):
            _take_over(path, holder, token)
            continue
        who = (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('since', '?')}"
               if holder else "an unreadable lock")
        raise ValueError(f"{what} is in use by {who} ({holder.get('command', '') or 'raypd'}); wait for it to "
                         f"end or stop it (the lock {path} goes with it)")
    else:
        raise ValueError(f"{what}: could not take the lock {path} (it keeps changing hands)")

    stop, lost = threading.Event(), threading.Event()
    main = threading.current_thread() is threading.main_thread()

    def heartbeat():
        touched = time.monotonic()
        while not stop.wait(CHECK_SECONDS):
            if _read(path) != mine:  # taken over (a pause longer than STALE_SECONDS) or removed
                lost.set()
                if main:  # the work stops as on Ctrl-C (a study: Tune stops its trials, saves its state)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
            if time.monotonic() - touched >= HEARTBEAT_SECONDS:
                try:
                    os.utime(path)
                    touched = time.monotonic()
                except OSError:
                    pass

    beat = threading.Thread(target=heartbeat, name="raypd-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
        if lost.is_set():
            raise LockLost
    except (KeyboardInterrupt, LockLost):
        if not lost.is_set():
            raise
        now = _read(path) or {}
        who = f"{now.get('host', '?')} pid {now.get('pid', '?')}" if now else "nobody (it was removed)"
        raise ValueError(f"{what}: this process lost its lock {path} (held now by {who}); it stopped its "
                         "work: run the same command again once the other has ended") from None
    finally:
        stop.set()
        beat.join()
        if _read(path) == mine:
            path.unlink(missing_ok=True)
