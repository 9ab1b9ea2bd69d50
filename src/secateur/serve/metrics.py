"""The gateway's Prometheus metrics, in a registry of its own (one per app, so two gateways in one
process — tests, a Ray replica — never share or collide on the global registry).

=============================================  =========  ===========================================
``secateur_request_seconds``                   histogram  whole request, by variant, decision, endpoint
``secateur_time_to_first_token_seconds``       histogram  by variant and decision
``secateur_generated_tokens_total``            counter    by variant (tokens/s: ``rate()`` of it)
``secateur_prompt_tokens_total``               counter    by variant
``secateur_requests_total``                    counter    by variant, decision, endpoint, status
``secateur_errors_total``                      counter    by kind (the error object's ``code``)
``secateur_escalations_total``                 counter    a request retried or escalated, by from/to tier
``secateur_queue_depth``                       gauge      sequences or texts waiting, by variant
``secateur_batch_size``                        histogram  rows per forward pass, by variant and phase
                                                          (prefill, decode, embed)
``secateur_in_flight``                         gauge      requests being answered
``secateur_resident_memory_bytes``             gauge      the process's RSS, read at each scrape
=============================================  =========  ===========================================
"""

from __future__ import annotations

import os
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def resident_bytes() -> float:
    """This process's resident set size in bytes (``/proc/self/statm``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.latency = Histogram("secateur_request_seconds", "Request latency", ["variant", "decision", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("secateur_time_to_first_token_seconds", "Time to the first generated token",
                              ["variant", "decision"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("secateur_generated_tokens", "Generated tokens", ["variant"], registry=r)
        self.prompt_tokens = Counter("secateur_prompt_tokens", "Prompt tokens read", ["variant"], registry=r)
        self.requests = Counter("secateur_requests", "Requests answered",
                                ["variant", "decision", "endpoint", "status"], registry=r)
        self.errors = Counter("secateur_errors", "Error answers by kind", ["kind"], registry=r)
        self.escalations = Counter("secateur_escalations", "Requests retried or escalated to another tier",
                                   ["from_tier", "to_tier", "decision"], registry=r)
        self.queue = Gauge("secateur_queue_depth", "Sequences or texts waiting for a batch", ["variant"], registry=r)
        self.batch = Histogram("secateur_batch_size", "Rows per forward pass", ["variant", "phase"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("secateur_in_flight", "Requests being answered", registry=r)
        self.rss = Gauge("secateur_resident_memory_bytes", "Resident memory of the gateway process", registry=r)
        self.rss.set_function(resident_bytes)

    def observe(self, what: str, variant: str, value: float) -> None:
        """The engines' hook (called from worker threads; prometheus-client is thread-safe)."""
        if what == "queue":
            self.queue.labels(variant).set(value)
        else:
            self.batch.labels(variant, what).observe(value)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["Metrics", "resident_bytes"]
