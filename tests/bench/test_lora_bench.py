"""bench/lora.py end to end on tiny:llama: both methods' rounds in child processes, the
measurements recorded, the report written (numbers on a tiny model mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import lora


def test_lora_bench_runs_both_methods_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    argv = ["--small", "--rounds", "1", "--work", str(tmp_path / "w"), "--out", str(out)]
    assert lora.main([*argv, "--all"]) == 0
    report = json.loads(out.read_text())
    assert report["base"]["test_ppl"] > 1
    for method in ("full", "lora"):
        (r,) = report["rounds"][method]
        assert r["status"] == "succeeded", r["error"]
        assert r["peak_rss_bytes"] >= r["rss_at_start_bytes"] > 0
        assert r["cpu_s"] > 0 and r["wall_s"] > 0
        assert r["measure"]["test_ppl"] > 1
        assert report["params"][method]["update_method"] == method
    assert "| lora | 1 |" in report["table"] and "| full | 1 |" in report["table"]
    # Resumable: every round is done, so another invocation runs nothing new.
    assert lora.main([*argv, "--method", "lora"]) == 0
    assert len(json.loads((tmp_path / "w" / "results.json").read_text())["rounds"]["lora"]) == 1
