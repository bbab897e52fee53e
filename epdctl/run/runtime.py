"""The seam between the supervisor and the world: processes, clock and HTTP in one place, so unit
tests fake them (docs/design.md, "Seams")."""

from __future__ import annotations

import http.client
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from epdctl.run.launch import LocalLauncher


@dataclass
class Runtime:
    """Subprocess (through a launcher), clock and health probe."""

    launcher: LocalLauncher = field(default_factory=LocalLauncher)

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path, node: Optional[str] = None) -> subprocess.Popen:
        return self.launcher.start(argv, env, log_path, node=node)

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def probe(self, url: str, timeout: float = 1.0) -> bool:
        """GET url/health → 200?"""
        parsed = urlparse(url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def fetch(self, url: str, timeout: float = 1.0) -> Optional[str]:
        """GET url → its text when 200, else None (the proxy's /metrics, while a drain waits on it)."""
        parsed = urlparse(url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        try:
            conn.request("GET", parsed.path or "/")
            resp = conn.getresponse()
            body = resp.read(16 * 1024 * 1024)
            return body.decode("utf-8", "replace") if resp.status == 200 else None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
