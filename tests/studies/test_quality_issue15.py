"""The quality study's issue-15 parts: the served-traffic arm through a real `selflm serve`,
resume, the real-only baselines, and the report's targets (probe noise, baseline, decisions)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `studies` lives in the checkout, not in the installed package
    sys.path.insert(0, str(ROOT))

from studies.quality import report as quality_report  # noqa: E402
from studies.quality import study as quality  # noqa: E402

TOPICS = ("assert", "break", "class", "def", "for", "global", "if", "import", "raise", "while")
QUESTIONS = [
    "How does the assert statement work?",
    "What does break do inside a nested loop?",
    "How do I define a class?",
    "What does the global statement change?",
    "When is the else clause of a for loop run?",
]


def _corpora(tmp_path: Path) -> tuple[Path, Path]:
    domain = tmp_path / "domain"
    domain.mkdir(exist_ok=True)
    for i, topic in enumerate(TOPICS):
        (domain / f"doc{i:02d}.txt").write_text(
            f"The {topic} statement is part of the language. It is described in this "
            f"section together with the rules that apply to {topic} in every module."
        )
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir(exist_ok=True)
    (unrelated / "a.txt").write_text(
        "The harbour was quiet in the early morning. Fishing boats rocked gently against the "
        "pier while gulls circled over the market stalls."
    )
    return domain, unrelated


def _argv(tmp_path: Path, arms: str, rounds: int) -> list[str]:
    domain, unrelated = _corpora(tmp_path)
    return [
        "--small",
        "--rounds",
        str(rounds),
        "--arms",
        arms,
        "--base-model",
        "tiny:llama",
        "--device",
        "cpu",
        "--domain",
        str(domain),
        "--unrelated",
        str(unrelated),
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
        "--no-report",
    ]


def test_served_arm_replays_traffic_through_a_real_server_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.rounds import stages

    used: list[list[str]] = []
    real = stages.round_prompts

    def spy(*args: Any, **kwargs: Any) -> list[str]:
        got = real(*args, **kwargs)
        used.append(list(got))
        return got

    monkeypatch.setattr(stages, "round_prompts", spy)
    stream = tmp_path / "questions.txt"
    stream.write_text("# a comment\n\n" + "\n".join(QUESTIONS) + "\n")
    argv = [*_argv(tmp_path, "served", 1), "--traffic", str(stream)]
    assert quality.main(argv) == 0

    db = tmp_path / "work" / "tiny_llama-small" / "served" / "selflm.db"
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT prompt, model_version FROM served_prompts ORDER BY id").fetchall()
    # Round 1's slice (num_prompts 3 in --small) went through POST /generate and was recorded
    # by the server, answered by the champion (v1)...
    assert sorted(p for p, _ in rows) == sorted(QUESTIONS[:3])
    assert {v for _, v in rows} == {1}
    # ...and the round drew exactly those prompts (not the corpus).
    assert len(used) == 1 and sorted(used[0]) == sorted(QUESTIONS[:3])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    r1 = next(r for r in data["records"] if r["round"] == 1)
    assert r1["traffic_requests"] == 3 and r1["traffic_recorded"] == 3
    assert data["meta"]["arms"]["served"]["params"]["prompt_source"] == "served"

    # --resume with more rounds: round 1 is kept as it was, round 2 replays the next slice
    # of the stream (wrapping around) before it runs.
    argv2 = [*_argv(tmp_path, "served", 2), "--traffic", str(stream), "--resume"]
    assert quality.main(argv2) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["round"] for r in again["records"]] == [0, 1, 2]
    assert next(r for r in again["records"] if r["round"] == 1)["round_id"] == r1["round_id"]
    assert len(used) == 2 and sorted(used[1]) == sorted([QUESTIONS[3], QUESTIONS[4], QUESTIONS[0]])
    r2 = next(r for r in again["records"] if r["round"] == 2)
    assert r2["traffic_recorded"] == 6


def test_real_only_arm(tmp_path: Path) -> None:
    """real_only needs the `train_data` round parameter: it runs where RoundParams has it and
    is refused with a clear message where it does not (before any model is loaded)."""
    from core.round_params import RoundParams

    argv = _argv(tmp_path, "real_only,selflm", 1)
    if "train_data" not in RoundParams.model_fields:
        with pytest.raises(SystemExit, match=r"train_data.*roundq"):
            quality.main(argv)
        assert not (tmp_path / "out" / "results.json").exists()
        return
    assert quality.main(argv) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["meta"]["arms"]["real_only"]["params"]["train_data"] == "real_only"
    got = {(r["arm"], r["round"]) for r in data["records"]}
    assert got == {(a, i) for a in ("real_only", "selflm") for i in range(2)}
    assert all(r["status"] in ("succeeded", "failed") for r in data["records"] if r["round"])


def _rec(arm: str, i: int, test: float, promoted: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "arm": arm,
        "round": i,
        "status": "base" if i == 0 else "succeeded",
        "decision": None if i == 0 else ("promoted" if promoted else "rejected"),
        "promoted": None if i == 0 else promoted,
        "champion_version": 1,
        "test_ppl": test,
        "unrelated_ppl": 30.0,
        "distinct_1": 0.3,
        "distinct_2": 0.70,
        "repetition_rate": 0.070 + 0.01 * i,
        **extra,
    }


def _metrics(champ: float, cand: float, ok: float) -> dict[str, Any]:
    return {
        "round_metrics": {
            "decide.epsilon": 0.5,
            "evaluate.champion_dev_ppl": champ,
            "meta_step.gate_ppl_eps_0.5": cand,
            "decide.diversity_ok_eps_0.5": ok,
        }
    }


def test_report_targets_use_probe_noise_baseline_and_replayed_decisions(tmp_path: Path) -> None:
    measure = {"diversity_prompts": 128, "max_new_tokens": 48}
    params = {"gate": "dev", "promotion_margin": 0.005}
    data = {
        "meta": {
            "rounds": 2,
            "measure": measure,
            "arm_order": ["selflm", "real_only"],
            "arms": {"selflm": {"params": params}, "real_only": {"params": params}},
        },
        "records": [
            _rec("selflm", 0, 20.0),
            _rec("selflm", 1, 19.0, True, **_metrics(20.0, 19.0, 1.0)),
            # Recorded as promoted, but its gate ppl did not beat the margin: not replayable.
            _rec("selflm", 2, 18.0, True, **_metrics(20.0, 19.99, 1.0)),
            _rec("real_only", 0, 20.0),
            _rec("real_only", 1, 18.5, True, **_metrics(20.0, 18.5, 1.0)),
            _rec("real_only", 2, 17.5, False, **_metrics(20.0, 18.0, 0.0)),
        ],
    }
    results = tmp_path / "results.json"
    results.write_text(json.dumps(data))
    noise = {"prompts": 128, "max_new_tokens": 48, "repetition_sd": 0.005}
    (tmp_path / "probe_noise.json").write_text(json.dumps(noise))
    report = tmp_path / "quality.md"
    quality_report.write_report(results, report)
    text = report.read_text()

    s = quality_report.summaries_of(data, noise)["selflm"]
    checks = {name: (value, met) for name, value, met, _ in s.checks}
    # Repetition rose 0.02 against a band of 2 × 0.005: missed on noise, not on "5%".
    band = next(k for k in checks if k.startswith("repetition within ±2 SE"))
    assert checks[band][1] is False and "±0.0100" in band
    # selflm ends at 18.0, real_only (same real-token budget) at 17.5: not better.
    baseline = next(k for k in checks if "real_only" in k)
    assert checks[baseline][1] is False
    decisions = checks["every decision reproducible from its recorded metrics"]
    assert decisions == ("1 of 2 rounds", False)
    assert quality_report.summaries_of(data, noise)["real_only"].decisions_mismatched == []
    # The plain answer, and the plot with both panels' data beside the report.
    assert "## Did self-generated data help?" in text
    assert "| selflm | real_only | 2 | 18.000 | 17.500 | +2.86% | **no** |" in text
    assert report.with_name("quality_rounds.png").read_bytes()[:4] == b"\x89PNG"

    # Without a noise file measured on this probe the repetition target falls back to 5%.
    other = quality_report.summaries_of(data, {**noise, "prompts": 32})["selflm"]
    assert any("no probe-noise file" in name for name, *_ in other.checks)


def test_a_replayed_decision_needs_the_confirmation_where_one_was_recorded() -> None:
    from studies.quality.arms import ARMS, DEFAULT_ARMS, arm_params
    from studies.quality.summary import ARM_NOTES, replay_decision

    passed = _metrics(20.0, 19.0, 1.0)
    assert replay_decision(passed, 0.005) is True  # no confirmation recorded: as before
    for ok, expected in ((1.0, True), (0.0, False)):
        rec = {"round_metrics": {**passed["round_metrics"], "decide.confirm_ok_eps_0.5": ok}}
        assert replay_decision(rec, 0.005) is expected
    # The study's arm for it: the round defaults with the confirmation probe on.
    assert ARMS["confirm_probe"] == {"strategy": "difficulty", "diversity_confirm": True}
    assert DEFAULT_ARMS.index("confirm_probe") == DEFAULT_ARMS.index("probe_256") + 1
    assert "confirm_probe" in ARM_NOTES
    params = arm_params("confirm_probe", 0, None, False, {}, {})
    assert params.diversity_confirm is True and params.strategy == "difficulty"
