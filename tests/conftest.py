"""Shared fixtures: free ports, a private state dir, real sim processes, and the orphan check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = REPO / "epdctl" / "topologies"


# Below Linux's ephemeral range (32768-60999), so no outgoing connection takes a port between
# the moment we pick it and the moment a server binds it.
PORT_RANGE = (20000, 32000)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free now, picked at random below the ephemeral range."""
    import random

    from epdctl.ports import port_is_free

    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*PORT_RANGE)
        if port not in ports and port_is_free(port):
            ports.append(port)
    return ports


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body, timeout: float = 30.0, raw: Optional[bytes] = None) -> tuple[int, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metrics(url: str) -> dict[str, float]:
    """Unlabelled sample values of a Prometheus endpoint (labelled ones keyed with their labels)."""
    status, body = http_get(url + "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_healthy(url: str, timeout: float = 20.0, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: process exited with {proc.returncode}")
        try:
            if http_get(url + "/health", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not healthy after {timeout}s")


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sim_running(url: str) -> float:
    """A sim's requests in its step loop (vLLM's gauge)."""
    return metrics(url)['vllm:num_requests_running{model_name="sim-model"}']


def send_and_hang_up_when(port: int, body: dict, started) -> None:
    """POST `body` to chat on a raw socket, and close it (the client leaves) once `started()` holds."""
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        wait_for(started, 30, "the request to start")


def signal_and_wait(proc: subprocess.Popen, sig: int, timeout: float = 30) -> str:
    """Send `sig`, wait for the process to end, and return its output; kill it if it will not end."""
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def signal_when(proc: subprocess.Popen, ready, sig: int, what: str, timeout: float = 60) -> tuple[str, str]:
    """Once `ready()` holds (or `proc` has ended), send `sig`; return `proc`'s stdout and stderr
    (both piped). Kills it if it will not end."""
    try:
        wait_for(lambda: proc.poll() is not None or ready(), timeout, what)
        proc.send_signal(sig)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class Procs:
    """Processes a test started; all are killed (with their groups) at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str, env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        log.close()
        self.procs.append(proc)
        return proc

    def sim(self, port: int, *args: str, name: Optional[str] = None) -> str:
        url = f"http://127.0.0.1:{port}"
        proc = self.start([sys.executable, "-m", "epdctl.sim", "sim-model", "--port", str(port), *args],
                          name or f"sim-{port}")
        wait_healthy(url, proc=proc)
        return url

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def kill_all(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


UNIT_TESTS = REPO / "tests" / "unit"


class StartsAProcess(AssertionError):
    """A test under tests/unit/ tried to start a process or touch the network."""


def _refused(what: str):
    def refuse(*args, **kwargs):
        raise StartsAProcess(f"a unit test must not {what}: it belongs in tests/integration/")

    return refuse


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(request, monkeypatch):
    """tests/unit/ is the fast tier: no process is started and no socket is bound or connected
    (checked here, not promised), so `pytest tests/unit` runs in seconds on any machine."""
    if UNIT_TESTS not in Path(str(request.node.path)).parents:
        yield
        return
    import socket

    monkeypatch.setattr(subprocess.Popen, "__init__", _refused("start a process"))
    monkeypatch.setattr(os, "fork", _refused("fork"))
    monkeypatch.setattr(os, "posix_spawn", _refused("start a process"))
    monkeypatch.setattr(socket.socket, "bind", _refused("bind a port"))
    monkeypatch.setattr(socket.socket, "connect", _refused("open a connection"))
    yield


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


class _Recording(BaseHTTPRequestHandler):
    """A stand-in vLLM: healthy, and every POST gets one fixed chat completion; it keeps the bodies."""

    ANSWER = (b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":'
              b'{"role":"assistant","content":"ok"},"finish_reason":"length"}]}')

    def do_GET(self):  # /health, /v1/models
        self._answer(b'{"object":"list","data":[{"id":"m"}]}')

    def do_POST(self):
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(self.ANSWER)

    def _answer(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    """`recorder()` starts a backend that records what it is sent: its `.url`, and `.bodies` (raw, in order)."""
    servers: list[ThreadingHTTPServer] = []

    def start() -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
        server.bodies = []
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    path = tmp_path / "state"
    monkeypatch.setenv("EPDCTL_STATE_DIR", str(path))
    return path


def epdctl(*args: str, timeout: float = 120, env: Optional[dict] = None, check: Optional[int] = None,
           cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run the real `epdctl` CLI (as a new user would) and capture its output."""
    result = subprocess.run(
        [sys.executable, "-m", "epdctl", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, cwd=cwd,
    )
    if check is not None:
        assert result.returncode == check, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def run_processes(token_marker: str) -> list[psutil.Process]:
    """Live processes whose command line or environment mentions `token_marker`."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if token_marker in cmd or any(token_marker in v for v in proc.environ().values()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_no_orphans(marker: str, ports: list[int] = (), timeout: float = 5.0) -> None:
    """Nothing of the run is left: no process mentioning `marker`, and every port is free."""
    from epdctl.ports import port_is_free

    deadline = time.monotonic() + timeout
    while True:
        left = run_processes(marker)
        busy = [p for p in ports if not port_is_free(p)]
        if not left and not busy:
            return
        if time.monotonic() > deadline:
            desc = [f"{p.pid} {' '.join(p.cmdline())}" for p in left]
            raise AssertionError(f"orphans: {desc}; busy ports: {busy}")
        time.sleep(0.1)


def wait_settled(state_dir: Path, name: str, timeout: float = 30) -> None:
    """Until the supervisor has saved its first look at the instances (run/witness.py): with no
    traffic after it, it writes the state again only when something changes. A test that deletes
    the state folder waits for this, or the supervisor's next save puts the folder back at once."""
    def looked() -> bool:
        try:
            return bool(json.loads((state_dir / name / "state.json").read_text()).get("evidence"))
        except (OSError, ValueError):
            return False
    wait_for(looked, timeout, f"{name}'s supervisor to save its first look")


def write_sim_topology(tmp: Path, kind: str = "1e1pd", *, name: str = "t", instance_args: Optional[dict] = None,
                       extra: str = "", timings: str = "sim-ttft-ms: 5, sim-tpot-ms: 1, sim-encode-ms: 5",
                       health_timeout: float = 30, ec_path: Optional[str] = None) -> tuple[Path, dict]:
    """A sim topology on free ports. Returns the file and {instance name: port} (plus 'proxy')."""
    roles = {"1e1pd": ["encode", "pd"], "1e1p1d": ["encode", "prefill", "decode"], "2e1pd": ["encode", "encode", "pd"],
             "agg": ["pd"], "1p1d": ["prefill", "decode"]}[kind]
    ports = free_ports(len(roles) + 1)
    ec_path = ec_path or str(tmp / "ec")
    by_role: dict[str, list[str]] = {}
    names: dict[str, int] = {}
    for role, port in zip(roles, ports):
        index = len(by_role.setdefault(role, []))
        args = (instance_args or {}).get(f"{role}-{index}")
        item = f"{{port: {port}" + (f", args: {json.dumps(args)}" if args else "") + "}"
        by_role[role].append(item)
        names[f"{role}-{index}"] = port
    names["proxy"] = ports[-1]
    text = [f"name: {name}", "model: sim-model", "engine: sim", "platform: cpu",
            f"defaults: {{args: {{{timings}}}}}"]
    if "encode" in by_role:
        text.append(f"ec_transfer: {{connector: ECExampleConnector, shared_storage_path: {ec_path}}}")
    if "prefill" in by_role:
        text.append("kv_transfer: {connector: NixlConnector, side_channel_port_base: %d}" % free_ports(1)[0])
    for role, items in by_role.items():
        text.append(f"{role}: [{', '.join(items)}]")
    text.append(f"proxy: {{host: 127.0.0.1, port: {ports[-1]}}}")
    text.append(f"health: {{timeout_s: {health_timeout}, interval_s: 0.05}}")
    if extra:
        text.append(extra)
    path = tmp / f"{name}.yaml"
    path.write_text("\n".join(text) + "\n")
    return path, names
