"""The argparse parser of the passthrough commands (bench, sweep, calibrate)."""

from __future__ import annotations

import argparse

from epdctl.errors import EXIT_USAGE, EpdctlError


class CommandParser(argparse.ArgumentParser):
    """A usage error is one line, `COMMAND: message`, and exit 2, as every epdctl usage error."""

    def error(self, message: str):
        raise EpdctlError(f"{self.prog.split()[-1]}: {message}", EXIT_USAGE)
