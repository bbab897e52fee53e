"""What the benchmark scripts share: free ports, real sim and proxy processes, a small HTTP load loop.

Benchmarks print figures (ratios against a baseline measured in the same run); they assert nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench-results"

sys.path.insert(0, str(REPO / "tests"))
from conftest import free_ports, wait_healthy, write_sim_topology  # noqa: E402,F401  (the tests' helpers)


class Fleet:
    """Processes started for one benchmark; all killed (with their groups) on exit."""

    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str, env: Optional[dict] = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def sim(self, name: str, *args: str) -> tuple[str, subprocess.Popen]:
        port = free_ports(1)[0]
        proc = self.start([sys.executable, "-m", "epdctl.sim", "sim-model", "--port", str(port), *args], name)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        return url, proc

    def stop(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)


@contextmanager
def fleet(name: str) -> Iterator[Fleet]:
    f = Fleet(RESULTS / "logs" / name)
    try:
        yield f
    finally:
        f.close()


def ec_config(role: str, path: str) -> str:
    return json.dumps({"ec_connector": "ECExampleConnector", "ec_role": role,
                       "ec_connector_extra_config": {"shared_storage_path": path}})


def text_body(i: int, max_tokens: int = 1, stream: bool = False) -> dict:
    return {"model": "sim-model", "messages": [{"role": "user", "content": f"question {i}: what is two plus two?"}],
            "max_tokens": max_tokens, "stream": stream}


def image_body(i: int, max_tokens: int = 1, stream: bool = False) -> dict:
    # A distinct image per request, so no proxy can skip its encoder through EC reuse.
    data = base64.b64encode(f"benchmark image {i} ".encode() * 64).decode()
    return {"model": "sim-model", "max_tokens": max_tokens, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": "What is in this image?"}]}]}


async def load(url: str, make_body, *, concurrency: int, seconds: float, start_index: int = 0) -> dict:
    """Closed-loop load for `seconds`: requests/s, failures, and latency percentiles (ms)."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    counter = iter(range(start_index, 1 << 62))
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                body = json.dumps(make_body(next(counter))).encode()
                started = time.perf_counter()
                try:
                    async with session.post(url + "/v1/chat/completions", data=body,
                                            headers={"Content-Type": "application/json"}) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else float("nan")

    return {"rps": len(latencies) / elapsed, "ok": len(latencies), "failed": failures, "p50_ms": pct(50), "p99_ms": pct(99)}


def use_uvloop() -> None:
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
