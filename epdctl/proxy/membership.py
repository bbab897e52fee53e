"""The proxy's pool, changed while it serves (`epdctl scale`, `autoscale:`; docs/proxy.md, "A pool
that changes").

The supervisor writes the pool it wants to a file in the topology's state folder (0700, ours),
and the proxy (every worker of it) watches that file: no listener of any kind is opened for it,
so no client can reach it, and nothing needs a token. A new instance is probed once and then
takes traffic; a draining one takes no new work but finishes what it has; one that is gone from
the file leaves the pool once its last request is done. The proxy reports which version of the
file it serves (`epdctl_proxy_pool_version`) so the supervisor knows when a drain has begun.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from typing import Any, Optional

from yarl import URL

from epdctl.proxy.pool import Backend

log = logging.getLogger("epdctl.proxy")

MAX_POOL_BYTES = 1 << 20
WATCH_INTERVAL_S = 0.1
INSTANCE_NAME = re.compile(r"(encode|prefill|decode|pd)-[0-9]{1,4}")
POOL_ROLES = ("encode", "prefill", "decode")  # the proxy's pools (pd instances are its decode pool)


def read_pool_file(path: str) -> Optional[dict[str, Any]]:
    """The pool a supervisor wrote, or None (with the reason logged) when it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("pool file %s: cannot open (%s); keeping the pool", path, exc.strerror)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            log.warning("pool file %s: not a regular file of ours; keeping the pool", path)
            return None
        data = os.read(fd, MAX_POOL_BYTES + 1)
    finally:
        os.close(fd)
    try:
        if len(data) > MAX_POOL_BYTES:
            raise ValueError("too large")
        return check_pool(json.loads(data))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to be a pool (at start-up, uncaught)
        log.warning("pool file %s: %s; keeping the pool", path, exc)
        return None


def check_pool(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("version"), int) or not isinstance(data.get("roles"), dict):
        raise ValueError("not a pool (version, roles)")
    if isinstance(data["version"], bool) or not 0 <= data["version"] < 1 << 53:  # the gauge is a float
        raise ValueError("version: a count from 0 expected")
    roles: dict[str, list[tuple[str, str]]] = {}
    for role, entries in data["roles"].items():
        if role not in POOL_ROLES or not isinstance(entries, list) or not entries:
            raise ValueError(f"role {role!r}: a non-empty list of instances of encode, prefill or decode expected")
        members = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("url"), str):
                raise ValueError(f"role {role}: each instance has a name and a url")
            if not INSTANCE_NAME.fullmatch(entry["name"]):
                raise ValueError(f"role {role}: {entry['name'][:40]!r} is not an instance name")
            url = URL(entry["url"])
            if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query_string:
                raise ValueError(f"{entry['name']}: {entry['url'][:80]!r} is not an instance URL")
            members.append((entry["name"], entry["url"]))
        roles[role] = members
    draining = data.get("draining") or []
    if not isinstance(draining, list) or not all(isinstance(n, str) for n in draining):
        raise ValueError("draining: a list of instance names expected")
    return {"version": data["version"], "roles": roles, "draining": set(draining)}


class PoolWatcher:
    """Applies the pool file to a running proxy whenever it changes."""

    def __init__(self, proxy, path: str):
        self.proxy = proxy
        self.path = path
        self._seen: Optional[tuple] = None
        self._gone: list[Backend] = []  # out of the file, waiting for their last request

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a bad file or a bug here must never stop the proxy serving
                log.exception("pool file %s: not applied", self.path)
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def check(self) -> None:
        self._drop_finished()
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        pool = read_pool_file(self.path)
        if pool is not None:
            await self.apply(pool)

    async def apply(self, wanted: dict[str, Any]) -> None:
        proxy = self.proxy
        for pool in proxy.pools:
            members = wanted["roles"].get(pool.role)
            if members is None:
                continue
            current = {b.name: b for b in pool.backends}
            names = {name for name, _ in members}
            for name, url in members:
                backend = current.get(name)
                if backend is not None and backend.url != url.rstrip("/"):  # the same name elsewhere: a new one
                    pool.backends.remove(backend)
                    backend.draining = True
                    self._gone.append(backend)
                    backend = None
                if backend is None:
                    backend = Backend(url, pool.role, name)
                    backend.gauge = proxy.metrics.in_flight.labels(pool.role, name, backend.url)
                    await proxy.probe(backend)  # a new instance takes traffic once it answers
                    pool.backends.append(backend)
                    log.info("%s (%s) joined the %s pool", name, backend.url, pool.role)
                draining = name in wanted["draining"]
                if draining and not backend.draining:
                    log.info("%s (%s) is draining: no new requests (%d in flight)", name, backend.url, backend.in_flight)
                    proxy.metrics.drains.labels(pool.role).inc()
                backend.draining = draining
            for backend in list(pool.backends):
                if backend.name not in names:
                    backend.draining = True
                    pool.backends.remove(backend)
                    self._gone.append(backend)
                    log.info("%s (%s) left the %s pool", backend.name, backend.url, pool.role)
            proxy.metrics.pool_size.labels(pool.role).set(sum(1 for b in pool.backends if not b.draining))
        proxy.metrics.pool_version.set(wanted["version"])

    def _drop_finished(self) -> None:
        self._gone = [b for b in self._gone if b.in_flight > 0]
