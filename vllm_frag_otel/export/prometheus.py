"""The plugin's metrics on an HTTP /metrics endpoint of the engine process, for
Prometheus (or VictoriaMetrics, an OTel Collector's prometheus receiver...) to scrape.

OpenTelemetry's `PrometheusMetricReader` (the `prometheus` extra), with what the
plugin needs on top of it:

- the plugin's points: it does not record them through SDK instruments (see
  `telemetry.PointsExporter`); `add_points` adds the same ready-made points
  on every scrape that the OTLP path adds on every export;
- the same series names and labels as the OTLP path stored by Prometheus or
  VictoriaMetrics (deploy/prometheus/prometheus.yml): gauges in unit "1" get the
  `_ratio` suffix, and the resource attributes the dashboards select by
  (`host.name`, `service.instance.id`...) are labels on every series;
- its own `CollectorRegistry` and its own HTTP server thread (daemon): vLLM's
  prometheus_client registry (and PROMETHEUS_MULTIPROC_DIR) is never touched;
- one collection per scrape, scrapes one at a time; a provider's `force_flush`
  (the simulator's, the engine's stop) collects nothing for it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable
from contextlib import suppress

from prometheus_client import CollectorRegistry, start_http_server
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import Gauge, MetricsData, ResourceMetrics, ScopeMetrics

logger = logging.getLogger("vllm.frag_otel")

# resource attributes copied onto every series, as deploy/prometheus/prometheus.yml promotes them
# (the pool's points carry the engine's model_name and engine themselves: vLLM's label names)
PROMOTED_RESOURCE_ATTRIBUTES = (
    "service.name", "service.namespace", "service.instance.id", "service.version", "host.name",
)
THREAD_NAME = "vllm-frag-otel-prometheus"


def for_prometheus(metrics_data: MetricsData) -> MetricsData:
    """Gauges in unit "1" as "ratio" (the `_ratio` suffix Prometheus' and VictoriaMetrics'
    OTLP translation give them), and the promoted resource attributes on every point."""
    resource_metrics = []
    for rm in metrics_data.resource_metrics:
        promoted = {k: rm.resource.attributes[k] for k in PROMOTED_RESOURCE_ATTRIBUTES if k in rm.resource.attributes}
        scopes = []
        for sm in rm.scope_metrics:
            metrics = []
            for metric in sm.metrics:
                points = [dataclasses.replace(p, attributes={**promoted, **(p.attributes or {})})
                          for p in metric.data.data_points]
                unit = "ratio" if metric.unit == "1" and isinstance(metric.data, Gauge) else metric.unit
                metrics.append(dataclasses.replace(metric, unit=unit,
                                                   data=dataclasses.replace(metric.data, data_points=points)))
            scopes.append(ScopeMetrics(sm.scope, metrics, sm.schema_url))
        resource_metrics.append(ResourceMetrics(rm.resource, scopes, rm.schema_url))
    return MetricsData(resource_metrics)


class ScrapeReader(PrometheusMetricReader):
    """A PrometheusMetricReader on a private registry, collecting once per scrape."""

    def __init__(self, add_points: Callable[[MetricsData], MetricsData]):
        self.registry = CollectorRegistry(auto_describe=False)
        if "registry" in inspect.signature(PrometheusMetricReader.__init__).parameters:
            super().__init__(registry=self.registry)
        else:  # exporters before the registry argument register with prometheus_client's global REGISTRY
            from prometheus_client import REGISTRY

            super().__init__()
            REGISTRY.unregister(self._collector)
            self.registry.register(self._collector)
        self._add_points = add_points
        self._scrape_lock = threading.Lock()
        self._local = threading.local()
        self._failed = False
        self.server = None
        self.thread: threading.Thread | None = None
        translate = self._collector.collect

        def collect():  # what the registry calls on each scrape
            with self._scrape_lock:  # scrapes share the collector's queue: one at a time
                self._local.scraping = True
                try:
                    families = list(translate())
                except Exception as exc:  # never a traceback in vLLM's log: an empty answer
                    if not self._failed:
                        self._failed = True
                        logger.warning("vllm-frag-otel: a Prometheus scrape failed (%s: %s); the scrape got no "
                                       "metrics.", type(exc).__name__, exc)
                    families = []
                finally:
                    self._local.scraping = False
                return families

        self._collector.collect = collect

    def collect(self, timeout_millis: float = 10_000) -> None:
        # the MeterProvider's force_flush collects from every reader: only a scrape reads this one
        if getattr(self._local, "scraping", False):
            super().collect(timeout_millis=timeout_millis)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> None:
        if metrics_data is not None:
            super()._receive_metrics(for_prometheus(self._add_points(metrics_data)), timeout_millis, **kwargs)

    def serve(self, host: str, port: int) -> None:
        """Listen on host:port (raises OSError, e.g. when the port is in use)."""
        started = start_http_server(port, addr=host, registry=self.registry)
        if isinstance(started, tuple):  # prometheus_client >= 0.20 returns (server, thread)
            self.server, self.thread = started
            self.thread.name = THREAD_NAME
            _SERVERS.add(self.server)

    @property
    def address(self) -> tuple[str, int] | None:
        return self.server.server_address[:2] if self.server is not None else None

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        with suppress(KeyError):
            self.registry.unregister(self._collector)
        server, self.server = self.server, None
        if server is not None:
            if self.thread is not None and self.thread.is_alive():
                server.shutdown()  # the serving loop ends within its 0.5 s poll
            server.server_close()
            _SERVERS.discard(server)


_SERVERS: weakref.WeakSet = weakref.WeakSet()


def _close_in_child() -> None:
    """A forked child does not serve (no thread followed it) and must not keep the port."""
    for server in list(_SERVERS):
        with suppress(OSError):
            server.socket.close()
    _SERVERS.clear()


os.register_at_fork(after_in_child=_close_in_child)
