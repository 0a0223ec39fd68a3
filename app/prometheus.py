"""Prometheus text exposition of serving and round metrics (GET /metrics?format=prometheus)."""

from __future__ import annotations

from typing import Any


def _line(name: str, value: float | int | None, labels: dict[str, str] | None = None) -> str:
    if value is None:
        return ""
    lab = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    return f"{name}{{{lab}}} {float(value)}\n" if lab else f"{name} {float(value)}\n"


def exposition(report: dict[str, Any], engine: dict[str, Any], swap: dict[str, Any]) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, rows: list[str]) -> None:
        out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{''.join(rows)}")

    metric(
        "selflm_serving_version",
        "gauge",
        "Checkpoint version this replica serves.",
        [_line("selflm_serving_version", engine.get("serving_version"))],
    )
    metric(
        "selflm_champion_version",
        "gauge",
        "Champion version in the database.",
        [_line("selflm_champion_version", report.get("champion_version"))],
    )
    for key, help_ in (
        ("requests_total", "Generation requests served."),
        ("batches_total", "Decoding batches run."),
        ("generated_tokens_total", "Tokens generated."),
    ):
        metric(f"selflm_{key}", "counter", help_, [_line(f"selflm_{key}", engine.get(key))])
    metric(
        "selflm_queue_depth",
        "gauge",
        "Requests waiting for a batch.",
        [_line("selflm_queue_depth", engine.get("queue_depth"))],
    )
    metric(
        "selflm_requests_running",
        "gauge",
        "Requests decoding in a batch now.",
        [_line("selflm_requests_running", engine.get("requests_running"))],
    )
    for key, help_ in (
        ("shed_total", "Requests refused with 429 (queue full or wait too long)."),
        ("cancelled_total", "Requests dropped because their client went away."),
        ("expired_total", "Requests dropped at their deadline (504)."),
        ("row_errors_total", "Requests that failed alone inside a batch."),
    ):
        metric(f"selflm_{key}", "counter", help_, [_line(f"selflm_{key}", engine.get(key))])
    for key, help_ in (
        ("swaps_total", "Hot swaps completed."),
        ("refused_total", "Checkpoints refused (missing, checksum, load)."),
    ):
        metric(f"selflm_{key}", "counter", help_, [_line(f"selflm_{key}", swap.get(key, 0))])
    counts: dict[tuple[str, str], int] = {}
    for r in report["rounds"]:
        k = (r["status"], r["decision"] or "none")
        counts[k] = counts.get(k, 0) + 1
    metric(
        "selflm_rounds",
        "gauge",
        "Rounds by status and decision (latest 1000).",
        [_line("selflm_rounds", n, {"status": s, "decision": d}) for (s, d), n in counts.items()],
    )
    rows = []
    for c in report["checkpoints"]:
        for name in ("dev_ppl", "test_ppl"):
            if name in c["metrics"]:
                rows.append(
                    _line(
                        "selflm_checkpoint_perplexity",
                        c["metrics"][name],
                        {"version": str(c["version"]), "split": name[:-4]},
                    )
                )
    metric("selflm_checkpoint_perplexity", "gauge", "Held-out perplexity per checkpoint.", rows)
    return "".join(out)
