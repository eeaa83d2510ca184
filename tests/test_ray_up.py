"""`ray up` of cluster-onprem.yaml, end to end, on this machine only (127.0.0.1): the test starts
an sshd of its own (its own config, host key and client key, on a free loopback port), runs
`ray up` of a copy of cluster-onprem.yaml whose head is 127.0.0.1 and which has no workers,
submits the smoke study with `ray job submit` as cluster.yaml describes, and checks the study's
summary and its MLflow runs on the MLflow server that the head start commands launched.

Nothing outside the test's folders is written on purpose: the sshd gives its sessions a HOME in
tmp_path (so `ray up`'s own ~/ray_bootstrap_config.yaml and ~/ray_bootstrap_key.pem land there),
Ray's launcher state and temp files go to a short folder of the test (RAY_TMPDIR, TMPDIR), and
every process the head commands start runs in a session of its own whose id the command writes
down, so the test ends them all without `ray stop` (which would end every Ray on the machine).

Needs sshd, ssh, ssh-keygen and rsync (Debian: `apt-get install openssh-server rsync`); without
them the test is skipped, or fails where RAYPD_REQUIRE_SSHD=1 (CI)."""

import getpass
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_ports

BIN = Path(sys.executable).parent  # this interpreter's bin: ray, mlflow
RAY = str(BIN / "ray")  # the CLI installed beside this interpreter, never whatever PATH finds
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def wait_for_port(port: int, seconds: float, what: str, alive=lambda: True, log: Path | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not alive():
                break
            time.sleep(0.3)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} did not open 127.0.0.1:{port}\n{tail}")


# --------------------------------------------------------------------------- processes


def processes():
    """(pid, ppid, pgid, sid, cmdline, environ) of every live (not zombie) process this user
    may read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            state, ppid, pgid, sid = stat[stat.rindex(")") + 2:].split()[:4]
            if state == "Z":
                continue
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                environ = Path(entry.path, "environ").read_bytes().decode(errors="replace")
            except OSError:
                environ = ""
        except (OSError, ValueError):
            continue  # gone
        yield int(entry.name), int(ppid), int(pgid), int(sid), cmdline, environ


def wait_gone(select, seconds: float) -> dict:
    """Wait up to `seconds` for the processes `select(proc)` picks to end; {pid: cmdline} of
    those still there."""
    deadline = time.time() + seconds
    while True:
        left = {p[0]: p[4] for p in processes() if p[0] != os.getpid() and select(p)}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.3)


def end(select, grace: float = 20) -> dict:
    """SIGTERM the processes `select(proc)` picks (again each round: also those they start
    meanwhile), by pid; SIGKILL those still there after `grace` seconds. Returns {pid: cmdline}
    of all it signalled."""
    signalled, kill_at = {}, time.time() + grace
    while True:
        now = wait_gone(select, 0)
        if not now or time.time() > kill_at + 10:
            return signalled
        sig = signal.SIGKILL if time.time() > kill_at else signal.SIGTERM
        for pid in now:
            if pid not in signalled or sig == signal.SIGKILL:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        signalled.update(now)
        time.sleep(0.3)


def descendants(root: int) -> set:
    children = {}
    for pid, ppid, *_ in processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# --------------------------------------------------------------------------- sshd


def require_tools() -> dict:
    tools = {name: shutil.which(name, path=SBIN) for name in ("sshd", "ssh", "ssh-keygen", "rsync", "setsid")}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        reason = (f"`ray up` over SSH needs {', '.join(missing)} "
                  "(Debian/Ubuntu: apt-get install openssh-server rsync)")
        if os.environ.get("RAYPD_REQUIRE_SSHD") == "1":
            pytest.fail(reason + "; RAYPD_REQUIRE_SSHD=1 makes that a failure")
        pytest.skip(reason)
    return tools


@pytest.fixture
def sshd(tmp_path):
    """An sshd of this test on 127.0.0.1:<free port> (foreground, own process group) that lets
    the current user in with a generated key only, and gives its sessions HOME=tmp_path/home."""
    tools = require_tools()
    user = getpass.getuser()
    ssh_dir, home = tmp_path / "ssh", tmp_path / "home"
    ssh_dir.mkdir()
    home.mkdir()
    (home / ".bashrc").write_text("")  # Ray's command runner sources ~/.bashrc
    for name, comment in (("host_key", "raypd-test-host"), ("client_key", "raypd-test-client")):
        subprocess.run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-C", comment,
                        "-f", str(ssh_dir / name)], check=True, capture_output=True)
    shutil.copy(ssh_dir / "client_key.pub", ssh_dir / "authorized_keys")
    [port] = free_ports(1)
    config = ssh_dir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {ssh_dir / 'host_key'}",
        f"PidFile {ssh_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",  # CI runs as root
        "StrictModes no",  # tmp_path's modes are not sshd's business
        "UsePAM no",
        f"AllowUsers {user}",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        # Every session's ~ is tmp_path/home: `ray up` writes ~/ray_bootstrap_config.yaml and
        # ~/ray_bootstrap_key.pem on the head, which must not land in this user's real home.
        f'SetEnv "HOME={home}"',
        "",
    ]))
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation (Debian's path)
    log = open(tmp_path / "sshd.log", "w")
    proc = subprocess.Popen([tools["sshd"], "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 30, "sshd", alive=lambda: proc.poll() is None, log=tmp_path / "sshd.log")
        yield {"port": port, "user": user, "key": ssh_dir / "client_key", "home": home, "ssh": tools["ssh"],
               "pid": proc.pid}
    finally:
        # Connection children of sshd start sessions of their own: end them with the listener.
        tree = descendants(proc.pid) | {proc.pid}
        end(lambda p: p[0] in tree or p[2] == proc.pid)
        proc.wait(timeout=30)
        log.close()


# --------------------------------------------------------------------------- the test


@pytest.fixture
def short_tmp():
    """A folder with a short path, for Ray's temp dir (Unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="rpu", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_ray_up_of_the_onprem_cluster_file_runs_a_study(sshd, short_tmp, tmp_path):
    started = time.time()
    original = yaml.safe_load((REPO / "cluster-onprem.yaml").read_text())
    home, shared = sshd["home"], tmp_path / "shared"
    root = shared / "runs"  # as /mnt/raypd/runs in cluster-onprem.yaml
    pids = tmp_path / "pids"
    for folder in (shared, pids):
        folder.mkdir()
    short = short_tmp  # Ray's --temp-dir, the launcher's RAY_TMPDIR and TMPDIR
    markers = (str(tmp_path), str(short))  # in the command line or environment of everything started here
    cluster_name = f"raypd-onprem-test-{uuid.uuid4().hex[:8]}"
    token = uuid.uuid4().hex
    token_file = tmp_path / "auth_token"  # stands for the client's ~/.ray/auth_token
    token_file.write_text(token)
    token_file.chmod(0o600)
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client, mlflow_port = free_ports(8)

    # ssh to the test's sshd: Ray's command runner has no SSH port setting (auth takes ssh_user,
    # ssh_private_key, ssh_proxy_command; the port is left to ~/.ssh/config), so `ray up` finds
    # this wrapper first on PATH (for its ssh and rsync's). -F /dev/null: no user or system
    # ssh config. ControlPath=none: no connection-sharing master outliving `ray up`. Ray itself
    # passes StrictHostKeyChecking=no and UserKnownHostsFile=/dev/null.
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sshd['ssh'])} -F /dev/null -p {sshd['port']} "
                       "-o BatchMode=yes -o ControlMaster=no -o ControlPath=none \"$@\"\n")
    wrapper.chmod(0o755)

    # The launcher's copy of cluster-onprem.yaml: this machine as the head, no workers.
    # Every remote command finds this interpreter's ray and mlflow first (a non-interactive SSH
    # session need not have its bin on PATH), and keeps its files in the test's folders.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the node's IP is 127.0.0.1 as asked (Ray otherwise
    # swaps a loopback --node-ip-address for this machine's outward address); a one-node cluster.
    prefix = (f"export PATH={BIN}:$PATH RAY_TMPDIR={short} TMPDIR={short} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
              "MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true; cd ~ && ")
    # `setsid -w bash -c 'echo $$ > FILE; exec ...'`: the command and everything it starts run in
    # a session whose id is in FILE, for the test to end (instead of `ray stop`).
    head_start = (
        f"{prefix}ulimit -n 65536 2>/dev/null; setsid -w bash -c 'echo $$ > {pids}/head.sid; "
        f"RAY_AUTH_MODE=token exec ray start --head --port={gcs} --node-ip-address=127.0.0.1 --num-cpus=2 "
        f"--dashboard-host=127.0.0.1 --dashboard-port={dashboard} --dashboard-agent-listen-port={agent} "
        f"--dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={runtime_env} "
        f"--metrics-export-port={metrics} --ray-client-server-port={client} --temp-dir={short} "
        "--autoscaling-config=~/ray_bootstrap_config.yaml' < /dev/null")
    mlflow_start = (
        f"{prefix}mkdir -p {root} && (setsid bash -c 'echo $$ > {pids}/mlflow.sid; exec mlflow server "
        f"--host 127.0.0.1 --port {mlflow_port} --workers 1 --backend-store-uri sqlite:///{root}/mlflow.db "
        f"--artifacts-destination {root}/mlartifacts' > {tmp_path}/mlflow.log 2>&1 < /dev/null &)")
    setup = [c.replace("/mnt/raypd", str(shared)) for c in original["setup_commands"] if "pip install" not in c]
    config = {
        **original,
        "cluster_name": cluster_name,
        "provider": {**original["provider"], "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": sshd["user"], "ssh_private_key": str(sshd["key"])},
        "min_workers": 0,
        "max_workers": 0,
        # The same mounts, into the test's home on the head (the sshd's HOME) rather than ~,
        # the auth token from the test's token file.
        "file_mounts": {str(home) + remote[1:] if remote.startswith("~/") else remote:
                        str(token_file) if local == "~/.ray/auth_token" else local
                        for remote, local in original["file_mounts"].items()},
        # No `pip install -e ~/raypd`: the head is this machine, where raypd is installed already;
        # installing from the copy would repoint this interpreter's editable install at tmp_path.
        "setup_commands": [prefix + c for c in setup],
        # No `ray stop`: on this machine it would end every Ray, the other tests' included.
        # MLflow first: its start (database migrations, seconds) runs while Ray starts.
        "head_start_ray_commands": [mlflow_start, head_start],
        "worker_start_ray_commands": [],
    }
    assert len(setup) == len(original["setup_commands"]) - 1 and str(shared) in setup[0]
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value or []]
    assert not any(word in c for c in commands for word in ("ray stop", "pkill", "killall")), commands
    cluster_file = tmp_path / "cluster-onprem.yaml"
    cluster_file.write_text(yaml.safe_dump(config, sort_keys=False))

    # A clean environment (a Ray instance of this process leaves RAY_* variables behind).
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
    up_env = {**clean, "PATH": f"{wrapper.parent}{os.pathsep}{BIN}{os.pathsep}{clean.get('PATH', '')}",
              "RAY_TMPDIR": str(short), "TMPDIR": str(short),  # the launcher's state and temp files
              "RAY_USAGE_STATS_ENABLED": "0"}
    client_env = {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    control_dir = Path("/tmp", "ray_ssh_" + hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10])
    control_dir_existed = control_dir.exists()
    timings, passed = {}, False
    try:
        # The session's HOME must be the test's, or `ray up` would write into the real home.
        probe = subprocess.run([str(wrapper), "-i", str(sshd["key"]), "-o", "StrictHostKeyChecking=no",
                                "-o", "UserKnownHostsFile=/dev/null", f"{sshd['user']}@127.0.0.1", "echo $HOME"],
                               capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == str(home), probe.stdout + probe.stderr

        t = time.time()
        up = subprocess.run([RAY, "up", "-y", "--no-config-cache", "--disable-usage-stats", "--log-style=record",
                             str(cluster_file)], cwd=REPO, env=up_env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
        (tmp_path / "ray-up.log").write_text(up.stdout + up.stderr)
        timings["ray up"] = time.time() - t
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        assert (home / "ray_bootstrap_config.yaml").exists() and (home / "raypd" / "pyproject.toml").exists()
        assert (pids / "head.sid").exists()

        t = time.time()
        wait_for_port(dashboard, 120, "the dashboard", log=short / "session_latest" / "logs" / "dashboard.log")
        timings["dashboard up"] = time.time() - t
        # no wait for MLflow's port: the README's job submit comes right after `ray up`, and
        # raypd.tune waits for a tracking server that is still starting

        t = time.time()
        for attempt in range(1, 25):  # the dashboard answers before the head's job agent is ready
            job = subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                 "--", sys.executable, "-m", "raypd.tune", "--study", "smoke", "--root", str(root),
                 "--tracking-uri", f"http://127.0.0.1:{mlflow_port}", "--set", "train.epochs=1"],
                env=client_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=420)
            if "No available agent" not in job.stderr:
                break
            time.sleep(5)
        timings[f"ray job submit ({attempt} tries)"] = time.time() - t
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]

        summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
        assert summary["num_trials"] == 4 and len(summary["trials"]) == 4
        trial_ids = sorted(t["trial_id"] for t in summary["trials"])

        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = mlflow.get_experiment_by_name("raypd-smoke")
        assert experiment is not None
        runs = mlflow.search_runs([experiment.experiment_id])
        assert sorted(r.data.tags.get("trial_id") for r in runs) == trial_ids
        assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
        passed = True
    finally:
        # The head's and the MLflow server's sessions (Ray puts workers in process groups of
        # their own, inside that session); then anything else started here. The raylet first:
        # it ends its workers and agents; signalled together with the GCS, the raylet and the
        # autoscaler wait for each other (tens of seconds). What is left after 5 s: SIGKILL.
        for name in ("head", "mlflow"):
            sid_file = pids / f"{name}.sid"
            if sid_file.exists() and sid_file.read_text().strip():
                t, sid = time.time(), int(sid_file.read_text())
                if name == "head":
                    end(lambda p: p[3] == sid and p[4].split(" ", 1)[0].endswith("/raylet"), grace=10)
                end(lambda p: p[3] == sid, grace=5)  # MLflow's job runner too takes its time
                timings[f"end {name}"] = time.time() - t
        # Whatever else carries the test's folders in its command line or environment (every
        # process started through the test's sshd has HOME=tmp_path/home) and is not the sshd
        # or one of its connections (the sshd fixture ends those): given a few seconds to end
        # by itself (a job's watcher polls its supervisor every second), then a leftover.
        sshd_tree = descendants(sshd["pid"]) | {sshd["pid"]}
        ours = lambda p: p[0] not in sshd_tree and any(m in p[4] or m in p[5] for m in markers)  # noqa: E731
        leftovers = wait_gone(ours, 10)
        end(lambda p: p[0] in leftovers)
        ray_logs = short / "session_latest" / "logs"
        if not passed and ray_logs.is_dir():  # kept for the failure's story (the short folder goes)
            shutil.copytree(ray_logs, tmp_path / "ray-logs", dirs_exist_ok=True, ignore_dangling_symlinks=True)
        shutil.rmtree(control_dir / hashlib.sha256(cluster_name.encode()).hexdigest()[:10], ignore_errors=True)
        if not control_dir_existed:
            try:
                control_dir.rmdir()
            except OSError:
                pass
        print(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}, "
              f"whole test {time.time() - started:.1f}s; leftovers: {leftovers or 'none'}")
    assert not leftovers, f"processes of this test outlived their sessions: {leftovers}"
