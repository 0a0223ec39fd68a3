"""Parameters of a self-update round: the body of POST /update-rounds (all optional).

The defaults finish in a few minutes on a 2-core CPU with SmolLM2-135M.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from core.datafiles import DataFileError, check_name

# One explicit prompt, in characters (the count is capped by `prompts`' max_length).
MAX_PROMPT_CHARS = 16_384
# A LoRA target: a module name or dotted suffix ("q_proj", "self_attn.q_proj"), as peft
# matches it. Checked against the model's modules when the round starts (worker.rounds.lora).
LORA_TARGET = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"


class RoundParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # generate
    prompts: list[str] | None = Field(default=None, description="explicit prompts", max_length=512)
    prompt_source: Literal["corpus", "served", "file"] = "corpus"
    prompt_file: str | None = Field(
        default=None,
        description="name of a file in the server's round data directory (see PUT /data)",
        max_length=255,
    )
    num_prompts: int = Field(default=16, ge=1, le=512)
    samples_per_prompt: int = Field(default=4, ge=1, le=32)
    max_new_tokens: int = Field(default=48, ge=4, le=512)
    temperature: float = Field(default=0.8, gt=0, le=5)
    top_p: float = Field(default=0.95, gt=0, le=1)
    generate_batch_size: int = Field(default=16, ge=1, le=256)
    # select
    # `difficulty` since issue 15's 8 rounds on pydoc: test split −15.8 % against
    # `diversity`'s −11.5 %, distinct-2 −9.8 % against −16.1 % (docs/quality.md).
    strategy: Literal["random", "diversity", "difficulty"] = "difficulty"
    filters: bool = True
    min_words: int = Field(default=8, ge=1)
    max_repetition: float = Field(default=0.2, gt=0, le=1)
    dedup_threshold: float = Field(default=0.7, gt=0, le=1)
    train_size: int = Field(default=32, ge=1, le=10000)
    valid_size: int = Field(default=8, ge=1, le=10000)
    # update
    replay_fraction: float = Field(default=0.25, ge=0, lt=1)
    learning_rate: float = Field(
        default=5e-5,
        gt=0,
        le=1e-2,
        description="AdamW learning rate; 5e-5 suits full fine-tuning, LoRA rounds want about "
        "2e-4 (docs/benchmarks.md, LoRA rounds)",
    )
    epochs: int = Field(default=2, ge=1, le=20)
    batch_size: int = Field(default=8, ge=1, le=256)
    max_length: int = Field(default=256, ge=16, le=4096)
    # "lora": train a low-rank adapter (peft) on the champion's frozen weights, merged into
    # plain weights before the meta-step; "full": every weight (see docs/design.md).
    update_method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: int = Field(default=16, ge=1, le=4096)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=LORA_TARGET)]]
        | None
    ) = Field(
        default=None,
        description="module names to adapt (peft suffix match); default: peft's choice for "
        "the architecture (q_proj and v_proj for Llama)",
        min_length=1,
        max_length=64,
    )
    # What the update trains on (worker/rounds/traindata.py). "mixed": the selected samples
    # plus replay text. "real_only": real train-split text alone, as many tokens as mixed
    # trains on of real text (replay + the prompts inside the selected samples).
    # "real_only_matched": real text alone, as many tokens as mixed trains on in all.
    train_data: Literal["mixed", "real_only", "real_only_matched"] = "mixed"
    # Weight of a KL term to the lineage's base (v1) on the replay rows (worker/rounds/anchor.py)
    kl_anchor: float = Field(default=0.0, ge=0, le=100)
    kl_anchor_top_k: int = Field(default=64, ge=1, le=1024)  # base log-probs kept per position
    # The real text a round draws prompts and replay from: a fixed sample (seeded, the same in
    # every round of a lineage) of this many train-split passages — the little real text a
    # team may have. None: the whole train split. The gate's probe keeps the whole split.
    train_passages: int | None = Field(default=None, ge=1, le=100_000)
    # evaluate
    corpus: str | None = Field(
        default=None,
        description="'pydoc' (default) or the name of a file or folder in the round data "
        "directory (see PUT /data); never a server path",
        max_length=255,
    )
    eval_passages: int = Field(default=32, ge=1, le=5000)
    # 128: the probe's seed noise (bench/probe_noise.py) must sit under the tolerances
    diversity_prompts: int = Field(default=128, ge=1, le=256)
    # "fixed": the same prompts and sampling seed every round (its numbers cached per
    # checkpoint); "per_round": drawn from the round's seed, so no lineage passes one fixed
    # probe round after round (the parent and base are measured again each round). Measured
    # worse over 3 rounds (repetition +48 %, docs/quality.md), hence not the default
    diversity_probe: Literal["fixed", "per_round"] = "fixed"
    # True: an ε that passes the gate on its probe is measured again on a second, independent
    # probe (other prompts and sampling seed: diversity_gate.probe_seeds(..., confirm=True)),
    # with the parent and base measured on it too, and promoted only if it passes both
    # (against the winner's curse of taking the first ε whose noisy reading passes). Dev
    # gate only; costs one more probe per ε that passes, plus the parent's and base's.
    # Measured over 3 rounds: confirmed every ε, drift unchanged (docs/quality.md), hence off
    diversity_confirm: bool = False
    # meta-step and decide
    meta_step: bool = True
    epsilon_grid: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0], min_length=1)
    gate: Literal["dev", "generated"] = "dev"
    promotion_margin: float = Field(default=0.005, ge=0, lt=1)
    diversity_tolerance: float = Field(default=0.05, ge=0, le=1)  # absolute, vs the parent
    base_diversity_tolerance: float = Field(default=0.05, ge=0, le=1)  # relative, vs the base
    # Absolute, vs real held-out dev text of the probe's size (worker/rounds/realtext.py): the
    # candidate's distance from it may exceed the base's by at most this, in either direction.
    real_diversity_tolerance: float = Field(default=0.045, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @field_validator("prompts", "prompt_file", "corpus")
    @classmethod
    def _text(cls, v: list[str] | str | None) -> list[str] | str | None:
        # Per-item limits: a round's params are stored and echoed by every listing. Text
        # must be valid Unicode: a lone surrogate ("\ud800") fails the database (a 500).
        for i, item in enumerate([v] if isinstance(v, str) else v or []):
            if len(item) > MAX_PROMPT_CHARS:
                raise ValueError(
                    f"item {i} has {len(item)} characters; the limit is {MAX_PROMPT_CHARS}"
                )
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"item {i} is not valid Unicode (lone surrogate)") from e
        return v

    @field_validator("prompt_file", "corpus")
    @classmethod
    def _data_name(cls, v: str | None) -> str | None:
        # Syntactic only: the API never looks at the filesystem for a request's names.
        if v is None or v == "pydoc":
            return v
        try:
            return check_name(v)
        except DataFileError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _check(self) -> RoundParams:
        if self.prompt_source == "file" and not self.prompt_file:
            raise ValueError("prompt_source 'file' needs prompt_file")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise ValueError("prompts must contain at least one non-empty prompt")
        if any(not 0 < e <= 2 for e in self.epsilon_grid):
            raise ValueError("epsilon_grid values must be in (0, 2]")
        if self.update_method != "lora" and self.lora_target_modules is not None:
            raise ValueError("lora_target_modules needs update_method 'lora'")
        return self
