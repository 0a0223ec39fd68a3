"""bench/lora.py end to end on tiny:llama: both methods' rounds in child processes, the
measurements recorded, the report written (numbers on a tiny model mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import lora


def test_lora_bench_runs_both_methods_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    argv = ["--small", "--rounds", "1", "--work", str(tmp_path / "w"), "--out", str(out)]
    assert lora.main([*argv, "--all", "--set", "lora:learning_rate=1e-3"]) == 0
    report = json.loads(out.read_text())
    assert report["base"]["test_ppl"] > 1
    for method in ("full", "lora"):
        (r,) = report["rounds"][method]
        assert r["status"] == "succeeded", r["error"]
        assert r["peak_rss_bytes"] >= r["rss_at_start_bytes"] > 0
        assert r["cpu_s"] > 0 and r["wall_s"] > 0
        assert r["measure"]["test_ppl"] > 1
        assert report["params"][method]["update_method"] == method
    assert report["params"]["lora"]["learning_rate"] == 1e-3
    assert report["params"]["full"]["learning_rate"] == 3e-3  # --small's, untouched
    assert "| lora | 1 |" in report["table"] and "| full | 1 |" in report["table"]
    # Resumable: every round is done, so another invocation runs nothing new.
    assert lora.main([*argv, "--method", "lora"]) == 0
    assert len(json.loads((tmp_path / "w" / "results.json").read_text())["rounds"]["lora"]) == 1
    # The overrides are the run's: a later call adopts them, and other ones are refused.
    assert json.loads((tmp_path / "w" / "results.json").read_text())["sets"] == [
        "lora:learning_rate=1e-3"
    ]
    with pytest.raises(SystemExit, match="learning_rate=1e-3"):
        lora.main([*argv, "--method", "full", "--set", "lora:learning_rate=2e-4"])


def test_set_overrides_both_methods_or_one() -> None:
    both = lora._params("full", 1, False, True, ["epochs=3", "lora:learning_rate=2e-4"])
    mine = lora._params("lora", 1, False, True, ["epochs=3", "lora:learning_rate=2e-4"])
    assert both["epochs"] == mine["epochs"] == 3
    assert both["learning_rate"] == 5e-5 and mine["learning_rate"] == 2e-4
    assert mine["num_prompts"] == lora.QUICK_ROUND["num_prompts"]
    with pytest.raises(ValueError, match="unknown 'qlora'"):
        lora._params("lora", 1, False, False, ["qlora:learning_rate=2e-4"])
    with pytest.raises(ValueError, match="not a settable"):
        lora._params("lora", 1, False, False, ["seed=3"])
