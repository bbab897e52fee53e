"""Backends of one role and how the proxy picks among them.

A role has a handful of instances, so picking is a linear scan (a heap would cost more in
bookkeeping than it saves). Load is the sum of in-flight request weights: media items for
encoders, prompt size for prefill/decode.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from typing import Iterable, Optional

from yarl import URL

AFFINITY_ENTRIES = 65536
# An affine encoder is skipped when it carries more than this over the least-loaded one.
AFFINITY_SLACK = 4.0


class NoBackend(Exception):
    def __init__(self, role: str):
        super().__init__(f"no healthy {role} instance")
        self.role = role


class Backend:
    __slots__ = ("url", "role", "name", "in_flight", "load", "healthy", "was_healthy", "ejected_at", "failures", "gauge",
                 "draining", "_endpoints")

    def __init__(self, url: str, role: str, name: str):
        self.url = url.rstrip("/")
        self.role = role
        self.name = name
        self.in_flight = 0
        self.load = 0.0
        self.healthy: Optional[bool] = None  # None: not probed yet (routable, optimistically)
        self.was_healthy = False  # ever healthy: only then is a failed probe news worth a warning
        self.ejected_at = 0.0
        self.failures = 0
        self.gauge = None  # the in-flight gauge child, set by the server
        self.draining = False  # leaving the pool (epdctl scale): finishes its requests, takes no new one
        self._endpoints: dict[str, URL] = {}

    def endpoint(self, path: str) -> URL:
        """The URL of `path` here, parsed once: the HTTP client takes a URL object as it is."""
        url = self._endpoints.get(path)
        if url is None:
            url = self._endpoints[path] = URL(self.url + path)
        return url

    @property
    def routable(self) -> bool:
        return self.healthy is not False and not self.draining

    def acquire(self, weight: float) -> None:
        self.in_flight += 1
        self.load += weight
        if self.gauge is not None:
            self.gauge.inc()

    def release(self, weight: float) -> None:
        self.in_flight -= 1
        self.load -= weight
        if self.gauge is not None:
            self.gauge.dec()

    def eject(self) -> None:
        self.healthy = False
        self.ejected_at = time.monotonic()
        self.failures += 1

    def state(self) -> str:
        return {None: "unknown", True: "healthy", False: "unhealthy"}[self.healthy]


class Pool:
    def __init__(self, role: str, urls: Iterable[str], policy: str, names: Optional[list[str]] = None):
        self.role = role
        urls = list(urls)
        names = names or [f"{role}-{i}" for i in range(len(urls))]
        self.backends = [Backend(url, role, name) for url, name in zip(urls, names)]
        self.policy = policy
        self._rr = itertools.count()
        self._affinity: OrderedDict[str, Backend] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.backends)

    def has_healthy(self) -> bool:
        return any(b.routable for b in self.backends)

    def pick(self, exclude: tuple = (), affinity_key: Optional[str] = None) -> Backend:
        candidates = [b for b in self.backends if b.routable and b not in exclude]
        if not candidates:
            # All ejected: try one anyway. A stale ejection then costs one fast connection
            # error, where refusing outright would fail every request until the next probe.
            candidates = [b for b in self.backends if b not in exclude and not b.draining]
        if not candidates:
            raise NoBackend(self.role)
        if len(candidates) == 1:
            chosen = candidates[0]
        elif self.policy == "round-robin":
            chosen = candidates[next(self._rr) % len(candidates)]
        else:
            # Least loaded; ties rotate so equal backends share the work.
            start = next(self._rr) % len(candidates)
            rotated = candidates[start:] + candidates[:start]
            chosen = min(rotated, key=lambda b: b.load)
        if affinity_key is not None:
            affine = self._affinity.get(affinity_key)
            if affine is not None and affine is not chosen and affine in candidates:
                if affine.load <= chosen.load + AFFINITY_SLACK:
                    chosen = affine
            self.remember(affinity_key, chosen)
        return chosen

    def remember(self, key: str, backend: Backend) -> None:
        affinity = self._affinity
        affinity[key] = backend
        affinity.move_to_end(key)
        if len(affinity) > AFFINITY_ENTRIES:
            affinity.popitem(last=False)
