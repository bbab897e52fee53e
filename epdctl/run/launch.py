"""How a process is started and signalled: the seam a launcher for another place (a Slurm step,
say) implements (docs/design.md, "Seams").

`LocalLauncher` runs a process on this machine as the leader of its own session, so of its own
process group: signalling the group reaches whatever it forked, and a Ctrl-C at the terminal
reaches only epdctl, which then stops its children in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import psutil


class LocalLauncher:
    """Start with `Popen(start_new_session=True)`; signal with `killpg`, or psutil for one process."""

    def end_run(self, run_token: str) -> list[str]:
        """What of the run is left elsewhere after the local teardown: nothing, here."""
        return []

    def start(self, argv: list[str], env: dict[str, str], log_path: Path, node: Optional[str] = None) -> subprocess.Popen:
        """Stdin from /dev/null, stdout and stderr appended to `log_path`, an explicit env, no shell."""
        from epdctl.run.logfiles import open_log

        with open_log(log_path) as log:
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


class SlurmLauncher(LocalLauncher):
    """`launcher: slurm`: an instance placed on a node runs as a job step of the allocation.

    The local process is its `srun` (a child of ours in its own session, as any local process);
    the task on the node is `steptask`, which records its pid and step id in the state folder and
    becomes the instance's argv. Signals go to the task through Slurm (`scancel --signal`): a
    SIGTERM to srun would make it kill the task at once, with no graceful shutdown. The proxy
    (node None) runs here, as with the local launcher.
    """

    def __init__(self, job_id: str, step_file, python: str, steps: Optional[dict[int, str]] = None):
        self.job_id = job_id
        self.step_file = step_file  # instance -> the file its task records itself in (StateDir.step_file)
        self.python = python
        self.steps: dict[int, str] = dict(steps or {})  # srun pid -> "JOB.STEP"
        self._step_files: dict[int, Path] = {}

    def start(self, argv: list[str], env: dict[str, str], log_path: Path, node: Optional[str] = None) -> subprocess.Popen:
        if node is None:
            return super().start(argv, env, log_path)
        from epdctl.run.slurm import srun_argv
        from epdctl.run.state import INSTANCE_ENV, RUN_ENV

        instance, token = env[INSTANCE_ENV], env[RUN_ENV]
        step_file = self.step_file(instance)
        try:
            step_file.unlink()  # the last incarnation's: a new step writes its own
        except FileNotFoundError:
            pass
        popen = super().start(srun_argv(self.job_id, node, token, instance)
                              + [self.python, "-m", "epdctl.run.steptask", str(step_file), "--"] + argv, env, log_path)
        self._step_files[popen.pid] = step_file
        return popen

    def step_info(self, pid: int) -> Optional[dict]:
        """What the task of the srun `pid` recorded (pid, create_time, node, step), once it has."""
        from epdctl.run.steptask import read_step_file

        path = self._step_files.get(pid)
        info = read_step_file(path) if path else None
        if info:
            self.steps[pid] = info["step"]
        return info

    def _step_of(self, pid: int) -> Optional[str]:
        if pid not in self.steps:
            self.step_info(pid)
        return self.steps.get(pid)

    def signal_group(self, pgid: int, sig: int) -> None:
        from epdctl.run.slurm import signal_step

        step = self._step_of(pgid)
        if step is None:  # not a step (the proxy), or its task has not started: srun ends it
            return super().signal_group(pgid, sig)
        signal_step(step, signal.Signals(sig).name[3:])
        if sig == signal.SIGKILL:
            super().signal_group(pgid, sig)

    def signal(self, proc: psutil.Process, sig: int) -> None:
        if sig != signal.SIGKILL and self._step_of(proc.pid) is not None:
            return self.signal_group(proc.pid, sig)
        super().signal(proc, sig)

    def end_run(self, run_token: str) -> list[str]:
        """After the local teardown: every step of the run ended through Slurm and checked gone."""
        from epdctl.run.slurm import end_steps

        return end_steps(self.job_id, run_token)
