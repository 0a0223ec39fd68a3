"""Next-token NLL without the [batch, length, vocabulary] logits.

A causal LM's forward ends in a linear head over the whole vocabulary: for SmolLM2 (49,152
tokens) a training batch of 8 × 256 ids makes 400 MB of float32 logits, and the loss and its
backward hold several tensors of that size. Here the decoder runs without its head and
:class:`_ChunkedHeadNll` applies the head to a few hundred positions at a time: each chunk's
logits give that chunk's NLL and, when gradients are wanted, its share of the gradients of the
hidden states and of the head's weight (``softmax − one-hot``), computed right there. The chunk's
logits are then dropped; backward only scales the stored gradients, so no logit is recomputed
and the matmuls are the same as those of the unchunked forward and backward.

Each chunk uses ``F.cross_entropy`` on float32 logits, as the unchunked path does, so the
numbers agree with it to float rounding. Under autocast the head's forward matmul and the
hidden states' gradient run in the autocast dtype (as ``nn.Linear`` would); the weight's
gradient is accumulated in float32 from the float32 ``softmax − one-hot``, in place.

Architectures whose logits are more than ``hidden @ W.T`` (soft-capping, logit scales, a
bias) are not on the list :data:`CHUNKED_TYPES`; they take the unchunked path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNKED_TYPES", "CHUNK_BYTES", "decoder_and_head", "full_logits", "head_nll"]

IGNORE_INDEX = -100
# One chunk's float32 logits, at most (a few such tensors live at once).
CHUNK_BYTES = 32 * 1024 * 1024
# Model types whose CausalLM forward is `lm_head(base_model(...).last_hidden_state)`.
CHUNKED_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo2", "smollm3"}
)


_full_logits = False


@contextmanager
def full_logits() -> Iterator[None]:
    """Inside the block every model takes the unchunked path (a benchmark's baseline)."""
    global _full_logits
    before, _full_logits = _full_logits, True
    try:
        yield
    finally:
        _full_logits = before


def decoder_and_head(model: Any) -> tuple[Any, Tensor] | None:
    """The model's decoder (no head) and its head's weight, or None where the head is not a
    plain bias-free linear map of the decoder's last hidden state."""
    if _full_logits:
        return None
    if hasattr(model, "get_base_model"):  # a peft wrapper: its adapters live in the model
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_TYPES:
        return None
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or base is None:
        return None
    if base is model:
        return None
    return base, head.weight


def _rows_per_chunk(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


class _ChunkedHeadNll(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N]) → (Σ NLL, NLL per position [N]).

    Only the sum is differentiable: its gradients are formed in forward, chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, compute: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        want_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        w = weight.to(compute)
        h_all = hidden.to(compute)
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, n, step):
            h = h_all[start : start + step]
            t = targets[start : start + step]
            logits = F.linear(h, w).float()
            nll[start : start + step] = F.cross_entropy(
                logits, t, ignore_index=IGNORE_INDEX, reduction="none"
            )
            if grad_h is None or grad_w is None:
                continue
            # d NLL / d logits = softmax − one-hot; zero on ignored positions.
            g = torch.softmax(logits, dim=-1)
            del logits
            valid = t != IGNORE_INDEX
            rows = valid.nonzero().squeeze(1)
            g[rows, t[rows]] -= 1.0
            g[~valid] = 0.0
            grad_h[start : start + step] = (g.to(compute) @ w).to(hidden.dtype)
            # Accumulated in float32 in place: no [V, H] product per chunk (under bf16 that
            # was a 56 MB product and its 113 MB float32 copy for SmolLM2).
            grad_w.addmm_(g.t(), hidden[start : start + step].float())
            del g
        total = nll.sum()
        ctx.mark_non_differentiable(nll)
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total, nll

    @staticmethod
    def backward(
        ctx: Any, grad_total: Tensor, _grad_nll: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # Scaled in place: nothing else holds them, and the head's weight gradient is as
        # large as the embedding (113 MB for SmolLM2), so a scaled copy would be one more.
        return (
            grad_h.mul_(grad_total) if grad_h is not None else None,
            grad_w.mul_(grad_total) if grad_w is not None else None,
            None,
            None,
        )


def head_nll(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ NLL, NLL per position)`` of ``hidden @ weight.T`` against ``targets`` (positions
    with :data:`IGNORE_INDEX` count zero). ``hidden`` is ``[..., H]``, ``targets`` ``[...]``;
    the per-position NLL comes back in ``targets``' shape, float32, without gradient."""
    device = hidden.device.type
    compute = (
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    )
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    total, nll = _ChunkedHeadNll.apply(  # type: ignore[no-untyped-call]
        flat_h, weight, targets.reshape(-1), compute
    )
    return total, nll.view_as(targets)
