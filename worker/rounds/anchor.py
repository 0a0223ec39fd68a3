"""KL anchor: keep the update's predictions on real text close to the lineage's base.

With ``kl_anchor > 0`` the update adds, for every real-text row of a batch (the replay
passages; in the ``real_only*`` modes every row), ``kl_anchor × KL(p_base ‖ p_candidate)``
summed over the row's predicted positions and divided by the batch's predicted tokens — the
same normaliser as the NLL, so ``kl_anchor = 1`` weighs a replay token's KL like its NLL.

Memory: the base (the lineage's v1, :func:`core.registry.lineage_root`) is loaded only for a
moment. Before the update, it scores the real-text windows once and keeps, per predicted
position, its top-k log-probabilities and their token ids (``k = kl_anchor_top_k``, float32 +
int32: 64 × 8 bytes a token, ~0.5 MB for the default round's ~1k replay tokens); then it is
freed, so the update holds the base's weights at no point (when the champion *is* the base,
the champion scores them and nothing is loaded). The KL is taken between the two models'
distributions coarsened to k + 1 outcomes — the base's top-k tokens and one bucket for the
rest of the vocabulary: ``Σ_k p_k (log p_k − log q_k) + p_rest (log p_rest − log q_rest)``
with ``q`` the candidate's full softmax. It is a proper KL (≥ 0, 0 where the candidate
predicts as the base does) and a lower bound of the full one.

The term needs the candidate's logits for the real rows: :meth:`Anchor.loss` runs its own
forward on those rows only (the NLL's forward is left as it is), so the hook in
:func:`worker.rounds.update.finetune` is one call, and the extra compute is the real rows'
share of each batch, only when the anchor is on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core import registry
from worker.rounds.diversity_gate import weights_key
from worker.rounds.evaluate import collate, length_batches, model_device, split_windows

__all__ = ["Anchor", "build_anchor", "open_base", "window_key"]

log = logging.getLogger(__name__)

Key = tuple[int, ...]


def window_key(window: Sequence[int]) -> Key:
    return tuple(window)


@dataclass
class Anchor:
    """The base's top-k log-probs per real-text window, keyed by the window's ids."""

    weight: float
    top_k: int
    targets: dict[Key, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    base_version: int | None = None

    @property
    def tokens(self) -> int:
        return sum(int(lp.shape[0]) for lp, _ in self.targets.values())

    def _row_kl(self, logits: torch.Tensor, key: Key) -> torch.Tensor:
        """Summed top-k KL over one row's predicted positions; ``logits`` [≥ n, V]."""
        base_lp, idx = self.targets[key]
        n = base_lp.shape[0]
        lg = logits[:n].float()
        q = lg.gather(-1, idx.to(lg.device, torch.long)) - torch.logsumexp(lg, -1, keepdim=True)
        p_lp = base_lp.to(lg.device)
        p = p_lp.exp()
        # The k tokens plus one bucket for the rest of the vocabulary, on both sides.
        rest_p = (1 - p.sum(-1)).clamp_min(1e-12)
        rest_q = (1 - q.exp().sum(-1)).clamp_min(1e-12)
        top = (p * (p_lp - q)).sum(-1)
        return (top + rest_p * (rest_p.log() - rest_q.log())).sum()

    def loss(self, model: Any, batch: Sequence[list[int]], count: int) -> torch.Tensor | None:
        """``weight × Σ KL / count`` over the batch's anchored rows; None when it has none."""
        rows = [w for w in batch if window_key(w) in self.targets]
        if not rows or self.weight <= 0:
            return None
        device = model_device(model)
        ids, mask, _ = collate(rows, 0, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        total = sum(
            (self._row_kl(logits[i], window_key(w)) for i, w in enumerate(rows)),
            start=torch.zeros((), device=device),
        )
        return total * (self.weight / count)

    @torch.inference_mode()
    def mean_kl(self, model: Any, batch_size: int = 8) -> float:
        """Mean KL per anchored token of ``model`` from the base (what the anchor holds)."""
        keys = list(self.targets)
        if not keys:
            return math.nan
        was_training = bool(model.training)
        model.eval()
        total, tokens = 0.0, 0
        try:
            for group in length_batches([len(k) for k in keys], batch_size):
                rows = [list(keys[j]) for j in group]
                ids, mask, _ = collate(rows, 0, model_device(model))
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                for i, w in enumerate(rows):
                    total += float(self._row_kl(logits[i], window_key(w)))
                    tokens += len(w) - 1
        finally:
            model.train(was_training)
        return total / max(1, tokens)


@torch.inference_mode()
def build_anchor(
    base: Any,
    real_ids: Sequence[list[int]],
    max_length: int,
    weight: float,
    top_k: int,
    batch_size: int = 8,
    base_version: int | None = None,
) -> Anchor:
    """Score the windows the update will cut from ``real_ids`` (same rule as
    :func:`worker.rounds.update.finetune`) with ``base``; keep its top-k log-probs."""
    windows = [w for _, w in split_windows(real_ids, max_length) if len(w) >= 2]
    anchor = Anchor(weight=weight, top_k=top_k, base_version=base_version)
    was_training = bool(base.training)
    base.eval()
    device = model_device(base)
    try:
        for group in length_batches([len(w) for w in windows], batch_size):
            rows = [windows[j] for j in group]
            ids, mask, _ = collate(rows, 0, device)
            logits = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
            k = min(top_k, logits.shape[-1])
            for i, w in enumerate(rows):
                lp = torch.log_softmax(logits[i, : len(w) - 1].float(), -1)
                vals, idx = lp.topk(k, dim=-1)
                anchor.targets[window_key(w)] = (vals.cpu(), idx.to(torch.int32).cpu())
    finally:
        base.train(was_training)
    log.info("kl anchor: %d windows, %d tokens, top-%d", len(anchor.targets), anchor.tokens, top_k)
    return anchor


def open_base(db: Any, lineage: str, champion: Any, champion_model: Any) -> tuple[Any, int, bool]:
    """The lineage base's model: ``(model, version, loaded)``. The champion itself when it is
    the base (``loaded`` False: nothing to free); the champion, with a warning, when the base's
    files are unusable."""
    root = registry.lineage_root(db, lineage)
    if root is None or weights_key(root.manifest) == weights_key(champion.manifest):
        return champion_model, champion.version, False
    try:
        loaded = registry.open(root, model_device(champion_model), torch.float32)
    except Exception as e:
        log.warning("kl anchor: base v%d unusable (%s); anchoring to the champion", root.version, e)
        return champion_model, champion.version, False
    return loaded.model, root.version, True
