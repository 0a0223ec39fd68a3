"""The serving engine's own Llama forward: what a replica runs for a Llama checkpoint.

A replica only needs the forward pass of the model it serves. Importing transformers'
modelling stack for it (``transformers.modeling_utils`` and what it pulls in: ``torch._dynamo``,
``sympy`` through ``torch.distributed.tensor``, the hub-kernel and generation machinery) costs
~100 MiB of anonymous memory in every replica, 0.2× the bundled model's float32 weights
(docs/benchmarks.md, "What the steady floor is made of"). This module is that forward in
plain torch, with transformers' module and parameter names (``model.layers.0.self_attn.q_proj``
…), so checkpoints load by name, and ``core.modeling.packed`` drives it as it drives
``LlamaForCausalLM``; the KV cache is transformers' ``DynamicCache`` (``cache_utils`` does not
import the modelling stack). :func:`serving_config` says which configs it reproduces (checked
against ``LlamaForCausalLM`` in ``tests/modeling/test_llama_forward.py``); any other model is
served by transformers' class (``core.modeling.loader``). Rounds always train transformers'
class: this one has no training path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

MODEL_TYPES = frozenset({"llama"})
# transformers' LlamaConfig defaults for the keys a config.json may leave out (checked against
# LlamaConfig() in tests/modeling/test_llama_forward.py).
DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rope_theta": 10000.0,
}


@dataclass(frozen=True)
class ServingConfig:
    """The fields of a Llama ``config.json`` this forward and the engine read (the engine
    reads ``model.config`` for the context length, the KV-cache size and the EOS ids). Parsed
    here rather than by transformers' ``LlamaConfig``, whose module imports the modelling
    stack's kernels and ``torch.distributed.tensor`` (sympy): the cost this module avoids."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    sliding_window: None = None  # full attention (core.modeling.packed checks it)


def _rope(data: dict[str, Any]) -> tuple[str, float]:
    """(rope type, theta): transformers 5 writes ``rope_parameters``, 4.x ``rope_scaling`` /
    ``rope_theta``."""
    params = data.get("rope_parameters")
    if isinstance(params, dict):
        return str(params.get("rope_type", "default")), float(params.get("rope_theta", 10000.0))
    scaling = data.get("rope_scaling")
    kind = "default"
    if isinstance(scaling, dict):
        kind = str(scaling.get("rope_type", scaling.get("type", "default")))
    return kind, float(data.get("rope_theta", DEFAULTS["rope_theta"]))


def serving_config(data: dict[str, Any]) -> ServingConfig | None:
    """The config this forward serves a checkpoint with, or None where it would not compute
    what ``LlamaForCausalLM`` computes (another architecture, a RoPE scaling variant, another
    activation, tensor-parallel pretraining slices, sliding-window attention)."""

    def get(key: str) -> Any:
        return data.get(key, DEFAULTS.get(key))

    try:
        kind, theta = _rope(data)
        heads = int(data["num_attention_heads"])
        kv_heads = int(data.get("num_key_value_heads") or heads)
        hidden = int(data["hidden_size"])
        if (
            data.get("model_type") not in MODEL_TYPES
            or get("hidden_act") != "silu"
            or kind != "default"
            or get("pretraining_tp") not in (None, 1)
            or data.get("sliding_window") is not None
            or min(heads, kv_heads, hidden) <= 0
            or heads % kv_heads
        ):
            return None
        return ServingConfig(
            vocab_size=int(data["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(data.get("head_dim") or hidden // heads),
            max_position_embeddings=int(get("max_position_embeddings")),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=theta,
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            attention_bias=bool(get("attention_bias")),
            mlp_bias=bool(get("mlp_bias")),
            eos_token_id=data.get("eos_token_id"),
            bos_token_id=data.get("bos_token_id"),
            pad_token_id=data.get("pad_token_id"),
        )
    except (KeyError, TypeError, ValueError):
        return None  # transformers' own class reports what is wrong with it


class Linear(nn.Linear):
    """``nn.Linear`` that skips initialisation: every weight comes from the checkpoint (and
    initialising on the meta device would import ``torch._dynamo``, the cost this avoids)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:  # as Linear
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """cos / sin of the rotary embedding at the given positions, in float32 then `x`'s dtype."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # On the CPU even while the model is built on the meta device (build()).
        steps = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu")
        inv = 1.0 / (theta ** (steps / head_dim))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inner, bias=bias)
        self.up_proj = Linear(hidden, inner, bias=bias)
        self.down_proj = Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of `q` ([batch, heads, t, head dim]) over grouped keys and values ([batch,
    kv heads, width, head dim]) the way the CPU's SDPA kernels run it fast. One query token:
    each group's query heads become query positions over its one key/value head
    (transformers' ``pack_gqa``; `mask` [batch, 1, 1, width] is shared by them), 4× faster
    than ``enable_gqa`` with a mask at 32 rows here. More: keys and values repeated per head,
    as transformers does with a mask."""
    b, heads, t, dim = q.shape
    group = heads // k.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if t == 1:
        packed = q.reshape(b, heads // group, group, dim)
        o = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale)
        return o.reshape(b, heads, 1, dim)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Attention(nn.Module):
    sliding_window = None  # full attention only (serving_config())

    def __init__(self, config: ServingConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(heads * self.head_dim, hidden, bias=bias)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        b, t, _ = h.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(h).view(shape).transpose(1, 2)  # [b, heads, t, head dim]
        k = self.k_proj(h).view(shape).transpose(1, 2)
        v = self.v_proj(h).view(shape).transpose(1, 2)
        cos, sin = rope[0][:, None], rope[1][:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        o = attend(q, k, v, mask, self.scaling)
        out: torch.Tensor = self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ServingConfig, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out


class Body(nn.Module):
    """``LlamaModel``'s parts, under its names (``model.*`` in a checkpoint)."""

    def __init__(self, config: ServingConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config.head_dim, config.rope_theta)


@dataclass
class Output:
    """What callers read of transformers' ``CausalLMOutputWithPast``."""

    logits: torch.Tensor
    cache: DynamicCache | None

    @property
    def past_key_values(self) -> DynamicCache | None:  # its name before transformers 5.2x
        return self.cache


def causal_mask(
    attention: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    """[batch, 1, q_len, kv_len] booleans: causal over the last `q_len` of `kv_len` positions
    and the 2-D padding mask (1 = attend) where given. A query that could see no key (a left
    pad of a prompt) sees itself, so it never turns into NaN and reaches no real row's
    attention through its keys and values (which the padding mask hides)."""
    past = kv_len - q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, q, kv]
    if attention is not None:
        mask = mask & attention.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


class LlamaForServing(nn.Module):
    """``LlamaForCausalLM``'s inference forward (see the module docstring)."""

    # eos ids come from the config, as for transformers' class built from a config.
    generation_config = None

    def __init__(self, config: ServingConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:  # as transformers' models
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> Output:
        t = input_ids.shape[1]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
        inner = self.model
        h = inner.embed_tokens(input_ids)
        rope = inner.rotary_emb(h, position_ids)
        mask = causal_mask(attention_mask, t, past + t, h.device)
        for layer in inner.layers:
            h = layer(h, rope, mask, cache)
        h = inner.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return Output(logits=self.lm_head(h), cache=cache)


def build(
    config: ServingConfig, state: dict[str, torch.Tensor]
) -> tuple[LlamaForServing, list[str]]:
    """A :class:`LlamaForServing` holding `state`'s tensors as its parameters (assigned, not
    copied, so in the dtype they were read in), the output projection tied to the embedding
    where the config says so. Returns the model and the names of the parameters `state` did
    not provide (the caller refuses the checkpoint)."""
    with torch.device("meta"):
        model = LlamaForServing(config)
    tied = config.tie_word_embeddings
    names = dict(model.named_parameters(remove_duplicate=False))
    wanted = {n: t for n, t in state.items() if n in names}
    model.load_state_dict(wanted, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    absent = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    return model, absent
