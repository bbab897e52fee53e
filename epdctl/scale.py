"""`epdctl scale NAME ROLE=N ...`: ask a running topology's supervisor to grow or drain a role,
and wait until it has (run/scaler.py does it; run/scaling.py says what it means)."""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from typing import Optional

from epdctl.errors import EXIT_RUNTIME, EXIT_USAGE, EpdctlError
from epdctl.config.schema import MAX_INSTANCES
from epdctl.run.scaling import SCALE_FILE
from epdctl.run.state import StateDir, elsewhere, verified_process, write_json_atomic

ASSIGNMENT = re.compile(r"(encode|prefill|decode|pd)=([0-9]{1,3})")
POLL_S = 0.1


def parse_counts(assignments: list[str]) -> dict[str, int]:
    if not assignments:
        raise EpdctlError("scale: give at least one ROLE=N (e.g. encode=3)", EXIT_USAGE)
    counts: dict[str, int] = {}
    for word in assignments:
        match = ASSIGNMENT.fullmatch(word.strip())
        if not match:
            raise EpdctlError(f"scale: {word[:40]!r}: ROLE=N expected, ROLE one of encode, prefill, decode, pd "
                              f"and N from 1 to {MAX_INSTANCES}", EXIT_USAGE)
        role, count = match.group(1), int(match.group(2))
        if not 1 <= count <= MAX_INSTANCES:
            raise EpdctlError(f"scale: {role}={count}: from 1 to {MAX_INSTANCES} instances", EXIT_USAGE)
        if role in counts:
            raise EpdctlError(f"scale: {role} is given twice", EXIT_USAGE)
        counts[role] = count
    return counts


def scale(name: str, assignments: list[str], timeout: float, out=None) -> int:
    out = out or sys.stdout
    counts = parse_counts(assignments)
    state_dir = StateDir(name)
    state = state_dir.read()
    if state is None:
        raise EpdctlError(f"no topology named {name!r} is up (`epdctl status` lists them)", EXIT_RUNTIME)
    sup = state.get("supervisor") or {}
    if elsewhere(sup) is None and verified_process(sup.get("pid"), sup.get("create_time")) is None:
        raise EpdctlError(f"{name}: its supervisor is not running, so nothing can scale it "
                          f"(`epdctl up {state.get('source') or name}` adopts its processes first)", EXIT_RUNTIME)
    job = secrets.token_hex(4)
    deadline = time.monotonic() + timeout
    _put_request(state_dir, job, counts, deadline)
    wanted = ", ".join(f"{role}={count}" for role, count in counts.items())
    print(f"epdctl: scaling {name} to {wanted} (request {job})", file=out, flush=True)
    shown = 0
    while time.monotonic() < deadline:
        record = _job(state_dir, job)
        if record is not None:
            for line in record.get("done", [])[shown:]:
                print(f"  {line}", file=out, flush=True)
            shown = len(record.get("done", []))
            if record.get("status") == "done":
                print(f"epdctl: {name} scaled to {wanted}" + (f" ({record['reason']})" if record.get("reason") else ""),
                      file=out)
                return 0
            if record.get("status") in ("refused", "failed"):
                code = EXIT_USAGE if record["status"] == "refused" else EXIT_RUNTIME
                raise EpdctlError(f"scale {name}: {record['status']}: {record.get('reason')}", code)
        elif not state_dir.exists():
            raise EpdctlError(f"{name} went down while scaling", EXIT_RUNTIME)
        time.sleep(POLL_S)
    try:
        os.unlink(state_dir.path / SCALE_FILE)  # not taken yet: nobody will
    except OSError:
        pass
    raise EpdctlError(f"scale {name}: not done after {timeout:g}s (`epdctl status {name}` shows where it is)", EXIT_RUNTIME)


def _put_request(state_dir: StateDir, job: str, counts: dict[str, int], deadline: float) -> None:
    """Our request at SCALE_FILE, never over another client's that the supervisor has not taken yet
    (a rename would replace it, and that client would wait for an answer that never comes): written
    beside, then linked into place, which fails while one is there."""
    path = state_dir.path / SCALE_FILE
    beside = state_dir.path / f"{SCALE_FILE}.{job}"
    write_json_atomic(beside, {"id": job, "counts": counts})
    try:
        while True:
            try:
                os.link(beside, path)
                return
            except FileExistsError:
                if not os.path.isfile(path) or os.path.islink(path):
                    raise EpdctlError(f"{path}: exists and is not a scale request; remove it", EXIT_RUNTIME) from None
                if time.monotonic() >= deadline:
                    raise EpdctlError(f"scale {state_dir.name}: another scale request was not taken in time", EXIT_RUNTIME)
                time.sleep(POLL_S)
    finally:
        try:
            os.unlink(beside)
        except OSError:
            pass


def _job(state_dir: StateDir, job: str) -> Optional[dict]:
    try:
        state = state_dir.read() or {}
    except EpdctlError:
        return None
    scale = state.get("scale") or {}
    for record in (scale.get("job") or {}, scale.get("refused") or {}):  # a refusal beside a job in progress
        if isinstance(record, dict) and record.get("id") == job:
            return record
    return None
