"""Follow a round live: one progress bar per stage, then the decision and headline numbers.

Reads `GET /update-rounds/{id}`: `stage`, `status` and `progress` always; `stage_progress`,
`progress_detail` ({"done", "total", "unit", "loss"...}) and `eta_s` where the server reports
progress inside a stage. Without those, a stage's bar jumps to 100% when the round leaves it.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from selflm.client import ApiError, Client
from selflm.commands.common import Exit

STAGES = ("generate", "select", "update", "evaluate", "meta_step", "decide")
TERMINAL = ("succeeded", "failed", "cancelled")


def stage_fractions(body: dict[str, Any]) -> dict[str, float]:
    """How far each stage is (0..1) according to one round body."""
    if body.get("status") == "succeeded" or body.get("stage") == "done":
        return dict.fromkeys(STAGES, 1.0)
    stage = body.get("stage")
    current = STAGES.index(stage) if stage in STAGES else -1
    inside = body.get("stage_progress")
    inside = min(1.0, max(0.0, float(inside))) if isinstance(inside, int | float) else 0.0
    return {
        s: 1.0 if i < current else (inside if i == current else 0.0) for i, s in enumerate(STAGES)
    }


def describe_detail(body: dict[str, Any]) -> str:
    """`120/480 tokens · loss 2.310` from progress_detail, for the current stage's bar."""
    d = body.get("progress_detail")
    if not isinstance(d, dict):
        return ""
    parts = []
    if isinstance(d.get("done"), int | float) and isinstance(d.get("total"), int | float):
        parts.append(f"{d['done']:g}/{d['total']:g} {d.get('unit') or ''}".rstrip())
    for key, value in d.items():
        if key not in ("done", "total", "unit") and isinstance(value, int | float):
            parts.append(f"{key} {value:.4g}")
    return " · ".join(parts)


def exit_code(body: dict[str, Any]) -> Exit:
    if body.get("status") == "succeeded":
        return Exit.OK if body.get("decision") == "promoted" else Exit.REJECTED
    return Exit.ROUND_FAILED


class RoundView:
    """The bars of one round; bars only move forward."""

    def __init__(self, progress: Progress, round_id: int) -> None:
        self.progress = progress
        self.overall = progress.add_task(f"round {round_id}", total=100, detail="queued")
        self.tasks: dict[str, TaskID] = {
            s: progress.add_task(f"  {s}", total=100, detail="") for s in STAGES
        }
        self.shown = dict.fromkeys(STAGES, 0.0)

    def update(self, body: dict[str, Any]) -> None:
        fractions = stage_fractions(body)
        stage = body.get("stage")
        for s, task in self.tasks.items():
            self.shown[s] = max(self.shown[s], fractions[s])
            detail = describe_detail(body) if s == stage and body["status"] == "running" else ""
            if body["status"] in ("failed", "cancelled") and s == stage:
                detail = body["status"]
            self.progress.update(task, completed=round(100 * self.shown[s], 1), detail=detail)
        overall = float(body.get("progress") or 0.0)
        if body["status"] == "succeeded":
            overall = 1.0
        eta = body.get("eta_s")
        status = body["status"] + (f" · ETA {eta:.0f}s" if isinstance(eta, int | float) else "")
        self.progress.update(self.overall, completed=round(100 * overall, 1), detail=status)


def new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=32),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        refresh_per_second=8,
    )


def poll(client: Client, round_id: int, tries: int = 30, every: float = 1.0) -> dict[str, Any]:
    """One `GET /update-rounds/{id}`, riding out a restarting server (no answer or 503)."""
    for attempt in range(tries):
        try:
            return client.get_round(round_id)
        except ApiError as e:
            if e.status not in (0, 502, 503, 504) or attempt == tries - 1:
                raise
            time.sleep(every)
    raise AssertionError("unreachable")


def follow(client: Client, round_id: int, console: Console, interval: float) -> dict[str, Any]:
    """Show the round's bars until it ends; returns the final body (Ctrl-C propagates)."""
    with new_progress(console) as progress:
        view = RoundView(progress, round_id)
        while True:
            body = poll(client, round_id)
            view.update(body)
            if body["status"] in TERMINAL:
                return body
            time.sleep(interval)


def wait(client: Client, round_id: int, interval: float) -> dict[str, Any]:
    """Like `follow` with nothing drawn (for --json)."""
    while True:
        body = poll(client, round_id)
        if body["status"] in TERMINAL:
            return body
        time.sleep(interval)


def _num(metrics: dict[str, Any], stage: str, name: str) -> float | None:
    v = metrics.get(stage, {}).get(name)
    return float(v) if isinstance(v, int | float) else None


def headline(body: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(name, champion, candidate) rows of the round's headline numbers."""
    m = body.get("metrics") or {}
    rows: list[tuple[str, float | None, float | None]] = []
    for label, key in (
        ("dev perplexity", "dev_ppl"),
        ("test perplexity", "test_ppl"),
        ("distinct-2", "distinct_2"),
        ("repetition", "repetition_rate"),
    ):
        champ, cand = (
            _num(m, "evaluate", f"champion_{key}"),
            _num(m, "evaluate", f"candidate_{key}"),
        )
        if champ is not None or cand is not None:
            rows.append((label, champ, cand))
    return rows


def print_summary(body: dict[str, Any], console: Console) -> None:
    rid, status, decision = body["id"], body["status"], body.get("decision")
    if status == "succeeded" and decision == "promoted":
        console.print(
            f"[bold green]round {rid} promoted[/] → v{body.get('candidate_version')} "
            f"(parent v{body.get('base_version')})"
        )
    elif status == "succeeded":
        console.print(
            f"[bold yellow]round {rid} {decision}[/] (champion stays v{body.get('base_version')})"
        )
    else:
        console.print(f"[bold red]round {rid} {status}[/]: {body.get('error') or ''}")
    if body.get("reason"):
        console.print(f"reason: {body['reason']}", highlight=False)
    rows = headline(body)
    m = body.get("metrics") or {}
    if rows:
        table = Table(show_edge=False, box=None, pad_edge=False)
        table.add_column("metric")
        table.add_column(f"champion v{body.get('base_version')}", justify="right")
        table.add_column("candidate", justify="right")
        for label, champ, cand in rows:
            table.add_row(
                label,
                "" if champ is None else f"{champ:.4g}",
                "" if cand is None else f"{cand:.4g}",
            )
        console.print(table)
    eps = _num(m, "decide", "epsilon") or _num(m, "meta_step", "epsilon_chosen")
    secs = _num(m, "round", "seconds")
    extras = [f"ε {eps:g}" if eps is not None else "", f"{secs:.1f} s" if secs else ""]
    if any(extras):
        console.print(" · ".join(x for x in extras if x), highlight=False)
