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


def _listeners() -> dict[int, int]:
    """Listening port -> pid, for the sockets psutil can see (our own user's, at least)."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return {}
    return {conn.laddr.port: conn.pid for conn in connections
            if conn.laddr and conn.status == psutil.CONN_LISTEN and conn.pid}


def _describe(pid: int) -> str:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        cmdline = "?"
    return f"pid {pid} ({cmdline[:80]})"


def busy_ports(claims: Iterable[tuple[int, str]]) -> list[str]:
    """For each (port, what) that is taken, a line naming the port, its user and its holder; the
    ports another epdctl topology holds share one line that says how to stop it."""
    from epdctl.run.state import topology_of

    problems: list[str] = []
    by_topology: dict[str, list[str]] = {}
    listeners: Optional[dict[int, int]] = None
    for port, what in claims:
        if port_is_free(port):
            continue
        listeners = _listeners() if listeners is None else listeners  # one scan of the sockets for all
        pid = listeners.get(port)
        topology = topology_of(pid) if pid else None
        if topology:
            by_topology.setdefault(topology, []).append(f"{port} ({what})")
        else:
            problems.append(f"port {port} ({what}) is already in use" + (f" by {_describe(pid)}" if pid else ""))
    for topology, ports in by_topology.items():
        subject = f"port {ports[0]} is" if len(ports) == 1 else f"ports {', '.join(ports)} are"
        problems.append(f"{subject} in use by the epdctl topology {topology!r}: `epdctl down {topology}` stops it")
    return problems
