"""The unit tier keeps its promise: a test here cannot start a process or use the network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import StartsAProcess


def test_a_unit_test_cannot_start_a_process():
    with pytest.raises(StartsAProcess):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(StartsAProcess):
        os.fork()


def test_a_unit_test_cannot_bind_or_connect():
    with socket.socket() as sock, pytest.raises(StartsAProcess):
        sock.bind(("127.0.0.1", 0))
    with socket.socket() as sock, pytest.raises(StartsAProcess):
        sock.connect(("127.0.0.1", 9))
