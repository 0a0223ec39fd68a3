"""The baselines: the reference article's loops with plain transformers (batch-1
``model.generate``; Adam, batch 1, float32 training)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def load_reference(path: Path, device: str = "cpu") -> tuple[Any, Any]:
    """The reference article's way: plain ``from_pretrained`` in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.to(device).eval()
    return model, tok


@dataclass(frozen=True)
class RefResult:
    sequences: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
        }


def reference_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    lengths: Sequence[int],
    sample: bool = False,
    seed: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
) -> RefResult:
    """Sequential batch-1 ``model.generate`` (the reference loop), each sequence forced to
    exactly the given length (``min_new_tokens = max_new_tokens``) so both sides generate
    the same number of tokens. Rows with length 0 are skipped."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def one(ids: list[int], n: int, i: int) -> int:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": n,
            "min_new_tokens": n,
            "do_sample": sample,
            "pad_token_id": pad,
        }
        if sample:
            torch.manual_seed(seed + i)
            kwargs.update(temperature=temperature, top_p=top_p)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        return int(out.shape[1] - x.shape[1])

    pairs = [(ids, n) for ids, n in zip(prompt_ids, lengths, strict=True) if n > 0 and ids]
    if pairs:
        one(pairs[0][0], 2, 0)  # warm-up: first-call allocations are not the loop's cost
    tokens = 0
    start = time.perf_counter()
    for i, (ids, n) in enumerate(pairs):
        tokens += one(ids, n, i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return RefResult(sequences=len(pairs), tokens=tokens, seconds=seconds)


def padded_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    batch: int = 32,
    sample: bool = False,
    seed: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
) -> RefResult:
    """transformers' own batching: ``model.generate`` on left-padded batches of `batch`
    prompts, each row to EOS or `max_new_tokens`. Counts each row's tokens up to and with
    its EOS (as the server counts them); the padding after a finished row is not counted,
    though the static batch computes it."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id

    def run(chunk: Sequence[list[int]], n: int, b: int) -> int:
        width = max(len(x) for x in chunk)
        x = torch.tensor([[pad] * (width - len(c)) + list(c) for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        kwargs: dict[str, Any] = {"max_new_tokens": n, "do_sample": sample, "pad_token_id": pad}
        if sample:
            torch.manual_seed(seed + b)
            kwargs.update(temperature=temperature, top_p=top_p)
        out = model.generate(input_ids=x, attention_mask=mask, **kwargs)
        rows = out[:, width:].tolist()
        return sum(r.index(eos) + 1 if eos in r else len(r) for r in rows)

    ids = [i for i in prompt_ids if i]
    if ids:
        run(ids[:batch], 2, 0)  # warm-up at the batch's shape
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(ids), batch):
        tokens += run(ids[b : b + batch], max_new_tokens, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return RefResult(sequences=len(ids), tokens=tokens, seconds=seconds)


def reference_train(
    model: Any, windows: Sequence[list[int]], learning_rate: float, seed: int = 0
) -> RefResult:
    """The reference's update loop: Adam, batch 1, float32, ``loss.backward()`` per sample.

    Counts n - 1 predicted tokens per window, the same count as ``finetune``."""
    import torch

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    tokens = 0
    start = time.perf_counter()
    for w in windows:
        input_ids = torch.tensor([w], dtype=torch.long, device=device)
        outputs = model(input_ids, labels=input_ids.clone())
        loss = outputs[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += len(w) - 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    return RefResult(sequences=len(windows), tokens=tokens, seconds=seconds)
