"""The report's setup section (corpora, probe, machine, arms) and its Markdown table helper."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from studies.quality.summary import ARM_NOTES, arms_in_order, fmt


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def setup_section(data: dict[str, Any]) -> list[str]:
    meta = data.get("meta", {})
    sets = meta.get("eval_sets", {})
    measure = meta.get("measure", {})
    docs = sets.get("domain_docs", {})
    env = meta.get("environment", {})
    lines = ["## Setup", ""]
    if meta.get("small"):
        lines += [
            "> **Smoke run (`--small`)**: rounds and measurements are shrunk to seconds; these "
            "numbers say nothing about quality.",
            "",
        ]
    lines += [
        f"- **Base model**: `{meta.get('base_model')}`, imported once as v1 and copied into a "
        "fresh store (SQLite database + checkpoint directory) per arm.",
        f"- **Rounds**: {meta.get('rounds')} consecutive rounds per arm through the real "
        "pipeline (`records.create_round` + `run_round`); round *i* uses seed "
        f"{meta.get('seed')} + *i* in every arm, so all arms draw the same prompts.",
        f"- **Domain corpus**: `{_domain_text(meta)}`, "
        f"split by document with seed {sets.get('split_seed')} (the pipeline's) into "
        f"train {docs.get('train')} / dev {docs.get('dev')} / test {docs.get('test')} "
        "documents. Rounds draw prompts and replay text from *train* and gate on *dev*; the "
        f"study measures the **test** split only: {sets.get('test_passages')} of its "
        f"{sets.get('test_passages_total')} passages (≤160 words each).",
        f"- **Unrelated corpus**: `{meta.get('unrelated')}` ({sets.get('unrelated_docs')} "
        f"documents; {sets.get('unrelated_passages')} of {sets.get('unrelated_passages_total')} "
        "passages, a seeded sample spread over all documents). The default is the license "
        "texts Debian ships in `/usr/share/common-licenses` (GPL, LGPL, GFDL, Apache, MPL, "
        "Artistic, BSD, CC0): real English prose, legal rather than technical, present offline "
        "on this machine and in the `python:3.11-slim` image the Dockerfile builds on. No "
        "round ever sees it; it measures general ability outside the domain. Configurable "
        "with `--unrelated`.",
        f"- **Diversity**: {sets.get('diversity_prompts')} fixed prompts from the domain train "
        f"split (seed {sets.get('prompt_seed')}), one sample each, "
        f"{measure.get('max_new_tokens')} new tokens, temperature {measure.get('temperature')}, "
        f"top-p {measure.get('top_p')}, fixed seed; distinct-1/2 (corpus-level) and mean "
        "trigram repetition rate. Real test-split text cut to the same length reads "
        f"distinct-2 {fmt(sets.get('real_distinct_2'))}, repetition "
        f"{fmt(sets.get('real_repetition_rate'))}.",
        "- **Measured model**: after every round, the lineage's *champion* — the candidate if "
        "the round promoted it, else the unchanged previous champion. Round 0 is the base.",
        f"- **Machine**: {env.get('machine')}, {env.get('cpus')} CPUs, torch "
        f"{env.get('torch')}, CUDA {'yes' if env.get('cuda') else 'no'}.",
        "",
        "### Arms",
        "",
    ]
    rows = []
    for arm in arms_in_order(data):
        info = meta.get("arms", {}).get(arm, {})
        ov = info.get("overrides", {})
        ov_text = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in ov.items()) or "(none)"
        rows.append([arm, ARM_NOTES.get(arm, ""), ov_text])
    lines += table(["arm", "what", "overrides of the round defaults"], rows)
    common = meta.get("common_overrides") or {}
    lines += [""]
    if common:
        lines += [
            "Overrides for every arm (an arm's own win): "
            + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in common.items()),
            "",
        ]
    lines += [
        "The *reference* arm is the reference article's loop: random selection, no filters, no "
        "replay, no meta-step, promotion whenever perplexity on the round's own generated "
        "valid split does not get worse (margin 0), and the article's learning rate (1e-4) and "
        "epochs (5). The article trains one sample at a time (batch size 1); here it runs on "
        "our batched trainer (same AdamW family, padded batches with attention masks) to "
        "keep the study's wall time bounded. The exact parameters of every arm are in "
        "`results.json` (`meta.arms`).",
        "",
    ]
    return lines


def _domain_text(meta: dict[str, Any]) -> str:
    d = meta.get("domain")
    if not d or d == "pydoc":
        return "pydoc topics (CPython pydoc_data)"
    if d == "pgsql":
        return (
            "pgsql: the PostgreSQL 15.20 SQL command reference (man7 pages of Debian's "
            "postgresql-client-15, PostgreSQL Licence; studies/quality/corpora/), kept back: "
            "no default was tuned on it"
        )
    return str(d)
