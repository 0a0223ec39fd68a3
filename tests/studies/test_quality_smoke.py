"""Smoke test of the quality study: tiny model, tiny rounds, two arms, two rounds."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `studies` lives in the checkout, not in the installed package
    sys.path.insert(0, str(ROOT))

from studies.quality import study as quality  # noqa: E402

TOPICS = (
    "assert",
    "break",
    "class",
    "def",
    "for",
    "global",
    "if",
    "import",
    "raise",
    "return",
    "try",
    "while",
    "with",
    "yield",
)
NUMBERS = ("test_ppl", "unrelated_ppl", "distinct_1", "distinct_2", "repetition_rate")


def test_quality_smoke(tmp_path: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "docs" / "quality.md"
    # Short documents keep every passage short, so the smoke run stays in seconds.
    domain = tmp_path / "domain"
    domain.mkdir()
    for i, topic in enumerate(TOPICS):
        (domain / f"doc{i:02d}.txt").write_text(
            f"The {topic} statement is part of the language. It is described in this "
            f"section together with the rules that apply to {topic} in every module. "
            f"Examples show how {topic} behaves when the program runs."
        )
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    # Real English prose the study can read on any machine (the default lives on Debian).
    for name, text in {
        "a.txt": "The harbour was quiet in the early morning. Fishing boats rocked gently "
        "against the pier while gulls circled over the market stalls.",
        "b.txt": "Mountains rose steeply behind the village, their peaks still white with "
        "snow in late spring, and shepherds drove their flocks up the winding paths.",
    }.items():
        (unrelated / name).write_text(text)
    argv = [
        "--small",
        "--rounds",
        "2",
        "--arms",
        "reference,selflm",
        "--base-model",
        "tiny:llama",
        "--device",
        "cpu",
        "--domain",
        str(domain),
        "--unrelated",
        str(unrelated),
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--report",
        str(report),
    ]
    assert quality.main(argv) == 0

    data = json.loads((out / "results.json").read_text())
    got = {(r["arm"], r["round"]) for r in data["records"]}
    assert got == {(a, i) for a in ("reference", "selflm") for i in range(3)}
    for r in data["records"]:
        for key in NUMBERS:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["arm"], r["round"], key)
        if r["round"] > 0:
            assert r["status"] in ("succeeded", "failed")
            assert isinstance(r["promoted"], bool)
    # Every arm starts from the same base, measured once.
    bases = [r for r in data["records"] if r["round"] == 0]
    assert bases[0]["test_ppl"] == bases[1]["test_ppl"]
    assert data["meta"]["arms"]["reference"]["params"]["gate"] == "generated"
    assert (out / "results.csv").read_text().count("\n") == 7

    text = report.read_text()
    assert "## What the numbers say" in text and "### reference" in text
    png = report.with_name("quality_rounds.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --resume with everything done runs no round and keeps the notes written by hand.
    report.write_text(text.replace("_Placeholder", "Lead notes. _Placeholder"))
    assert quality.main([*argv, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["weights_key"] for r in again["records"]] == [
        r["weights_key"] for r in data["records"]
    ]
    assert "Lead notes." in report.read_text()


def test_two_study_processes_share_one_results_file(tmp_path: Path) -> None:
    """Each process owns its arms; a save keeps the other process's arms from disk."""
    a, b = quality.Results.open(tmp_path), quality.Results.open(tmp_path)
    a.owned, b.owned = {"selflm"}, {"reference"}
    a.meta.update(arm_order=["selflm"], arms={"selflm": {"x": 1}}, rounds=8)
    b.meta.update(arm_order=["reference"], arms={"reference": {"x": 2}}, rounds=4)
    a.add({"arm": "selflm", "round": 0, "test_ppl": 18.0})
    b.add({"arm": "reference", "round": 0, "test_ppl": 18.0})
    a.add({"arm": "selflm", "round": 1, "test_ppl": 17.0})
    b.add({"arm": "reference", "round": 1, "test_ppl": 22.0})
    data = json.loads((tmp_path / "results.json").read_text())
    got = sorted((r["arm"], r["round"], r["test_ppl"]) for r in data["records"])
    assert got == [
        ("reference", 0, 18.0),
        ("reference", 1, 22.0),
        ("selflm", 0, 18.0),
        ("selflm", 1, 17.0),
    ]
    assert set(data["meta"]["arms"]) == {"selflm", "reference"}
    assert data["meta"]["rounds"] == 8
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4


def test_probe_noise_runs_several_seeds_on_one_checkpoint(tmp_path: Path) -> None:
    from core.modeling.loader import tiny_model
    from studies.quality import noise as quality_noise

    loaded = tiny_model("llama", seed=0)
    ck = tmp_path / "ck"
    loaded.model.save_pretrained(ck)
    loaded.tokenizer.save_pretrained(ck)
    out = tmp_path / "noise.json"
    args = [str(ck), "--seeds", "1,2,1", "--diversity-prompts", "3", "--max-new-tokens", "6"]
    summary = quality_noise.main([*args, "--out", str(out)])
    runs = summary["runs"]
    assert [r["seed"] for r in runs] == [1, 2, 1]
    assert runs[0]["distinct_2"] == runs[2]["distinct_2"]  # same seed, same numbers
    assert summary["distinct_2_sd"] >= 0 and json.loads(out.read_text())["prompts"] == 3
