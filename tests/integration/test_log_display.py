"""Log lines are shown safe for a terminal: a child's log may quote what clients sent."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from epdctl.run.logfiles import display

from conftest import assert_no_orphans, epdctl, write_sim_topology

HOSTILE = {
    # name: (line as written, shown without colour, shown with colour)
    "clipboard (OSC 52)": ("x\x1b]52;c;ZWNobyBoYWNrZWQ=\x07y", "xy", "xy"),
    "window title": ("a\x1b]0;pwned\x1b\\b", "ab", "ab"),
    "reset (ESC c)": ("before\x1bcafter", "beforeafter", "beforeafter"),
    "cursor and erase": ("\x1b[2J\x1b[1;1Hfake prompt$ ", "fake prompt$ ", "fake prompt$ "),
    "save and restore": ("\x1b7over\x1b8", "over", "over"),
    "bell and NUL": ("ding\x07 nul\x00", "ding\\x07 nul\\x00", "ding\\x07 nul\\x00"),
    "8-bit CSI": ("\x9b31mred", "\\x9b31mred", "\\x9b31mred"),
    "bidi override": ("abc\u202edef", "abc\\u202edef", "abc\\u202edef"),
    "lone ESC at the end": ("end\x1b", "end", "end"),
    "progress bar": ("Loading 10%\rLoading 50%\rLoading 100%\r", "Loading 100%", "Loading 100%"),
    "colours": ("\x1b[32m INFO\x1b[0m ok", " INFO ok", "\x1b[32m INFO\x1b[0m ok\x1b[0m"),
    "plain": ("hello\tworld", "hello\tworld", "hello\tworld"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_display_drops_escapes_and_shows_controls_escaped(name):
    written, plain, coloured = HOSTILE[name]
    assert display(written) == plain
    assert display(written, colour=True) == coloured


def _logs_on_a_terminal(*args: str, env: dict) -> str:
    """`epdctl logs ...` with its stdout on a pseudo-terminal, as a user at a shell sees it."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "epdctl", "logs", *args], stdout=child, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env})
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    return out.decode(errors="replace")


def test_logs_never_print_a_childs_escape_sequences(tmp_path, state_dir):
    topology, ports = write_sim_topology(tmp_path, "agg", name="esc")
    epdctl("up", "-d", str(topology), check=0)
    try:
        # What the child wrote to its log (as a backend quoting a client would).
        with open(state_dir / "esc" / "pd-0.log", "ab") as log:
            log.write("\n".join(written for written, _, _ in HOSTILE.values()).encode() + b"\n")
        for args in (("esc", "pd-0"), ("esc", "pd-0", "--tail", str(len(HOSTILE)))):
            shown = epdctl("logs", *args, check=0).stdout
            for written, plain, _ in HOSTILE.values():
                assert f"pd-0 | {plain}\n" in shown, (plain, shown[-2000:])
            assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
        # On a terminal the colours stay (and are reset at the line's end); NO_COLOR drops them.
        tty = _logs_on_a_terminal("esc", "pd-0", "--tail", str(len(HOSTILE)), env={})
        assert "\x1b[32m INFO\x1b[0m ok\x1b[0m" in tty and "\x1b]" not in tty and "\x1bc" not in tty, tty
        tty = _logs_on_a_terminal("esc", "pd-0", "--tail", str(len(HOSTILE)), env={"NO_COLOR": "1"})
        assert " INFO ok" in tty and "\x1b" not in tty, tty
    finally:
        epdctl("down", "esc", check=0)
        assert_no_orphans(str(state_dir), list(ports.values()))
