"""Is a planned port free? And if not, who holds it?"""

from __future__ import annotations

import socket
from typing import Iterable, Optional

import psutil


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    # SO_REUSEADDR as servers set it: a port in TIME_WAIT is free for them, so it is for us.
    for family, address in ((socket.AF_INET, host), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def port_holder(port: int) -> Optional[str]:
    """'pid N (command line)' of the process listening on `port`, when psutil can tell."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())[:120]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                cmdline = "?"
            return f"pid {conn.pid} ({cmdline})"
    return None


def busy_ports(claims: Iterable[tuple[int, str]]) -> list[str]:
    """For each (port, what) that is taken, one line naming the port, its user and its holder."""
    problems = []
    for port, what in claims:
        if not port_is_free(port):
            holder = port_holder(port)
            problems.append(f"port {port} ({what}) is already in use" + (f" by {holder}" if holder else ""))
    return problems
