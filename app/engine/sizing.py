"""The batch limit from the hardware, measured when the first model loads; and the warm-up
over the batch sizes the server will see (every load, so a swapped-in model starts warm).
On a CPU a later load warms up at batch 1 only: a freshly loaded model's first step at
each batch size costs what its later ones do there (88/86 ms at batch 1, 495/492 ms at 64,
SmolLM2-135M, float32), while a warm-up over every size took 20 s of a swap under load (at
nice 19) and ended in the longest serving gap of it.

One row's prompt of `context` tokens is prefilled, its cache copied to b rows, and decoding
steps are timed at b = 1, 2, 4, ... up to what memory allows. Rows per second of a step
rise with b while the hardware has room (a CPU's matrix units, a GPU's cores) and flatten
when it has none. The limit binds only when more requests are in flight than it allows,
and then (Little's law: latency = requests in flight / throughput) more throughput is also
less latency, queueing included. So the limit is the largest b whose throughput is within
`GAIN` of the best measured (:func:`choose_limit`): on the flat part a bigger batch costs
nothing, while a limit below the knee leaves clients queueing behind a batch that had room
(a limit of 8 where 32 fitted served at two thirds of the rate). Every size is timed, as the
best of a few steps, so that one noisy timing cannot stop the search early.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from core.modeling.decode import forward_kwargs
from core.modeling.params import SamplingParams
from core.modeling.sampling import choose_next

log = logging.getLogger(__name__)

# The most rows a measured limit may reach, per device type.
CAP = {"cpu": 64, "cuda": 256}
# A batch size whose step throughput is within this factor of the best measured one is as
# good as it (the timing's noise on a shared CPU is larger).
GAIN = 1.05
# Timed steps per batch size when measuring (the first one only warms up).
MEASURE_STEPS = 4
# A measured limit is at least this (a noisy measurement must not leave clients queueing).
FLOOR = 8
# Share of free memory the KV cache of a full batch may take, at `TYPICAL_CONTEXT` tokens.
MEMORY_SHARE = 0.5
TYPICAL_CONTEXT = 2048
# Context of the timed steps that pick the limit (a typical short prompt), and of the
# warm-up alone (a set limit, every later load): that only has to reach each batch size's
# first-call allocations, and its caches are what a swap adds on top of two models.
MEASURE_CONTEXT = 128
WARM_UP_CONTEXT = 16


@dataclass
class Sizing:
    limit: int
    # Per measured batch size: rows (tokens) per second of one decoding step.
    rows_per_s: dict[int, float] = field(default_factory=dict)
    memory_cap: int = 0
    seconds: float = 0.0


def kv_bytes_per_token(model: Any) -> int:
    """Key + value bytes one token takes in the cache, over all layers."""
    cfg = model.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1))
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 64))
    head_dim = int(getattr(cfg, "head_dim", 0) or hidden // heads)
    width = next(model.parameters()).element_size()
    return int(2 * layers * kv_heads * head_dim * width)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_cap(model: Any, device: torch.device, max_context: int) -> int:
    """The most rows whose caches, at a typical context, fit in a share of free memory."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    per_row = kv_bytes_per_token(model) * min(max_context, TYPICAL_CONTEXT)
    return max(1, int(free * MEMORY_SHARE // max(per_row, 1)))


def choose_limit(rates: dict[int, float], top: int) -> int:
    """The largest measured batch size within `GAIN` of the best step throughput, at least
    `FLOOR` (or `top`, if smaller)."""
    best = max(rates.values(), default=0.0)
    good = [b for b, r in rates.items() if r * GAIN >= best]
    return min(top, max([FLOOR, *good]))


def _sizes(top: int) -> list[int]:
    sizes, b = [], 1
    while b < top:
        sizes.append(b)
        b *= 2
    return [*sizes, top]


@torch.inference_mode()
def _step_rows_per_s(
    model: Any, one: DynamicCache, mask: torch.Tensor, b: int, steps: int
) -> float:
    """Rows per second of a decoding step at batch `b`: the best of `steps - 1` after one
    warm step (0.0 with one step: a warm-up only)."""
    cache_kw, _ = forward_kwargs(model)
    cache = copy.deepcopy(one)
    cache.batch_repeat_interleave(b)
    m = mask.expand(b, -1)
    ids = torch.zeros((b, 1), dtype=torch.long, device=mask.device)
    # The batched sampling path (top-k inside the candidates: never the row-by-row one).
    params = [SamplingParams(1, do_sample=True, temperature=0.8, top_k=50, top_p=0.95)] * b
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    best = float("inf")
    for k in range(steps):
        m = torch.cat([m, m.new_ones((b, 1))], dim=1)
        start = time.perf_counter()
        out = model(
            input_ids=ids,
            attention_mask=m,
            position_ids=m.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **{cache_kw: cache},
        )
        chosen, _ = choose_next(out.logits[:, -1, :], params, gens)
        if mask.device.type == "cuda":
            torch.cuda.synchronize(mask.device)
        if k:  # the first step pays first-call allocations
            best = min(best, time.perf_counter() - start)
        ids = chosen[:, None]
    return b / best if best < float("inf") else 0.0


@torch.inference_mode()
def measure(
    model: Any,
    device: torch.device,
    max_context: int,
    limit: int | None,
    context: int = 0,
    every_size: bool | None = None,
) -> Sizing:
    """Warm the model up over the batch sizes up to `limit` (or up to what memory and the
    device cap allow), and with `limit` None pick the batch limit from the step timings.
    With a set `limit`, `every_size` (default: on a GPU only) warms up every size, else batch
    1 alone (see the module's docstring)."""
    started = time.perf_counter()
    cap = memory_cap(model, device, max_context)
    top = limit if limit is not None else min(CAP.get(device.type, 64), cap)
    context = context or (MEASURE_CONTEXT if limit is None else WARM_UP_CONTEXT)
    context = max(1, min(context, max_context - 8))
    prompt = torch.arange(context, device=device)[None, :] % 100 + 10
    mask = torch.ones_like(prompt)
    cache_kw, has_keep = forward_kwargs(model)
    one = DynamicCache()
    extra: dict[str, Any] = {cache_kw: one, "use_cache": True}
    if has_keep:
        extra["logits_to_keep"] = 1
    model(input_ids=prompt, attention_mask=mask, **extra)
    # A set limit needs only the warm-up: one step per size.
    steps = MEASURE_STEPS if limit is None else 1
    every = device.type != "cpu" if every_size is None else every_size
    sizes = _sizes(top) if limit is None or every else [1]
    rates = {b: _step_rows_per_s(model, one, mask, b, steps) for b in sizes}
    sizing = Sizing(
        limit=limit if limit is not None else choose_limit(rates, top),
        rows_per_s=rates,
        memory_cap=cap,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "batch sizes %s: %s rows/s per step; memory allows %d; limit %d (%s) in %.1fs",
        list(rates),
        [round(r, 1) for r in rates.values()],
        cap,
        sizing.limit,
        "set" if limit is not None else "measured",
        sizing.seconds,
    )
    return sizing
