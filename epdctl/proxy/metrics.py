"""The proxy's Prometheus metrics (docs/proxy.md): one registry per process; with several workers
/metrics sums them from a folder (prometheus_client's multiprocess mode, proxy/workers.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("epdctl_proxy_requests", "Requests by route and outcome.", ["route", "outcome"],
                                registry=self.registry)
        # livesum: with several workers, the sum over the live ones (ignored with one process).
        self.in_flight = Gauge("epdctl_proxy_in_flight", "Requests in flight per instance.", ["role", "instance", "url"],
                               registry=self.registry, multiprocess_mode="livesum")
        self.stage = Histogram("epdctl_proxy_stage_seconds",
                               "Per-request stage latency: encode (all items), prefill, decode_ttft (to the first byte).",
                               ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.ec_reused = Counter("epdctl_proxy_ec_reused_items", "Media items whose EC file existed, so no encoder was called.",
                                 registry=self.registry)
        self.retries = Counter("epdctl_proxy_retries", "Calls retried on another instance after a failure.", ["role"],
                               registry=self.registry)
        self.ejections = Counter("epdctl_proxy_ejections", "Instances taken out of rotation after a failure.", ["role"],
                                 registry=self.registry)
        # The pool as `epdctl scale`/autoscale changed it: what the supervisor waits on to drain.
        self.pool_size = Gauge("epdctl_proxy_pool_instances", "Instances taking new requests, per role.", ["role"],
                               registry=self.registry, multiprocess_mode="livemax")
        self.pool_version = Gauge("epdctl_proxy_pool_version", "The version of the pool file every worker serves.",
                                  registry=self.registry, multiprocess_mode="livemin")
        self.drains = Counter("epdctl_proxy_drains", "Instances set to drain (no new requests).", ["role"],
                              registry=self.registry)
        # Label lookups take a lock; resolve each child once.
        self.stage_encode = self.stage.labels("encode")
        self.stage_prefill = self.stage.labels("prefill")
        self.stage_decode = self.stage.labels("decode_ttft")
        self._outcomes: dict[tuple[str, str], Any] = {}

    def count(self, route: str, outcome: str) -> None:
        child = self._outcomes.get((route, outcome))
        if child is None:
            child = self._outcomes[(route, outcome)] = self.requests.labels(route, outcome)
        child.inc()


@dataclass
class Outcome:
    """How a request ended, for the requests counter. Set as soon as it is known: a client that
    hangs up right after the last byte cancels the handler while the stream is being closed."""

    value: str = "cancelled"


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "upstream_error"
