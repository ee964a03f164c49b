"""Guardrails of the A/B test: each variant's server error rate and p99 latency, held against limits.

A treatment that wins on conversion but answers slowly or fails more is not shipped: the
verdict (:func:`shoprank.experiment.report.verdict`) reads the shoppers' behaviour only, so
:func:`with_guardrails` turns a "ship B" into "keep A" when B breaches a limit. The figures come
from where answers leave the app, the ingress's request middleware
(:class:`shoprank.serving.metrics.RequestMetrics`): per variant the latencies of its last
``serve.guardrail_window`` answers to ``/search`` and ``/recommend`` and how many were a 5xx (a
4xx is the client's error, not the variant's). They are the answering ingress replica's own, so
with several ingress replicas each report reads a sample of the traffic (Serve spreads requests
evenly); Prometheus has the whole (docs/monitoring.md: the same limits are alerts there).
A variant with fewer than ``min_requests`` answers has figures but no breach: a p99 of a handful
of requests says nothing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GuardrailLimits:
    """What a variant must hold (``serve.guardrail_*``)."""

    p99_ms: float
    error_rate: float
    min_requests: int


class GuardrailWindow:
    """The last ``size`` answers of each variant: latency and whether it was a server error. Thread-safe: the
    middleware records from Serve's event loop, the report reads from a request handler."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: dict[str, deque[tuple[float, bool]]] = {}
        self._lock = threading.Lock()

    def observe(self, variant: str, seconds: float, server_error: bool) -> None:
        with self._lock:
            self._answers.setdefault(variant, deque(maxlen=self.size)).append((seconds, server_error))

    def figures(self, limits: GuardrailLimits) -> dict[str, dict[str, Any]]:
        """Per variant: answers, server errors, their rate, the p99 latency (ms) and the limits it breaches."""
        with self._lock:
            answers = {variant: list(window) for variant, window in self._answers.items()}
        found = {}
        for variant, window in sorted(answers.items()):
            latencies = np.array([seconds for seconds, _ in window]) * 1000.0
            errors = sum(failed for _, failed in window)
            rate = errors / len(window)
            p99 = float(np.percentile(latencies, 99))
            breached = []
            if len(window) >= limits.min_requests:
                if p99 > limits.p99_ms:
                    breached.append(f"p99 latency {p99:.0f} ms over {limits.p99_ms:.0f} ms")
                if rate > limits.error_rate:
                    breached.append(f"server error rate {rate:.2%} over {limits.error_rate:.2%}")
            found[variant] = {"requests": len(window), "errors": errors, "error_rate": rate, "p99_ms": p99,
                              "breached": breached}
        return found


def with_guardrails(verdict: Mapping[str, Any], guardrails: Mapping[str, Mapping[str, Any]],
                    control: str = "A") -> dict[str, Any]:
    """``verdict``, unless it ships a treatment (``ship <name>``) while that treatment breaches a guardrail: then
    keep ``control``."""
    decision = str(verdict["decision"])
    treatment = decision[len("ship "):] if decision.startswith("ship ") else None
    breached = (guardrails.get(treatment) or {}).get("breached") or [] if treatment else []
    if not breached:
        return dict(verdict)
    kept = {**verdict, "decision": f"keep {control}",
            "rule": f"guardrail: {treatment}'s {'; '.join(breached)} (else: {verdict['rule']})"}
    if "winner" in verdict:
        kept["winner"] = None
    return kept
