"""The task of a `launcher: slurm` job step: record who it is, then become the instance.

`python -m epdctl.run.steptask STEP_FILE -- ARGV...` writes its pid, create_time, node and step
id to STEP_FILE (in the topology's state folder, which the nodes share) and then execs ARGV, so
the instance keeps that pid: what `status` shows and what the step's signals reach.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

STEP_KEYS = ("pid", "create_time", "node", "step")


def read_step_file(path: Path) -> Optional[dict]:
    """The step's record, or None while it is not written yet (or is not one of ours)."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(key in data for key in STEP_KEYS):
        return None
    return data


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m epdctl.run.steptask STEP_FILE -- ARGV...", file=sys.stderr)
        return 2
    import psutil

    from epdctl.run.state import write_json_atomic

    step_file, command = Path(argv[0]), argv[2:]
    me = psutil.Process()
    record = {"pid": me.pid, "create_time": me.create_time(),
              "node": os.environ.get("SLURMD_NODENAME") or os.uname().nodename,
              "step": f"{os.environ.get('SLURM_JOB_ID', '?')}.{os.environ.get('SLURM_STEP_ID', '?')}"}
    write_json_atomic(step_file, record)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"epdctl: cannot start {command[0]!r} on {record['node']}: {exc.strerror or exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
