"""The gateway's Prometheus metrics, in their own registry (served at /metrics).

Engines are labelled ``backend``: ``instance`` is Prometheus's own target label, and a
scraped ``instance`` would be renamed ``exported_instance``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)
TOKEN_BUCKETS = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "symram_gateway_requests", "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"], registry=r)
        self.ttft = Histogram(
            "symram_gateway_ttft_seconds",
            "Arrival to the first content chunk (streams) or to the whole reply",
            ["endpoint", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "symram_gateway_e2e_seconds", "Arrival to the last byte of the reply",
            ["endpoint", "backend", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.routes = Counter(
            "symram_gateway_route_decisions", "Routing decisions by backend and reason",
            ["backend", "reason"], registry=r)
        self.matched_tokens = Histogram(
            "symram_gateway_matched_prefix_tokens",
            "Prompt tokens the chosen backend held in its tiers at routing time",
            buckets=TOKEN_BUCKETS, registry=r)
        self.matched_tokens_total = Counter(
            "symram_gateway_matched_prefix_tokens_by_backend",
            "Matched prefix tokens routed to each backend", ["backend"], registry=r)
        self.upstream_errors = Counter(
            "symram_gateway_upstream_errors",
            "Failures talking to a backend (connect, timeout, broken stream, 5xx)",
            ["backend", "kind"], registry=r)
        self.rejections = Counter(
            "symram_gateway_rejections", "Requests refused by the gateway, by reason",
            ["reason"], registry=r)
        self.retries = Counter(
            "symram_gateway_retries", "Requests retried on another backend", ["backend"],
            registry=r)
        self.disconnects = Counter(
            "symram_gateway_client_disconnects",
            "Clients that went away before the reply ended (upstream request closed)",
            ["endpoint"], registry=r)
        self.prefetches = Counter(
            "symram_gateway_prefetches", "Prefetch-on-arrival calls by outcome",
            ["backend", "outcome"], registry=r)
        self.prefetched_blocks = Counter(
            "symram_gateway_prefetched_blocks", "Blocks promoted disk->DRAM before forwarding",
            ["backend"], registry=r)
        self.lookup_seconds = Histogram(
            "symram_gateway_lookup_seconds", "Tokenize + key computation + prefix lookup",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r)
        self.inflight = Gauge(
            "symram_gateway_inflight", "Requests in flight per backend", ["backend"],
            registry=r)
        self.healthy = Gauge(
            "symram_gateway_backend_healthy", "1 when the backend takes requests",
            ["backend"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
