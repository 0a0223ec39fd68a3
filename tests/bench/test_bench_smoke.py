"""Smoke tests of the benchmarks: each script's main, in process, tiny model, tiny sizes.

They check that every script runs end to end against the real server (subprocess) or the
real round code and writes a JSON with the expected, positive numbers; the numbers
themselves mean nothing at these sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` lives in the checkout, not in the installed package
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from bench import memory, onednn_cache, serve, swap, update_memory  # noqa: E402
from bench import round as round_bench  # noqa: E402

TINY = ["--model", "tiny:llama"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One checkpoint store for all four: the first run imports the base, the rest reuse it."""
    return ["--checkpoint-dir", str(tmp_path_factory.mktemp("bench-store"))]


def _load(out: Path, returned: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["bench"] == returned["bench"]
    assert data["run"]["argv"], "the command line is recorded"
    return data


def _positive(d: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert isinstance(d[key], int | float) and d[key] > 0, (key, d[key])


def test_serve_smoke(tmp_path: Path, store: list[str]) -> None:
    out = tmp_path / "serve.json"
    argv = [
        *TINY,
        *store,
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--prompts",
        "4",
        "--max-new-tokens",
        "4",
        "--ref-prompts",
        "2",
        "--warmup",
        "1",
        "--baseline-dtypes",
        "float32,bfloat16",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    data = _load(out, serve.main(argv))
    assert data["server"]["model_version"] == 1
    greedy = data["modes"]["greedy"]
    assert set(greedy["baselines"]) == {"float32", "bfloat16"}
    for dtype, b in greedy["baselines"].items():
        assert b["reference"]["dtype"] == b["padded"]["dtype"] == dtype
        _positive(b["reference"], "tokens", "seconds", "tokens_per_s")
        _positive(b["padded"], "tokens", "seconds", "tokens_per_s", "batch")
    assert greedy["ratios_against"] in greedy["baselines"]
    assert [lv["concurrency"] for lv in greedy["levels"]] == [1, 2]
    for lv in greedy["levels"]:
        assert lv["requests"] == 2 and lv["failed"] == 0
        _positive(lv, "tokens", "tokens_per_s", "p50_latency_s", "p95_latency_s")
        _positive(lv, "ratio_vs_reference", "ratio_vs_padded")
        assert lv["p95_latency_s"] >= lv["p50_latency_s"]
    assert Path(data["checkpoint"]).is_relative_to(store[1])
    assert (tmp_path / "work" / "bench.db").is_file()  # --workdir is kept


def test_round_smoke(tmp_path: Path, store: list[str]) -> None:
    out = tmp_path / "round.json"
    argv = [
        *TINY,
        *store,
        "--samples",
        "2",
        "--samples-per-prompt",
        "2",
        "--max-new-tokens",
        "4",
        "--texts",
        "4",
        "--passage-words",
        "16",
        "--max-length",
        "32",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    data = _load(out, round_bench.main(argv))
    gen = data["generate"]
    _positive(gen, "samples", "tokens", "tokens_per_s", "ratio_vs_reference")
    _positive(gen["reference"], "tokens", "tokens_per_s")
    assert gen["reference"]["tokens"] == gen["tokens"]  # the same lengths on both sides
    upd = data["update"]
    _positive(upd, "texts", "windows", "tokens")
    _positive(upd["reference"], "tokens", "tokens_per_s")
    for mode in ("autocast_auto", "autocast_off", "autocast_full"):
        _positive(upd[mode], "tokens", "tokens_per_s", "ratio_vs_reference")
        assert upd[mode]["tokens"] == upd["reference"]["tokens"] == upd["tokens"]
    assert upd["autocast_off"]["autocast_dtype"] is None


def test_update_memory_smoke(tmp_path: Path, store: list[str]) -> None:
    """bench.update_memory: every setting's epoch in its own process, the old one first as
    the baseline; the same passages and steps, so the same loss to float rounding."""
    out = tmp_path / "update_memory.json"
    names = [next(iter(update_memory.SETTINGS)), "default"]
    argv = [*TINY, *store, "--passages", "4", "--settings", ",".join(names), "--out", str(out)]
    data = _load(out, update_memory.main(argv))
    runs = data["settings"]
    assert list(runs) == names
    assert (
        runs["default"]["micro_batch_tokens"] == 256 and runs["default"]["gradient_checkpointing"]
    )
    first = runs[next(iter(runs))]
    assert (first["micro_batch_tokens"], first["gradient_checkpointing"]) == (512, False)
    for r in runs.values():
        _positive(r, "peak_rss_bytes", "tokens", "tokens_per_s")
        assert r["tokens"] == first["tokens"]
        assert r["train_loss"] == pytest.approx(first["train_loss"], rel=1e-4)


def test_round_memory_smoke(tmp_path: Path, store: list[str]) -> None:
    """bench.memory --worker-round: a small round in a child process, its peak RSS per stage
    read back from the round's own metrics, the v1 store reused without being written to."""
    out = tmp_path / "round_memory.json"
    params = {
        "num_prompts": 2,
        "samples_per_prompt": 2,
        "max_new_tokens": 8,
        "min_words": 1,
        "train_size": 3,
        "valid_size": 1,
        "eval_passages": 2,
        "diversity_prompts": 2,
        "epochs": 1,
        "batch_size": 2,
        "max_length": 32,
    }
    argv = [*TINY, *store, "--worker-round", "--params", json.dumps(params)]
    data = _load(out, memory.main([*argv, "--workdir", str(tmp_path / "w"), "--out", str(out)]))
    assert data["bench"] == "round_memory" and data["decision"] in ("promoted", "rejected")
    for stage in ("data", "generate", "select", "update", "evaluate", "meta_step", "decide"):
        _positive(data["stages"][stage], "peak_rss_bytes", "ratio_to_weights")
    _positive(data, "weights_bytes", "peak_rss_bytes", "process_cpu_s", "sampled_peak_rss_bytes")
    assert data["peak_rss_bytes"] == max(
        v["peak_rss_bytes"] for k, v in data["stages"].items() if k != "round"
    )
    assert not (Path(store[1]) / "default" / "v000002").exists()  # the reused store is untouched


def test_round_subset_reference_and_warmup(tmp_path: Path, store: list[str]) -> None:
    """--ref-samples: the reference samples fewer sequences; --train-warmup: untimed steps."""
    out = tmp_path / "round.json"
    argv = [*TINY, *store, "--samples", "4", "--samples-per-prompt", "2", "--ref-samples", "2"]
    argv += ["--max-new-tokens", "4", "--texts", "4", "--passage-words", "16"]
    argv += ["--max-length", "32", "--batch-size", "2", "--train-warmup", "1"]
    data = _load(out, round_bench.main([*argv, "--out", str(out)]))
    gen = data["generate"]
    assert gen["samples"] == 4 and gen["reference"]["sequences"] == 2
    assert 0 < gen["reference"]["tokens"] <= gen["tokens"]
    _positive(gen, "ratio_vs_reference")
    upd = data["update"]
    assert upd["warmup_steps"] == 1
    for mode in ("autocast_auto", "autocast_off"):
        assert upd[mode]["tokens"] == upd["reference"]["tokens"] == upd["tokens"]


def test_gpu_model_builds_a_loadable_random_checkpoint(tmp_path: Path) -> None:
    """bench/gpu_model.py on a tiny spec: an HF directory that SELFLM_BASE_MODEL accepts,
    its logits scaled to the asked standard deviation, the same weights for the same seed."""
    from bench import gpu_model
    from core.modeling.loader import load_base

    spec = json.loads(gpu_model.CONFIG.read_text())
    assert spec["config"]["num_hidden_layers"] == 30 and spec["config"]["hidden_size"] == 576
    spec["config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(spec))
    info = gpu_model.build(tmp_path / "m", seed=3, target_std=4.0, spec_path=tiny)
    assert abs(info["logit_std"] - 4.0) < 1e-3
    base = load_base(str(tmp_path / "m"))
    assert base.model.config.num_hidden_layers == 2 and len(base.tokenizer) == 49152
    assert base.model.generation_config.eos_token_id == 2
    assert abs(gpu_model.logit_std(base.model, 49152, 3) - 4.0) < 1e-3
    again = gpu_model.build(tmp_path / "m2", seed=3, target_std=4.0, spec_path=tiny)
    assert again["logit_std"] == info["logit_std"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (
        tmp_path / "m2" / "model.safetensors"
    ).read_bytes()


SWAP_ARGS = [*TINY, "--clients", "2", "--max-new-tokens", "4", "--prompts", "4"]
SWAP_ARGS += ["--pre-s", "1.5", "--post-s", "0.5", "--warmup", "1"]


def test_swap_smoke(tmp_path: Path, store: list[str]) -> None:
    out = tmp_path / "swap.json"
    data = _load(out, swap.main([*SWAP_ARGS, *store, "--out", str(out)]))
    assert data["failed"] == 0 and data["promote_status"] == 200
    assert data["versions_seen"] == [1, 2]
    _positive(data, "requests", "largest_gap_ms", "promote_to_swapped_ms", "load_seconds")
    _positive(data, "promote_to_first_v2_response_ms")
    assert data["requests_after_swap_on_old_version"] == 0


def test_swap_series_smoke(tmp_path: Path, store: list[str]) -> None:
    """Three swaps under one load (v2, back to v1, v2 again): each read in its own segment."""
    out = tmp_path / "swaps.json"
    data = _load(out, swap.main([*SWAP_ARGS, *store, "--swaps", "3", "--out", str(out)]))
    swaps = data["swaps"]
    assert [s["version"] for s in swaps] == [2, 1, 2]
    for s in swaps:
        assert s["failed"] == 0 and s["promote_status"] == 200
        # the old version before the swap, the new after
        assert s["versions_seen"] == [1, 2], swaps
        assert s["requests_after_swap_on_old_version"] == 0
        _positive(s, "requests", "largest_gap_ms", "promote_to_first_v2_response_ms")
    series = data["series"]
    assert series["swaps"] == 3 and series["failed"] == 0
    assert series["requests"] == sum(s["requests"] for s in swaps)
    _positive(series, "median_swap_gap_ms", "max_swap_gap_ms")


def test_memory_smoke(tmp_path: Path, store: list[str]) -> None:
    out = tmp_path / "memory.json"
    argv = [*SWAP_ARGS, *store, "--steady-s", "1", "--out", str(out)]
    data = _load(out, memory.main(argv))
    _positive(data, "weights_bytes", "idle_rss_bytes", "idle_ratio_to_weights")
    for phase in ("steady", "swap"):
        _positive(data[phase], "peak_rss_bytes", "samples", "ratio_to_weights")
        assert data[phase]["failed"] == 0
    assert data["swap"]["peak_rss_bytes"] >= data["idle_rss_bytes"] * 0.9


def test_onednn_cache_smoke(tmp_path: Path, store: list[str]) -> None:
    out = tmp_path / "onednn.json"
    argv = [*TINY, *store, "--shapes", "3", "--caps", "1024,8/1024,8", "--out", str(out)]
    data = _load(out, onednn_cache.main(argv))
    caps = [(r["capacity"], r["ideep_capacity"]) for r in data["results"]]
    assert caps == [(1024, 1024), (8, 1024), (8, 8)]  # each in its own process
    for r in data["results"]:
        _positive(r, "before_bytes", "after_bytes", "seconds")
