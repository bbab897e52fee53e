"""How a process is started and signalled: the seam a launcher for another place (a Slurm step,
say) implements (docs/design.md, "Seams").

`LocalLauncher` runs a process on this machine as the leader of its own session, so of its own
process group: signalling the group reaches whatever it forked, and a Ctrl-C at the terminal
reaches only epdctl, which then stops its children in order.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import psutil


class LocalLauncher:
    """Start with `Popen(start_new_session=True)`; signal with `killpg`, or psutil for one process."""

    def start(self, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        """Stdin from /dev/null, stdout and stderr appended to `log_path`, an explicit env, no shell."""
        with open(log_path, "ab", buffering=0) as log:
            return subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )

    def group_of(self, pid: int) -> Optional[int]:
        """The process group of `pid`; None once it is gone."""
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return None

    def signal_group(self, pgid: int, sig: int) -> None:
        """Signal a whole group; one already gone (or no longer ours to signal) is not an error."""
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal(self, proc: psutil.Process, sig: int) -> None:
        """Signal one process: psutil checks its create_time first, so a reused pid is safe."""
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            pass
