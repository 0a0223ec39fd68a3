"""Every name a round records in ``round_metrics``: stages and metrics, in one place.

A metric is keyed by ``(stage, name)``. The round writes these, :mod:`core.report` picks its
headline from them, and the quality study and the Prometheus exposition read them, so a
rename here is a rename everywhere. No imports: any layer may use this module.
"""

from __future__ import annotations

from typing import Final, Literal

# --------------------------------------------------------------------------- stages

DATA: Final = "data"  # corpus sizes, recorded before the first stage
GENERATE: Final = "generate"
SELECT: Final = "select"
UPDATE: Final = "update"
EVALUATE: Final = "evaluate"
META_STEP: Final = "meta_step"
DECIDE: Final = "decide"
ROUND: Final = "round"  # the whole round's wall time
STAGES: Final = (GENERATE, SELECT, UPDATE, EVALUATE, META_STEP, DECIDE)

# --------------------------------------------------------------------------- every stage

SECONDS: Final = "seconds"  # the stage's wall time (also per epoch in `update`, by step)
# The stage's memory: peak resident set size of the worker process during the stage, in
# bytes (also under `data` for loading the champion, and under `round` for the whole round).
MEMORY: Final = "peak_rss_bytes"

# --------------------------------------------------------------------------- data

TRAIN_DOCS: Final = "train_docs"
TRAIN_PASSAGES: Final = "train_passages"  # the pool prompts and replay are drawn from
DEV_DOCS: Final = "dev_docs"
TEST_DOCS: Final = "test_docs"
DEV_PASSAGES: Final = "dev_passages"
TEST_PASSAGES: Final = "test_passages"

# --------------------------------------------------------------------------- generate

PROMPTS: Final = "prompts"
GENERATED: Final = "generated"  # also in `select`: the samples it started from
TOKENS: Final = "tokens"  # also per epoch in `update`
TOKENS_PER_S: Final = "tokens_per_s"  # generate, update, evaluate
SEED: Final = "seed"

# --------------------------------------------------------------------------- select

FILTERED_DEGENERATE: Final = "filtered_degenerate"
DEDUP_EXACT: Final = "dedup_exact"
DEDUP_NEAR: Final = "dedup_near"
SELECTED: Final = "selected"
TRAIN: Final = "train"
VALID: Final = "valid"

# --------------------------------------------------------------------------- update

REPLAY_TOKENS: Final = "replay_tokens"
SYNTHETIC_TOKENS: Final = "synthetic_tokens"
REPLAY_TOKEN_FRACTION: Final = "replay_token_fraction"
TRAIN_LOSS: Final = "train_loss"  # per epoch (step = epoch)
VALID_LOSS: Final = "valid_loss"  # per epoch
TOKENS_TRAINED: Final = "tokens_trained"
BEST_EPOCH: Final = "best_epoch"
STOPPED_EARLY: Final = "stopped_early"
REPLAY_TEXTS: Final = "replay_texts"
# The update's token budgets in every train_data mode (worker/rounds/traindata.py)
REAL_TOKENS: Final = "real_tokens"  # real-text tokens trained on
SELECTED_TOKENS: Final = "selected_tokens"  # tokens of the selected train samples
PROMPT_TOKENS: Final = "prompt_tokens"  # their BOS + prompt part
REAL_TOKEN_FRACTION: Final = "real_token_fraction"
ANCHOR_KL: Final = "anchor_kl"  # candidate's mean KL from the base on the anchored rows
ANCHOR_KL_START: Final = "anchor_kl_start"  # the champion's, before the update
ANCHOR_TOKENS: Final = "anchor_tokens"
ANCHOR_VERSION: Final = "anchor_version"  # the lineage version the anchor holds to

# --------------------------------------------------------------------------- evaluate

Who = Literal["champion", "candidate", "base", "real"]  # real: held-out domain text
Split = Literal["valid", "dev", "test"]
TOKENS_SCORED: Final = "tokens_scored"


def ppl(who: Who, split: Split) -> str:
    """Perplexity of `who` on a split: ``champion_dev_ppl`` …"""
    return f"{who}_{split}_ppl"


def distinct_1(who: Who) -> str:
    return f"{who}_distinct_1"


def distinct_2(who: Who) -> str:
    return f"{who}_distinct_2"


def repetition_rate(who: Who) -> str:
    return f"{who}_repetition_rate"


CHAMPION_VALID_PPL: Final = "champion_valid_ppl"
CHAMPION_DEV_PPL: Final = "champion_dev_ppl"
CHAMPION_TEST_PPL: Final = "champion_test_ppl"
CANDIDATE_VALID_PPL: Final = "candidate_valid_ppl"
CANDIDATE_DEV_PPL: Final = "candidate_dev_ppl"
CANDIDATE_TEST_PPL: Final = "candidate_test_ppl"
CHAMPION_DISTINCT_2: Final = "champion_distinct_2"
CANDIDATE_DISTINCT_2: Final = "candidate_distinct_2"
CHAMPION_REPETITION_RATE: Final = "champion_repetition_rate"
CANDIDATE_REPETITION_RATE: Final = "candidate_repetition_rate"

# --------------------------------------------------------------------------- meta_step

EPSILON_CHOSEN: Final = "epsilon_chosen"


def gate_ppl_at(eps: float) -> str:
    """The gate set's perplexity at one ε of the grid."""
    return f"gate_ppl_eps_{eps:g}"


# --------------------------------------------------------------------------- decide

IMPROVEMENT: Final = "improvement"
PROMOTED: Final = "promoted"  # 1.0 or 0.0
EPSILON: Final = "epsilon"  # the ε the decision is about


def diversity_ok_at(eps: float) -> str:
    return f"diversity_ok_eps_{eps:g}"


def candidate_distinct_2_at(eps: float) -> str:
    return f"candidate_distinct_2_eps_{eps:g}"


def candidate_repetition_rate_at(eps: float) -> str:
    return f"candidate_repetition_rate_eps_{eps:g}"


# The confirmation probe (round parameter `diversity_confirm`): an ε that passes the gate's
# probe is measured again on a second, independent one before it may be promoted.


def confirm_ok_at(eps: float) -> str:
    """1.0 when ε passed on the confirmation probe too (recorded only for an ε that passed
    the gate's own probe)."""
    return f"confirm_ok_eps_{eps:g}"


def candidate_distinct_2_confirm_at(eps: float) -> str:
    return f"candidate_distinct_2_confirm_eps_{eps:g}"


def candidate_repetition_rate_confirm_at(eps: float) -> str:
    return f"candidate_repetition_rate_confirm_eps_{eps:g}"


def on_confirm(name: str) -> str:
    """A reference's number on the confirmation probe: ``champion_distinct_2_confirm`` …"""
    return f"{name}_confirm"
