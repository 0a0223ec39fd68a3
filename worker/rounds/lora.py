"""LoRA rounds (``update_method: "lora"``): train a low-rank adapter, promote plain weights.

The round's update stage wraps its copy of the champion with a peft LoRA adapter
(:func:`wrap`): every champion weight is frozen, only the adapter's ``A`` and ``B`` matrices
train, so gradients and AdamW state cover a fraction of a percent of the parameters. After
training the adapter is merged into the weights it adapts and peft's wrappers are removed
(:func:`merge`): the candidate is an ordinary ``transformers`` model again, so evaluation,
the diversity gate, promotion and serving see exactly what a full round gives them, and the
published checkpoint is a plain merged Hugging Face directory (no adapter files, no peft
needed to load it).

The meta-step interpolates the adapter's delta only. :func:`wrap` returns the champion's
values of the adapted weights as a :class:`~worker.rounds.metastep.PartialState`; the
meta-step's delta is then ``merged − champion`` on those weights alone (``scale · B A``, in
float64), and ``θ = θ_champion + ε · delta`` leaves every other weight as it is — it never
changed. ε = 0 gives the champion, ε = 1 the merged adapter, bit for bit.

Target modules are peft's: a name matches a module whose dotted name equals it or ends with
``.name``. :func:`resolve_targets` checks them against the model when the round starts and
fails the round with the model's adaptable layer names when one matches nothing. peft is
imported lazily: a full round, the API and the serving engine never import it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from core.round_params import RoundParams
from worker.rounds.metastep import PartialState

__all__ = ["LoraTargetError", "adaptable_modules", "merge", "resolve_targets", "wrap"]

log = logging.getLogger(__name__)


class LoraTargetError(ValueError):
    """The round's LoRA target modules do not fit the model (the round fails with this)."""


def _adaptable_types() -> tuple[type[torch.nn.Module], ...]:
    # The layer types whose LoRA adapter merges into one plain weight. Embeddings are left
    # out: the output layer is often tied to the input embedding, and a merged adapter would
    # silently change both.
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def adaptable_modules(model: Any) -> dict[str, torch.nn.Module]:
    """The model's modules a LoRA adapter may target, by dotted name (the output layer
    excluded: see :func:`resolve_targets`)."""
    kinds = _adaptable_types()
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and isinstance(mod, kinds) and mod is not out_layer
    }


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _default_targets(model: Any) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = defaults.get(model_type or "")
    if not targets:
        raise LoraTargetError(
            f"no default LoRA target modules for model type {model_type!r}; set lora_target_modules"
        )
    return list(targets)


def _short_names(names: list[str]) -> list[str]:
    """The distinct last components of module names, in first-seen order (for messages)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def resolve_targets(model: Any, p: RoundParams) -> list[str]:
    """The names of the modules the round's adapter will wrap (sorted), or a
    :class:`LoraTargetError` saying which requested name fits nothing and what would."""
    targets = p.lora_target_modules or _default_targets(model)
    adaptable = adaptable_modules(model)
    all_names = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for target in targets:
        hits = [n for n in adaptable if _matches(n, target)]
        if hits:
            chosen.update(hits)
            continue
        others = [n for n in all_names if _matches(n, target)]
        if others:
            raise LoraTargetError(
                f"LoRA target module {target!r} names {len(others)} module(s) that LoRA "
                "cannot adapt here (only linear layers other than the output layer); "
                f"this model's linear layers: {', '.join(_short_names(list(adaptable)))}"
            )
        raise LoraTargetError(
            f"LoRA target module {target!r} matches no module of this model "
            f"({type(model).__name__}); its linear layers: "
            f"{', '.join(_short_names(list(adaptable)))}"
        )
    return sorted(chosen)


def wrap(model: Any, p: RoundParams) -> tuple[Any, PartialState]:
    """Wrap ``model`` (the round's own copy; changed in place) with a fresh LoRA adapter.

    Returns the peft model, whose only trainable parameters are the adapter's, and the
    champion's values of the weights the adapter will change (CPU clones, keyed as in the
    plain model's state dict): the meta-step's base.
    """
    from peft import LoraConfig, get_peft_model

    names = resolve_targets(model, p)
    modules = dict(model.named_modules())
    base = PartialState()
    for name in names:
        base[f"{name}.weight"] = modules[name].weight.detach().to("cpu", copy=True)
    cfg = LoraConfig(
        r=p.lora_rank,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        # Full names, not the round's suffixes: exactly the modules checked above.
        target_modules=names,
        bias="none",
    )
    # Adapter initialisation (A random, B zero) draws from torch's global generator: seed it
    # so a round's adapter depends on its seed only.
    torch.manual_seed(p.seed)
    wrapped = get_peft_model(model, cfg)
    trainable = sum(t.numel() for t in wrapped.parameters() if t.requires_grad)
    total = sum(t.numel() for t in wrapped.parameters())
    log.info(
        "LoRA rank %d alpha %d on %d modules (%s): %d trainable of %d parameters",
        p.lora_rank,
        p.lora_alpha,
        len(names),
        ", ".join(_short_names(names)),
        trainable,
        total,
    )
    return wrapped, base


def merge(wrapped: Any) -> Any:
    """Merge the adapter into the weights it adapts and drop peft's wrappers: the plain
    ``transformers`` model, with the same state-dict keys as before :func:`wrap`."""
    plain = wrapped.merge_and_unload()
    # peft may leave its config attribute on the unwrapped model; nothing downstream reads
    # it, and a plain model should not carry it into save_pretrained.
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    leftover = [n for n, _ in plain.named_modules() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"merging the LoRA adapter left peft modules behind: {leftover[:3]}")
    plain.eval()
    return plain
