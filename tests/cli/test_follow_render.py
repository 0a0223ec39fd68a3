"""How `--follow` draws a round body: progress inside a stage where the server reports it
(`stage_progress`, `progress_detail`, `eta_s`), stage boundaries where it does not."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from selflm.commands.follow import (
    RoundView,
    exit_code,
    new_progress,
    print_summary,
    stage_fractions,
)


def body(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": 7, "status": "running", "stage": "update", "progress": 0.3}
    return {**base, **kw}


def render(*bodies: dict[str, Any]) -> str:
    console = Console(record=True, width=120, force_terminal=False)
    progress = new_progress(console)
    view = RoundView(progress, 7)
    for b in bodies:
        view.update(b)
    console.print(progress.get_renderable())
    return console.export_text()


def test_inside_a_stage_the_bar_and_detail_follow_the_server() -> None:
    text = render(
        body(
            stage_progress=0.25,
            progress_detail={"done": 120, "total": 480, "unit": "tokens", "loss": 2.31},
            eta_s=42,
        )
    )
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "100%" in lines["generate"] and "100%" in lines["select"]
    assert "25%" in lines["update"] and "120/480 tokens · loss 2.31" in lines["update"]
    assert "0%" in lines["evaluate"] and "ETA 42s" in lines["round"]


def test_without_stage_progress_a_stage_completes_when_the_round_leaves_it() -> None:
    assert stage_fractions(body()) == {
        "generate": 1.0,
        "select": 1.0,
        "update": 0.0,
        "evaluate": 0.0,
        "meta_step": 0.0,
        "decide": 0.0,
    }
    assert set(stage_fractions(body(status="succeeded", stage="done")).values()) == {1.0}
    assert set(stage_fractions(body(status="queued", stage=None)).values()) == {0.0}


def test_bars_never_move_back() -> None:
    text = render(body(stage_progress=0.8), body(stage_progress=0.1))
    update = next(line for line in text.splitlines() if line.split()[:1] == ["update"])
    assert "80%" in update


def test_exit_codes_and_summary() -> None:
    promoted = body(status="succeeded", stage="done", decision="promoted", candidate_version=3)
    assert exit_code(promoted) == 0
    assert exit_code({**promoted, "decision": "rejected"}) == 3
    assert exit_code(body(status="failed")) == 4 and exit_code(body(status="cancelled")) == 4
    console = Console(record=True, width=100)
    metrics = {"evaluate": {"champion_dev_ppl": 20.0, "candidate_dev_ppl": 18.5}}
    print_summary({**promoted, "base_version": 2, "reason": "why", "metrics": metrics}, console)
    out = console.export_text()
    assert "round 7 promoted → v3 (parent v2)" in out and "reason: why" in out
    assert "dev perplexity" in out and "18.5" in out
