"""How many accelerators this machine has, when that can be told cheaply."""

from __future__ import annotations

import os
import re
import shutil
from typing import Mapping, Optional

from epdctl.errors import EXIT_USAGE, EpdctlError


def detect_device_count(platform: str, environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The number of devices of `platform`, or None when it cannot be known here.

    `EPDCTL_DEVICE_COUNT` overrides detection (for planning a GPU topology on a laptop, and
    for tests). None means "don't check device ids against the machine".
    """
    environ = os.environ if environ is None else environ
    override = environ.get("EPDCTL_DEVICE_COUNT")
    if override:
        # Ignoring a typo would quietly turn the device check off.
        if not re.fullmatch(r"[0-9]+", override.strip()):
            raise EpdctlError(f"EPDCTL_DEVICE_COUNT: must be a whole number of devices, 0 or more (got {override!r})", EXIT_USAGE)
        return int(override)
    tool = {"cuda": ["nvidia-smi", "-L"], "npu": ["npu-smi", "info", "-m"]}.get(platform)
    if tool is None or shutil.which(tool[0]) is None:
        return None
    import subprocess  # only here: `validate` and `plan` of a cpu topology start faster without it

    try:
        out = subprocess.run(tool, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    if platform == "npu":
        return count_npu_chips(out.stdout)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def count_npu_chips(text: str) -> Optional[int]:
    """The devices ASCEND_RT_VISIBLE_DEVICES numbers, from `npu-smi info -m`: one row per chip,
    `NPU ID  Chip ID  Chip Logic ID  Chip Name`; a chip with a logic id is a device (an Mcu row
    has `-`). None when no such table is found (an npu-smi that prints otherwise)."""
    rows = [line.split() for line in text.splitlines()]
    if not any(row[:2] == ["NPU", "ID"] for row in rows):
        return None
    return sum(1 for row in rows if len(row) >= 4 and row[0].isdigit() and row[1].isdigit() and row[2].isdigit())
