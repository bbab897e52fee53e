"""The one error type library code raises (docs/design.md, Style rules)."""

from __future__ import annotations

# Exit codes (docs/design.md, Contracts).
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_NOTHING_RUNNING = 3


class EpdctlError(Exception):
    """A failure the user can act on. The CLI prints it as-is and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME, *, one_per_line: bool = False):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        # Each line of `message` is an error of its own (validate's report of every problem), so
        # each is printed as one; otherwise the lines after the first are its detail (a log tail).
        self.one_per_line = one_per_line

    def __str__(self) -> str:
        return self.message
