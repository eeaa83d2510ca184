"""What every stage's command line shares: one-line errors with exit code 2, and joining or
starting Ray."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage plus error, and
    every negative number (-1e3, -inf as well as -3, -0.5) is a value, not a flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, body: Callable[[], int | None]) -> None:
    """Run a stage's main body; a user error (ValueError) ends as one line and exit code 2.
    Ctrl-C (SIGINT) and SIGTERM stop it cleanly: one line saying how to continue, exit 130
    (SIGINT) or 143 (SIGTERM), the shells' 128 + the signal's number.
    SIGTERM is turned into SIGINT, so that it stops a study the way Ctrl-C does (Tune's own
    handler saves the experiment's state one last time)."""
    global _prog
    _prog = prog
    stop_on_sigterm()
    quiet_libraries()
    try:
        code = body()
    except ValueError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        last_line(f"{prog}: error: {message}")
        sys.exit(2)
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        # an output path that check_writable could not see through (a read-only mount, an
        # immutable folder, root's permissions)
        last_line(f"{prog}: error: cannot write {exc.filename}: {exc.strerror}; choose another output path")
        sys.exit(2)
    except KeyboardInterrupt:
        last_line(f"{prog}: interrupted; run the same command again to continue where it stopped")
        sys.exit(128 + (signal.SIGTERM if _terminated else signal.SIGINT))
    except Exception as exc:
        full = disk_full_cause(exc)  # also from a Ray task or worker, which wraps it
        if full is None:
            raise
        last_line(f"{prog}: error: {disk_full_line(full)}")
        sys.exit(2)
    sys.exit(code or 0)


def last_line(text: str) -> None:
    """Print the command's closing line on stderr as its last line. Ray forwards its workers'
    output to this process from a thread, a second or so late (a trial that Tune stops prints
    "SystemExit: 1"): leaving Ray first ends that forwarding, so nothing follows the line.
    Only a Ray that this command joined or started (init_ray) is left, not a caller's."""
    if _joined_ray:  # init_ray imported ray
        import ray

        try:
            ray.shutdown()  # a no-op if it is already down
        except BaseException:  # a second Ctrl-C while leaving: the line still comes last
            pass
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # no space, over quota, read-only


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The OSError of a full disk, an exceeded quota or a read-only file system that `exc` is
    or wraps (Ray wraps a task's or a Train worker's exception, maybe several times)."""
    seen, hops = exc, 0
    while seen is not None and hops < 20:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return seen
        for failure in (getattr(seen, "worker_failures", None) or {}).values():  # Ray Train's worker group
            found = disk_full_cause(failure)
            if found is not None:
                return found
        seen = seen.__cause__ or getattr(seen, "cause", None) or seen.__context__
        hops += 1
    # Ray Data's task errors reach the driver as text only (a UserCodeException without its
    # cause): the OSError is in the remote traceback's last lines
    found = re.findall(r"OSError: \[Errno (\d+)\] ([^:\n]+): '([^'\n]+)'", str(exc))
    for number, strerror, filename in reversed(found):
        if int(number) in DISK_FULL:
            return OSError(int(number), strerror, filename)
    return None


def disk_full_line(exc: OSError) -> str:
    """One line: which path, what happened, the space there; how to go on."""
    import shutil

    path = exc.filename or "?"
    where = Path(path) if path != "?" else None
    while where is not None and not where.exists() and where != where.parent:
        where = where.parent
    free = f"; {shutil.disk_usage(where).free / 2**20:.1f} MiB free there" if where is not None else ""
    what = {errno.ENOSPC: "no space left on its device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "its file system is read-only"}[exc.errno]
    needed = f", {exc.needed / 2**20:.1f} MiB needed" if getattr(exc, "needed", None) else ""
    return (f"cannot write {path}: {what}{needed}{free}; free space (or choose another --out/--root) and run the "
            "same command again to continue")


_prog = "raypd"  # the running command's name (run_main), which labels its lines
_joined_ray = False  # set by init_ray when it joins or starts Ray (not when Ray ran already)
_terminated = False  # a SIGTERM came (it stops a command as Ctrl-C does, and exits 143)
_commands_stop_on_sigterm = False  # set by run_main: raypd's commands, not raypd used as a library


def stop_on_sigterm() -> None:
    """SIGTERM as Ctrl-C: a clean stop that the same command continues. (Ray's core installs
    its own SIGTERM handler in the driver, which aborts: init_ray puts this one back.)"""
    global _commands_stop_on_sigterm
    import threading

    if threading.current_thread() is threading.main_thread():
        _commands_stop_on_sigterm = True
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame) -> None:
    global _terminated
    _terminated = True
    signal.raise_signal(signal.SIGINT)


def check_writable(path, flag: str, beside: bool = False) -> None:
    """The folder `path` (or, beside=True, the folder that holds `path`: a file, or a folder
    staged next to it) can be created if missing and written into: its nearest existing
    ancestor is a folder this process may write to. Checked before any work, so that a bad
    output path changes nothing."""
    from pathlib import Path

    path = Path(path).absolute()
    existing = path.parent if beside else path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable; choose another path")


def redact(text: str) -> str:
    """`text` (a URI, a command line) without the passwords of the user:password@ parts of its
    URIs (--tracking-uri, --address): for messages and lock files."""
    return re.sub(r"(\w+://)([^/@\s:]+):[^/\s]*@", r"\1\2:***@", text)


def absolute_path(value, flag: str, address: str | None = None) -> Path:
    """A path the user gave (or a default such as `runs`) made absolute against the current
    folder. Ray's workers do not share this process's current folder (Ray Train's storage
    takes only absolute paths or URIs; Tune's trials run in their own folders), so every path
    a command hands on is absolute. On a cluster (an address, or $RAY_ADDRESS) a relative path
    is resolved on this machine: one line says to which path, since every node must see it there."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    resolved = path.absolute()
    if address or os.environ.get("RAY_ADDRESS"):
        print(f"{_prog}: {flag} {value} is relative: using {resolved} (on a cluster every node must see that path)",
              file=sys.stderr)
    return resolved


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without either, start a local Ray.

    A bare ray.init() would attach to whatever cluster the last `ray start` recorded, even a
    dead one, so a local run asks for address="local" explicitly. If this process already
    runs Ray (tests, or a stage called from another stage), that instance is used.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet_ray(local=not address)
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            context = ray.init(address=address, logging_level="WARNING")
        else:
            context = ray.init(address="local", logging_level="WARNING")
    except (ConnectionError, RuntimeError) as exc:
        where = address or "a new local instance"
        raise ValueError(f"cannot start or reach Ray at {where}: {exc}") from exc
    global _joined_ray
    _joined_ray = True
    if _commands_stop_on_sigterm:  # a raypd command: take SIGTERM back from Ray's core
        stop_on_sigterm()
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}", file=sys.stderr)


def quiet_libraries() -> None:
    """A command's output is its own: lines of Ray, Tune and MLflow that do not help its user
    are turned off where those libraries have a setting for them."""
    import logging
    import warnings

    # "Token authentication is enabled for this Ray cluster" on every start (it stays enabled)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray Data: "Starting execution of Dataset ...", its plan, "execution finished", and
    # "Progress bars disabled" (raypd shows its own progress)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray's own use of a deprecated Ray Data option (Train's ingest options): nothing to act on
    warnings.filterwarnings("ignore", message=r".*exclude_resources.*deprecated")
    # Tune's "Resume experiment with: Tuner.restore(...)": raypd resumes by its own command
    logging.getLogger("ray.tune.tune").addFilter(_not_tunes_resume_hint)  # added once
    # MLflow: "Creating initial MLflow database tables" for a new mlflow.db, "Validating input
    # example against model signature" and a download bar when a model is registered
    for name in ("mlflow.store.db.utils", "alembic", "mlflow.pyfunc", "mlflow.models"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Tune stops a trial's thread by raising SystemExit in it from outside: landing in a
    # garbage-collection callback, it prints "Exception ignored in ... Traceback ... SystemExit"
    if not getattr(sys.unraisablehook, "raypd", False):
        sys.unraisablehook = _unraisable_but_stops(sys.unraisablehook)


def _unraisable_but_stops(hook):
    def unraisable(info) -> None:
        if info.exc_type is not None and issubclass(info.exc_type, (SystemExit, KeyboardInterrupt)):
            return  # a stop (Tune's, or Ctrl-C) met while Python ran a finaliser: nothing went wrong
        hook(info)

    unraisable.raypd = True
    return unraisable


def _not_tunes_resume_hint(record) -> bool:
    return "Resume experiment with" not in record.getMessage()


def quiet_ray(local: bool) -> None:
    """Ray's settings for the processes it starts (environment variables reach the processes
    a local Ray starts; Ray Train passes its own on to its controller and workers)."""
    # Ray Train V2 sends a worker's print() through its logger as well as to stderr (each
    # epoch line twice)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not sys.stderr.isatty():  # a log file: no terminal colour codes around "(worker pid=...)"
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if local:  # one machine: no spot preemption to watch for (its actor logs an error line at start)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes: ray.init retries an address that does not answer for a
    long time while logging to stderr."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r} must be HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"cannot start or reach Ray at {address}: nothing answers there ({exc}); "
                         "start a cluster with `ray start --head` or leave --address out "
                         "for a local Ray") from None


def check_shared(folder) -> None:
    """On a multi-node cluster every node must see `folder` (datasets, checkpoints and trial
    folders are written by one node and read by others): a marker written here must be
    readable on every alive node, or this is a ValueError naming the nodes that miss it."""
    import uuid
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / f".raypd-shared-{token}"
    marker.write_text(token)

    @ray.remote(num_cpus=0)
    def sees_marker(path: str, expected: str) -> bool:
        try:
            return Path(path).read_text() == expected
        except OSError:
            return False

    try:
        seen = ray.get([sees_marker.options(
            name="raypd.check_shared",
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker), token)
            for n in nodes], timeout=120)
    finally:
        marker.unlink()
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ValueError(f"{folder} is not shared storage: nodes {', '.join(blind)} do not see it; on a "
                         "multi-node cluster put --root/--out on a filesystem every node mounts at the "
                         "same path (NFS/EFS, /mnt/raypd in cluster.yaml)")


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "samples"):
    """The progress bar of every stage: tqdm on stderr (off: `enabled` False)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)
