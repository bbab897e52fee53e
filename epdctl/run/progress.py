"""What `epdctl up` shows while it runs: the start-up progress (a live table on a terminal, plain
lines otherwise) and the children's logs as `name | line`."""

from __future__ import annotations

import sys
from typing import Optional

from epdctl.run import logfiles
from epdctl.run.child import Child
from epdctl.run.runtime import Runtime
from epdctl.run.states import ENDED, ProcessState


class Progress:
    """A live table on a TTY; plain lines otherwise (or with NO_COLOR)."""

    def __init__(self, children: list[Child], runtime: Runtime, stream=None):
        self.children = children
        self.runtime = runtime
        self.stream = stream or sys.stdout
        self.fancy = logfiles.wants_colour(self.stream)
        self.live = None
        self._said: dict[str, str] = {}

    def __enter__(self) -> "Progress":
        if self.fancy:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._table(), console=Console(file=self.stream), refresh_per_second=8, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def _table(self):
        from rich.table import Table

        table = Table(title="epdctl up", title_justify="left")
        for column in ("instance", "role", "devices", "port", "state", "waited"):
            table.add_column(column)
        now = self.runtime.now()
        colors = {ProcessState.HEALTHY: "green", ProcessState.EXITED: "red", ProcessState.STARTING: "yellow",
                  ProcessState.UNHEALTHY: "red", ProcessState.FAILED: "red", ProcessState.RESTARTING: "yellow"}
        for child in self.children:
            waited = child.healthy_after_s if child.healthy_after_s is not None else (now - child.started_at if child.started_at else 0)
            table.add_row(
                child.spec.name, child.spec.role, ",".join(map(str, child.spec.devices)) or "-", str(child.spec.port),
                f"[{colors.get(child.state, 'white')}]{child.state}[/]", f"{waited:.1f}s",
            )
        return table

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            return
        for child in self.children:
            if self._said.get(child.spec.name) == child.state:
                continue
            self._said[child.spec.name] = child.state
            line = self._line(child)
            if line:
                print(f"{child.spec.name}: {line}", file=self.stream, flush=True)

    @staticmethod
    def _line(child: Child) -> Optional[str]:
        if child.state == ProcessState.HEALTHY:
            if child.adopted or child.healthy_after_s is None:
                return f"healthy (adopted, pid {child.pid}) at {child.spec.url}"
            return f"healthy after {child.healthy_after_s:.1f}s at {child.spec.url}"
        if child.state == ProcessState.STARTING:
            verb = "adopted" if child.adopted else "started"
            return f"{verb} (pid {child.pid}), waiting for {child.spec.url}/health"
        if child.state == ProcessState.RESTARTING:
            return f"{(child.last_exit or {}).get('how', 'exited')}; restarting it"
        if child.state in ENDED and child.error:
            return child.error
        return None


class LogTailer:
    """Compose-style `name | line` streaming of every child's log file (rotation included)."""

    COLORS = ("36", "33", "35", "32", "34", "31")

    def __init__(self, children: list[Child], out):
        self.children = children
        self.out = out
        width = max(len(c.spec.name) for c in children)
        color = logfiles.wants_colour(out)
        self.followers = {c.spec.name: logfiles.Follower(c.log_path, colour=color) for c in children}
        self.prefix = {}
        for i, child in enumerate(children):
            label = f"{child.spec.name:<{width}} | "
            self.prefix[child.spec.name] = f"\033[{self.COLORS[i % len(self.COLORS)]}m{label}\033[0m" if color else label

    def pump(self) -> None:
        for name, follower in self.followers.items():
            for line in follower.read_lines():
                self.out.write(self.prefix[name] + line + "\n")
        self.out.flush()
