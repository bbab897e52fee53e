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


# wrk (C, one thread, one event loop) as the load generator: a few microseconds of CPU per request,
# where an aiohttp client spends ~140, so on a small machine the load takes little from the proxy it
# measures. The Lua script makes each body distinct (an image per request, so no proxy can skip its
# encoder through EC reuse) and prints machine-readable totals when done.
WRK_SCRIPT = r"""
local i = %(start)d
local kind, tokens, stream = "%(kind)s", %(tokens)d, "%(stream)s"
local headers = {["Content-Type"] = "application/json"}
request = function()
  i = i + 1
  local body
  if kind == "image" then
    local data = string.rep(string.format("%%012d", i), 128)  -- digits are base64; 1.5 KiB
    body = '{"model":"sim-model","max_tokens":' .. tokens .. ',"stream":' .. stream ..
      ',"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,' ..
      data .. '"}},{"type":"text","text":"What is in this image?"}]}]}'
  else
    body = '{"model":"sim-model","messages":[{"role":"user","content":"question ' .. i ..
      ': what is two plus two?"}],"max_tokens":' .. tokens .. ',"stream":' .. stream .. '}'
  end
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK-RESULT %%d %%d %%d %%d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status))
  io.write(string.format("WRK-P50 %%d\n", latency:percentile(50)))
end
"""


def have_wrk() -> bool:
    import shutil

    return shutil.which("wrk") is not None


def wrk_load(url: str, kind: str, *, concurrency: int, seconds: float, start_index: int = 0, tokens: int = 1,
             stream: bool = False) -> dict:
    """Closed-loop load with wrk: requests/s, failures (errors and non-2xx) and the p50 latency (ms).

    `kind` is "text" or "image" (the bodies of `text_body` / `image_body`)."""
    import re
    import tempfile

    script = WRK_SCRIPT % {"start": start_index, "kind": kind, "tokens": tokens, "stream": "true" if stream else "false"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="epdctl-wrk-") as handle:
        handle.write(script)
        handle.flush()
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                              "-s", handle.name, url], capture_output=True, text=True, check=True).stdout
    found = re.search(r"WRK-RESULT (\d+) (\d+) (\d+) (\d+)", out)
    p50 = re.search(r"WRK-P50 (\d+)", out)
    if not found or not p50:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, duration_us, errors, bad_status = map(int, found.groups())
    ok = requests - bad_status
    return {"rps": ok / (duration_us / 1e6), "ok": ok, "failed": errors + bad_status, "p50_ms": int(p50.group(1)) / 1000}
