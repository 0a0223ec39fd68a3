"""Prometheus metrics with prometheus-client: one registry per app (tests build many apps).

Per-request numbers (latency, queue time, time to first token, time per output token, token
counts, batch sizes) are observed as they happen; serving state (running and waiting
requests, versions, swaps) and round numbers from the database are read at scrape time by a
custom collector. Names follow vLLM's (`vllm:e2e_request_latency_seconds` →
`selflm_e2e_request_latency_seconds`) and TGI's (`tgi_request_failure{err}` →
`selflm_request_failure_total{err}`); docs/compatibility.md has the map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.engine.interface import GenerationResult
from core.db.models import RoundMetric, UpdateRound
from core.report import build_report

if TYPE_CHECKING:
    from app.state import AppState

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Status code → TGI-style error label of `selflm_request_failure_total{err}`.
ERROR_LABELS = {
    400: "validation",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    413: "too_large",
    422: "validation",
    429: "overloaded",
    503: "unavailable",
}


class ServingMetrics:
    """The app's metrics; `registry` is what GET /metrics exposes."""

    def __init__(self, state_reader: StateCollector | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "selflm_request_count", "Inference requests received.", ["route"], registry=r
        )
        self.success = Counter(
            "selflm_request_success", "Inference requests answered.", ["route"], registry=r
        )
        self.failure = Counter(
            "selflm_request_failure",
            "Inference requests failed, by error type.",
            ["route", "err"],
            registry=r,
        )
        self.e2e = Histogram(
            "selflm_e2e_request_latency_seconds",
            "Enqueue to last token, per generated sequence.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "selflm_request_queue_time_seconds",
            "Time waiting in the queue before decoding starts.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "selflm_time_to_first_token_seconds",
            "Enqueue to first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "selflm_time_per_output_token_seconds",
            "Mean time per output token after the first, per sequence.",
            buckets=TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Histogram(
            "selflm_request_prompt_tokens",
            "Prompt length in tokens.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.generation_tokens = Histogram(
            "selflm_request_generation_tokens",
            "Generated tokens per sequence.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "selflm_batch_size",
            "Rows decoding together when a batch starts or grows.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        if state_reader is not None:
            r.register(state_reader)

    def observe(self, result: GenerationResult) -> None:
        self.e2e.observe(result.total_s)
        self.queue.observe(result.queue_s)
        if result.first_token_s is not None:
            self.ttft.observe(result.first_token_s)
            if result.generated_tokens > 1:
                per = (result.total_s - result.first_token_s) / (result.generated_tokens - 1)
                self.tpot.observe(max(0.0, per))
        self.prompt_tokens.observe(result.prompt_tokens)
        self.generation_tokens.observe(result.generated_tokens)

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route).inc()
        if status < 400:
            self.success.labels(route).inc()
        else:
            self.failure.labels(route, ERROR_LABELS.get(status, "internal")).inc()


def observe_result(state: AppState, result: GenerationResult) -> None:
    metrics: ServingMetrics | None = state.extras.get("metrics")
    if metrics is not None:
        metrics.observe(result)


class StateCollector(Collector):
    """Serving state and round numbers, read when Prometheus scrapes."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only (the database may be down at start)

    def collect(self) -> Iterator[Metric]:
        engine = self.state.engine.health()
        watcher = self.state.extras.get("watcher")
        swap: dict[str, Any] = watcher.status() if watcher is not None else {}
        yield _gauge(
            "selflm_num_requests_running", "Rows decoding now.", engine.get("requests_running")
        )
        yield _gauge(
            "selflm_num_requests_waiting", "Requests queued for a batch.", engine.get("queue_depth")
        )
        yield _gauge(
            "selflm_serving_version",
            "Checkpoint version this replica serves.",
            engine.get("serving_version"),
        )
        for name, key, help_ in (
            ("selflm_requests", "requests_total", "Sequences admitted to decoding."),
            ("selflm_batches", "batches_total", "Decoding batches run."),
            ("selflm_generated_tokens", "generated_tokens_total", "Tokens generated."),
            ("selflm_swaps", "swaps_total", "Hot swaps completed."),
            ("selflm_refused_swaps", "refused_total", "Checkpoints refused for a swap."),
            (
                "selflm_shed",
                "shed_total",
                "Requests refused with 429 (queue full or wait too long).",
            ),
            ("selflm_cancelled", "cancelled_total", "Requests dropped: their client went away."),
            ("selflm_expired", "expired_total", "Requests dropped at their deadline (504)."),
            ("selflm_row_errors", "row_errors_total", "Requests that failed alone in a batch."),
        ):
            value = engine.get(key, swap.get(key, 0))
            yield CounterMetricFamily(name, help_, value=float(value or 0))
        try:
            yield from self._rounds()
        except Exception:  # a database outage must not take the serving metrics down
            log.warning("round metrics unavailable", exc_info=True)
            yield _gauge("selflm_database_up", "Whether round metrics could be read.", 0)
        else:
            yield _gauge("selflm_database_up", "Whether round metrics could be read.", 1)

    def _rounds(self) -> Iterator[Metric]:
        s = self.state
        lineage = s.settings.lineage
        report = build_report(s.db, lineage, limit=1)
        yield _gauge(
            "selflm_champion_version",
            "Champion version in the database.",
            report.get("champion_version"),
        )
        ppl = GaugeMetricFamily(
            "selflm_champion_perplexity", "Held-out perplexity of the champion.", labels=["split"]
        )
        for c in report["checkpoints"]:
            if c["status"] == "champion":
                for split in ("dev", "test", "valid"):
                    if f"{split}_ppl" in c["metrics"]:
                        ppl.add_metric([split], c["metrics"][f"{split}_ppl"])
        yield ppl
        with s.db.session() as db:
            by_status = db.execute(
                select(UpdateRound.status, UpdateRound.decision, func.count())
                .where(UpdateRound.lineage == lineage)
                .group_by(UpdateRound.status, UpdateRound.decision)
            ).all()
            stages = db.execute(
                select(RoundMetric.stage, func.count(), func.sum(RoundMetric.value))
                .join(UpdateRound, UpdateRound.id == RoundMetric.round_id)
                .where(
                    UpdateRound.lineage == lineage,
                    RoundMetric.name == "seconds",
                    RoundMetric.step.is_(None),
                )
                .group_by(RoundMetric.stage)
            ).all()
        rounds = GaugeMetricFamily(
            "selflm_rounds", "Update rounds by status and decision.", labels=["status", "decision"]
        )
        for status, decision, n in by_status:
            rounds.add_metric([str(status), str(decision or "none")], n)
        yield rounds
        stage = SummaryMetricFamily(
            "selflm_round_stage_seconds", "Seconds per round stage.", labels=["stage"]
        )
        for name, n, total in stages:
            stage.add_metric([str(name)], count_value=n, sum_value=float(total or 0.0))
        yield stage


def _gauge(name: str, help_: str, value: float | int | None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_)
    if value is not None:
        g.add_metric([], float(value))
    return g
