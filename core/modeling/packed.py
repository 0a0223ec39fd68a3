"""A packed step: the running rows' next tokens and the newcomers' prompts in one forward.

Without it, a request that joins a running batch is prefilled on its own: one more pass over
every weight matrix for a handful of rows, while the batch waits. Here the linear layers
(most of a step's time on a CPU) run once over the flat list of all tokens — the running
rows' one token each, then every newcomer's prompt — as vLLM and TGI do; only attention is
split: the running rows attend over their KV cache, each newcomer causally over its own
prompt. The newcomers' keys and values come back for decode.py to append to the batch.

Only for decoder-only models of the Llama layout (Llama, Qwen2; no sliding window), checked
by `supports_packed`; any other model joins rows the unpacked way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from core.modeling.llama import attend

PACKED_MODEL_TYPES = frozenset({"llama", "qwen2"})
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")


def supports_packed(model: Any) -> bool:
    """Whether `packed_step` reproduces `model`'s forward (Llama layout, full attention)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if (
        config is None
        or inner is None
        or getattr(config, "model_type", None) not in (PACKED_MODEL_TYPES)
    ):
        return False
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if not hasattr(model, "lm_head") or getattr(config, "final_logit_softcapping", None):
        return False
    for layer in inner.layers:
        if not all(hasattr(layer, a) for a in _LAYER_PARTS):
            return False
        attn = layer.self_attn
        if not all(hasattr(attn, a) for a in _ATTN_PARTS):
            return False
        if getattr(attn, "sliding_window", None) is not None:
            return False
    return True


@dataclass
class Joined:
    """The newcomers after a packed step: per layer their keys and values, left-padded to the
    longest prompt ([newcomers, kv heads, width, head dim]), and their attention mask."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _left_pad_stack(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """[kv heads, n_i, d] tensors → [len(parts), kv heads, width, d], zeros on the left."""
    heads, _, dim = parts[0].shape
    out = parts[0].new_zeros((len(parts), heads, width, dim))
    for i, p in enumerate(parts):
        out[i, :, width - p.shape[1] :] = p
    return out


def packed_step(
    model: Any,
    cache: DynamicCache,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    prompts: list[list[int]],
) -> tuple[torch.Tensor, Joined]:
    """One forward for the running rows (their newest `tokens` at `positions`, attending
    through `mask`, which already has the new column) and the newcomers' `prompts`.

    Appends the running rows' new keys and values to `cache` in place (as the model's own
    forward does). Returns the logits of the next token — running rows first, then one per
    newcomer — and the newcomers' keys and values (`Joined`).
    """
    inner = model.model
    device = tokens.device
    b = tokens.shape[0]
    lens = [len(p) for p in prompts]
    if not all(lens):
        raise ValueError("a joining row has no prompt tokens")  # the engine refuses these
    spans, start = [], b
    for n in lens:
        spans.append((start, n))
        start += n
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    ids = torch.cat([tokens.to(torch.long), flat])
    pos = torch.cat([positions.reshape(-1), *(torch.arange(n, device=device) for n in lens)])
    total = ids.shape[0]

    h = inner.embed_tokens(ids)[None]  # [1, T, hidden]: the model's modules see one sequence
    cos, sin = inner.rotary_emb(h, pos[None])
    cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [T, 1, head dim]
    running_mask = mask.bool()[:, None, None, :]
    joined: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(total, -1, attn.head_dim)  # [T, heads, head dim]
        k = attn.k_proj(x).view(total, -1, attn.head_dim)
        v = attn.v_proj(x).view(total, -1, attn.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        outs: list[torch.Tensor] = []
        if b:
            cached = cache.layers[i]
            assert isinstance(cached, DynamicLayer)
            assert cached.keys is not None and cached.values is not None
            cached.keys = torch.cat([cached.keys, k[:b, :, None, :]], dim=2)
            cached.values = torch.cat([cached.values, v[:b, :, None, :]], dim=2)
            o = attend(q[:b, :, None, :], cached.keys, cached.values, running_mask, attn.scaling)
            outs.append(o.reshape(b, -1))
        keys, values = [], []
        for s, n in spans:
            qj, kj, vj = (t[s : s + n].transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
            o = F.scaled_dot_product_attention(
                qj[None], kj[None], vj[None], is_causal=True, scale=attn.scaling, enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1).reshape(n, -1))
            keys.append(kj)
            values.append(vj)
        joined.append((keys, values))
        h = h + attn.o_proj(torch.cat(outs)[None])
        h = h + layer.mlp(layer.post_attention_layernorm(h))

    h = inner.norm(h)[0]
    last = torch.tensor([*range(b), *(s + n - 1 for s, n in spans)], device=device)
    logits = model.lm_head(h[last])
    width = max(lens)
    new_mask = torch.zeros((len(lens), width), dtype=mask.dtype, device=device)
    for j, n in enumerate(lens):
        new_mask[j, width - n :] = 1
    kv = [(_left_pad_stack(ks, width), _left_pad_stack(vs, width)) for ks, vs in joined]
    return logits, Joined(kv=kv, mask=new_mask)
