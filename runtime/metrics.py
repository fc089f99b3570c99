"""Prometheus metrics and ``GET /nodes`` of a runtime server (a front, or its own only node).

Per node: runtimes by state, free slots, image pulls and their bytes, image cache bytes
and evictions, warm sandboxes and their hits and misses, payloads ready; and one start-to-ready histogram (seconds from ``/start`` to the
agent server answering). Values are read from the server's state at scrape time (a
custom collector), so there is nothing to keep in step. ``/metrics`` needs the API
key (``X-API-Key``, checked by the app's guard like every route; Prometheus sends it
with ``http_headers`` in its scrape config).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .placement import node_slots
from .service import RuntimeService

STATES = ("pending", "running", "ready", "paused", "failed", "crashloopbackoff")
BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 900)


def local_slots(cpus_per_factor: float, memory_mib_per_factor: float) -> int:
    """Slots of the machine this runs on (its CPUs, its memory)."""
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    return node_slots(len(os.sched_getaffinity(0)), mem_mib, cpus_per_factor, memory_mib_per_factor)


class _Collector:
    def __init__(self, manager: RuntimeService) -> None:
        self.manager = manager

    def collect(self):
        rows = self.manager.node_rows()
        runtimes = GaugeMetricFamily("imagefarm_runtime_runtimes", "runtimes by state and node", labels=["node", "state"])
        free = GaugeMetricFamily("imagefarm_runtime_free_slots", "free slots per node", labels=["node"])
        slots = GaugeMetricFamily("imagefarm_runtime_slots", "slots per node", labels=["node"])
        up = GaugeMetricFamily("imagefarm_runtime_node_up", "1 while the node reports", labels=["node"])
        pulls = CounterMetricFamily("imagefarm_runtime_image_pulls", "images pulled", labels=["node"])
        pbytes = CounterMetricFamily("imagefarm_runtime_image_pull_bytes", "compressed bytes of images pulled",
                                     labels=["node"])
        cache = GaugeMetricFamily("imagefarm_runtime_image_cache_bytes", "bytes of images in node storage",
                                  labels=["node"])
        evict = CounterMetricFamily("imagefarm_runtime_image_evictions", "idle images evicted", labels=["node"])
        hits = CounterMetricFamily("imagefarm_runtime_warm_hits", "starts handed a warm sandbox", labels=["node"])
        misses = CounterMetricFamily("imagefarm_runtime_warm_misses", "starts that found no warm sandbox to match",
                                     labels=["node"])
        warm = GaugeMetricFamily("imagefarm_runtime_warm_sandboxes", "warm sandboxes waiting for a start",
                                 labels=["node"])
        ready = GaugeMetricFamily("imagefarm_runtime_node_ready", "1 once the node holds its payloads",
                                  labels=["node"])
        for row in rows:
            n = row["node_id"]
            for state in STATES:
                runtimes.add_metric([n, state], row["runtimes"].get(state, 0))
            free.add_metric([n], row["free_slots"])
            slots.add_metric([n], row["slots"])
            up.add_metric([n], 1 if row["state"] == "up" else 0)
            st = row.get("stats") or {}
            pulls.add_metric([n], st.get("pulls", 0))
            pbytes.add_metric([n], st.get("pull_bytes", 0))
            cache.add_metric([n], st.get("cache_bytes", 0))
            evict.add_metric([n], st.get("evictions", 0))
            hits.add_metric([n], st.get("warm_hits", 0))
            misses.add_metric([n], st.get("warm_misses", 0))
            warm.add_metric([n], sum((row.get("warm") or {}).values()))
            ready.add_metric([n], 1 if row.get("ready") else 0)
        yield from (runtimes, free, slots, up, pulls, pbytes, cache, evict, hits, misses, warm, ready)


def add_metrics(app: FastAPI, manager: RuntimeService) -> None:
    registry = CollectorRegistry()
    ready = Histogram("imagefarm_runtime_start_to_ready_seconds", "seconds from /start to the agent server answering",
                      buckets=BUCKETS, registry=registry)
    manager.on_ready.append(lambda _rec, seconds: ready.observe(seconds))
    registry.register(_Collector(manager))

    @app.get("/metrics", tags=["server"], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
