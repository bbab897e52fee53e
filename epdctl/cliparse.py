"""The argparse parser of the passthrough commands (bench, sweep, calibrate, proxy), and the ranges
of every number on the command line."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional, Union

from epdctl.errors import EXIT_USAGE, EpdctlError

Number = Union[int, float]


class CommandParser(argparse.ArgumentParser):
    """A usage error is one line, `COMMAND: message`, and exit 2, as every epdctl usage error."""

    def error(self, message: str):
        raise EpdctlError(f"{self.prog.split()[-1]}: {message}", EXIT_USAGE)


# Every number on the command line has a range: NaN, infinities and values far past any use are
# usage errors before anything starts, not an OverflowError, a MemoryError or a timer that never
# fires minutes later.


def range_problem(value: Number, low: Number, high: Number, above: bool = False) -> Optional[str]:
    """Why `value` is not in [low, high] (or (low, high] when `above`), or None."""
    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high or above and value == low:
        bounds = f"more than {_shown(low)} and at most" if above else f"between {_shown(low)} and"
        return f"must be {bounds} {_shown(high)} (got {_shown(value)})"
    return None


def _shown(value: Number) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def parse_number(text: str, kind: type, low: Number, high: Number, above: bool = False) -> Number:
    """`text` as an int or a float (`kind`) in range; ValueError with the reason when it is not."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{'an integer' if kind is int else 'a number'} expected (got {text!r})") from None
    problem = range_problem(value, low, high, above)
    if problem:
        raise ValueError(problem)
    return value


def number(kind: type, low: Number, high: Number, above: bool = False) -> Callable[[str], Number]:
    """An argparse `type=`: parse_number."""

    def parse(text: str) -> Number:
        try:
            return parse_number(text, kind, low, high, above)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def option(flag: str, text: Optional[str], kind: type, low: Number, high: Number,
           above: bool = False) -> Optional[Number]:
    """A number option of a typer command, which takes it as text so that `nan`, `abc` or `1e999` are
    one-line usage errors (exit 2) like every other: parse_number. None stays None."""
    if text is None:
        return None
    try:
        return parse_number(text, kind, low, high, above)
    except ValueError as exc:
        raise EpdctlError(f"{flag}: {exc}", EXIT_USAGE) from None
