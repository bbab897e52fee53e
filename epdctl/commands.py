"""Where the programs epdctl runs live on this machine (kept out of plan.py, which does no I/O)."""

from __future__ import annotations

import os
import shutil
import sys


def python_command() -> str:
    """This interpreter: it runs epdctl's own proxy and the sim."""
    return sys.executable


def router_command() -> str:
    """vllm-router (proxy.impl vllm-router): the one installed beside epdctl (`epdctl[router]`) in
    this interpreter's environment, which need not be on PATH; else the one on PATH; else the bare
    name, which `up` then reports as not found."""
    beside = os.path.join(os.path.dirname(sys.executable), "vllm-router")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("vllm-router") or "vllm-router"
