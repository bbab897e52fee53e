"""`proxy.workers` > 1: that many proxy processes on one port, under one parent.

Each worker binds the port with SO_REUSEPORT, so the kernel spreads client connections over
them; the parent only starts, watches and stops its workers. Workers share nothing: each
balances by its own in-flight requests, ejects failing instances and remembers encoder
affinity on its own (docs/proxy.md). Their metrics are summed across workers through
prometheus_client's multiprocess mode, in a private folder the parent makes and removes.

A worker that dies takes the whole proxy down with a non-zero exit, so `up` reports it and the
proxy's restart policy starts it again, workers and all: a half-dead proxy would serve a
fraction of its connections' worth and look healthy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile

log = logging.getLogger("epdctl.proxy")

# How long workers get to finish their requests after SIGTERM before they are killed: below
# `epdctl down`'s default grace (10 s), so the parent still removes the metrics folder itself.
STOP_GRACE_S = 8.0
FOLDER_PREFIX = "epdctl-proxy-metrics-"
# How often a worker checks that its parent is still there (a SIGKILLed parent cannot stop it).
PARENT_CHECK_S = 1.0


def port_problem(host: str, port: int) -> str | None:
    """Whether anyone already listens on host:port, checked once here so that a busy port is one
    line, not one per worker. Bound *without* SO_REUSEPORT on purpose: with it, a stale proxy of
    ours (same user, same option) would let the workers join its port and share its traffic."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"port {port} on {host} cannot be bound: {exc.strerror}"
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            try:
                sock.bind(address)
            except OSError as exc:
                what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
                return f"port {port} on {host} {what}"
    return None


def run(workers: int, argv: list[str], host: str, port: int) -> int:
    problem = port_problem(host, port)
    if problem:
        print(f"epdctl proxy: {problem}", file=sys.stderr)
        return 1
    sweep_stale_folders()
    # The parent's pid in the name: a later proxy can tell a dead one's folder (see below).
    metrics_dir = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    try:
        return asyncio.run(_supervise(workers, argv, metrics_dir))
    except OSError as exc:  # a worker that cannot be started at all (E2BIG, EACCES, ...)
        print(f"epdctl proxy: cannot start a worker: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)  # ours: mkdtemp made it, 0700


def sweep_stale_folders() -> None:
    """Metrics folders of proxies that died with all their workers at once (SIGKILL to the group,
    a teardown whose grace ran out): nobody was left to remove them. Only folders of this user,
    named by a pid that is gone, and in them only prometheus_client's value files (TYPE_PID.db);
    rmdir then removes the folder only if nothing else is in it."""
    import psutil

    root = tempfile.gettempdir()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        pid = _folder_pid(entry.path)
        if pid is not None and not psutil.pid_exists(pid):
            _remove_folder(entry.path)


def _folder_pid(path: str) -> int | None:
    """The parent pid a metrics folder is named by, if `path` is one of ours: our name, a real
    folder (not a symlink) owned by this user. None for anything else."""
    name = os.path.basename(os.path.normpath(path))
    pid = name[len(FOLDER_PREFIX):].partition("-")[0] if name.startswith(FOLDER_PREFIX) else ""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not pid.isdigit() or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return None
    return int(pid)


def _remove_folder(path: str, only_pid: int | None = None) -> None:
    """prometheus_client's value files (TYPE_PID.db; only `only_pid`'s if given) in a folder of
    ours, then the folder if that left it empty: rmdir removes nothing else."""
    try:
        with os.scandir(path) as files:
            for file in files:
                stem, _, ext = file.name.rpartition(".")
                pid = stem.rpartition("_")[2]
                if (ext == "db" and pid.isdigit() and (only_pid is None or int(pid) == only_pid)
                        and file.is_file(follow_symlinks=False)):
                    os.unlink(file.path)
        os.rmdir(path)
    except OSError:
        pass  # not empty (another worker's files, or not ours), or already gone


async def _supervise(workers: int, argv: list[str], metrics_dir: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops it cleanly too
        loop.add_signal_handler(sig, stop.set)
    # prometheus_client picks its multiprocess value store when it is imported: the folder must be
    # in the worker's environment from the start.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    procs: list[asyncio.subprocess.Process] = []
    code = 0
    try:
        for index in range(workers):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "epdctl.proxy", *argv,
                "--worker-index", str(index), "--worker-parent", str(os.getpid()), env=env))
        log.info("proxy: %d workers on one port (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
        exits = {asyncio.ensure_future(p.wait()): (i, p) for i, p in enumerate(procs)}
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([*exits, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in done:
            if task in exits:
                index, proc = exits[task]
                log.error("proxy worker %d (pid %d) exited with code %s: stopping the proxy", index, proc.pid,
                          proc.returncode)
                code = 1
                break
    finally:
        await _stop(procs)
    return code


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    waits = [asyncio.ensure_future(p.wait()) for p in procs]
    if not waits:
        return
    _, late = await asyncio.wait(waits, timeout=STOP_GRACE_S)
    for proc in procs:
        if proc.returncode is None:
            log.warning("proxy worker pid %d did not stop in %.0f s: killed", proc.pid, STOP_GRACE_S)
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    if late:
        await asyncio.wait(late)


async def watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose parent is gone (SIGKILL cannot be forwarded) stops by itself."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("proxy worker: parent pid %d is gone; stopping", parent)
            stop.set()
            return
        await asyncio.sleep(PARENT_CHECK_S)


def orphan_cleanup(parent: int) -> None:
    """After a worker stops with its parent gone, nobody will remove the metrics folder: each
    worker removes its own value files, and the last one out the then empty folder. The folder
    comes from the environment, so it is proven ours first (name, owner, not a symlink), and
    named by this worker's own parent: another proxy's folder is not this worker's to empty."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder or os.getppid() == parent or _folder_pid(folder) != parent:
        return
    _remove_folder(folder, only_pid=os.getpid())
