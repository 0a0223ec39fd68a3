"""Run the client-library tests and write docs/compatibility.md from their results.

    .venv/bin/python scripts/compatibility.py            # tiny:llama module only
    .venv/bin/python scripts/compatibility.py --slow     # also the SmolLM2 chat module

Each test marked `@pytest.mark.compat(client, call)` is a row: client, call, works (the
test's outcome) and the test that proves it. The Prometheus name map is written with it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["tests/app/test_client_libraries.py"]
SLOW = ["tests/app/test_client_smollm2.py"]
LIBRARIES = ("openai", "huggingface_hub", "langchain-openai", "prometheus-client")

PROMETHEUS_MAP = [
    ("selflm_request_count_total{route}", "tgi_request_count", "—"),
    ("selflm_request_success_total{route}", "tgi_request_success", "vllm:request_success_total"),
    ("selflm_request_failure_total{route,err}", "tgi_request_failure{err}", "—"),
    (
        "selflm_e2e_request_latency_seconds",
        "tgi_request_duration",
        "vllm:e2e_request_latency_seconds",
    ),
    (
        "selflm_request_queue_time_seconds",
        "tgi_request_queue_duration",
        "vllm:request_queue_time_seconds",
    ),
    ("selflm_time_to_first_token_seconds", "—", "vllm:time_to_first_token_seconds"),
    (
        "selflm_time_per_output_token_seconds",
        "tgi_request_mean_time_per_token_duration",
        "vllm:time_per_output_token_seconds (V1: vllm:inter_token_latency_seconds)",
    ),
    ("selflm_request_prompt_tokens", "tgi_request_input_length", "vllm:request_prompt_tokens"),
    (
        "selflm_request_generation_tokens",
        "tgi_request_generated_tokens",
        "vllm:request_generation_tokens",
    ),
    ("selflm_request_prompt_tokens_sum", "—", "vllm:prompt_tokens_total"),
    ("selflm_generated_tokens_total", "—", "vllm:generation_tokens_total"),
    ("selflm_batch_size (histogram)", "tgi_batch_next_size", "—"),
    ("selflm_num_requests_running", "tgi_batch_current_size", "vllm:num_requests_running"),
    ("selflm_num_requests_waiting", "tgi_queue_size", "vllm:num_requests_waiting"),
    ("selflm_batches_total", "tgi_batch_inference_count", "—"),
    ("selflm_requests_total", "—", "—"),
    ("selflm_serving_version", "—", "—"),
    ("selflm_champion_version", "—", "—"),
    ("selflm_swaps_total", "—", "—"),
    ("selflm_refused_swaps_total", "—", "—"),
    ("selflm_rounds{status,decision}", "—", "—"),
    ("selflm_round_stage_seconds{stage} (summary)", "—", "—"),
    ("selflm_champion_perplexity{split}", "—", "—"),
    ("selflm_database_up", "—", "—"),
]

NOTES = """\
## Choices where the dialects leave room

- **TGI `details`** defaults to false on `/generate` (the response has `details` only when
  asked for). Every other field of TGI's `GenerateParameters` is accepted; null is the
  default. Refused by name with a 422: `grammar` (no constrained decoding), `watermark: true`,
  `adapter_id` (no LoRA adapters), `best_of > 1` for greedy decoding, when streaming, or over
  `SELFLM_MAX_BEST_OF` (2, TGI's default), `decoder_input_details` when streaming,
  `top_n_tokens` over 5. `best_of` accepts a `seed` (TGI refuses one): choice *i* uses
  `seed + i`.
- **Stop sequences** (TGI): generation stops after the token that completes a stop sequence
  and `generated_text` keeps that token's whole text, so the non-special `details.tokens`
  texts add up to `generated_text`. OpenAI's routes cut the text before the first stop
  sequence (OpenAI's rule); streams hold back a tail that may still become one.
- **EOS** (TGI): the EOS token is in `details.tokens` (`special: true`, its text e.g.
  `<|im_end|>`), counted in `generated_tokens`, absent from `generated_text`; a stream's last
  event carries it (or the last generated token) with `generated_text` and `details`.
- **Temperature**: below 0.01 TGI's routes answer 422; OpenAI's treat it as greedy (as vLLM).
  Every float is finite and bounded (NaN/inf → 422/400).
- **`frequency_penalty` / `presence_penalty`**: OpenAI's additive penalties on the counts of
  generated tokens (TGI's `frequency_penalty` uses the same rule here).
- **Models**: the OpenAI model id is `SELFLM_SERVED_MODEL_NAME` (default: the base model
  name) and stays constant across promotions; the serving version is in `x-model-version`
  and in the model card (`version`). Another model name is a 404 `model_not_found`, except
  huggingface_hub's placeholders `tgi` and `dummy`.
- **Unknown fields**: TGI's routes refuse them (422, a typo is a bug); OpenAI's ignore them
  (as vLLM), since clients send fields of newer API versions.
- **Errors**: `/v1/*` answers OpenAI's envelope with OpenAI's codes (400 invalid request,
  401, 404, 429, 503); TGI's routes `{"error", "error_type"}`.
- **Access**: with keys set, every route but `/health` and `/info` needs a bearer key
  (`SELFLM_OPEN_ROUTES` opens `inference`, `reads`, `metrics`, `docs`; mutating routes never
  open). `SELFLM_INFERENCE_API_KEYS` grant inference and reads, never mutation.
- **Metrics**: `GET /metrics` negotiates: OpenMetrics for Prometheus' scrape header,
  text 0.0.4 for `text/plain` or `*/*`, the JSON report only for `Accept: application/json`
  or `?format=json`.
"""


class Recorder:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            mark = item.get_closest_marker("compat")
            if mark is not None:
                client, call = mark.args
                self.rows[item.nodeid] = {"client": client, "call": call, "outcome": "not run"}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = self.rows.get(report.nodeid)
        if row is None:
            return
        counts = report.when == "call" or report.outcome != "passed"
        if counts and row["outcome"] in ("not run", "passed"):
            row["outcome"] = report.outcome


def render(rows: dict[str, dict[str, Any]], command: str) -> str:
    mark = {"passed": "yes", "failed": "**no**", "skipped": "skipped", "not run": "not run"}
    lines = [
        "# Compatibility with the clients users already have",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC against a real",
        "`selflm serve` process (tiny:llama; the SmolLM2 rows with the bundled model). Client",
        "versions: " + ", ".join(f"{lib} {version(lib)}" for lib in LIBRARIES) + ".",
        "",
        "| client | call | works | proved by |",
        "| --- | --- | --- | --- |",
    ]
    for nodeid, r in rows.items():
        lines.append(f"| {r['client']} | {r['call']} | {mark[r['outcome']]} | `{nodeid}` |")
    lines += [
        "",
        "## Prometheus names against TGI and vLLM",
        "",
        "Counters carry `_total`, histograms `_bucket`/`_sum`/`_count` (prometheus-client).",
        "",
        "| selflm | TGI | vLLM |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{a}` | `{b}` | `{c}` |".replace("`—`", "—") for a, b, c in PROMETHEUS_MAP]
    return "\n".join(lines) + "\n\n" + NOTES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slow", action="store_true", help="also the SmolLM2 module")
    ap.add_argument("--out", default=str(ROOT / "docs" / "compatibility.md"))
    args = ap.parse_args()
    recorder = Recorder()
    modules = MODULES + (SLOW if args.slow else [])
    code = pytest.main(["-q", "-p", "no:cacheprovider", *modules], plugins=[recorder])
    command = "python scripts/compatibility.py" + (" --slow" if args.slow else "")
    Path(args.out).write_text(render(recorder.rows, command))
    print(f"wrote {args.out}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
