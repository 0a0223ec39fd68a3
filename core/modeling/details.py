"""Per-token details of a response (TGI's `details`, OpenAI's `logprobs`): each generated
token's text and log-probability, and the prompt tokens' log-probabilities."""

from __future__ import annotations

from typing import Any

import torch

from core.modeling.decode import Row
from core.modeling.detok import Detokenizer, special_ids
from core.modeling.params import TokenInfo, TopToken


def token_details(row: Row, tokenizer: Any) -> list[TokenInfo]:
    """Each generated token, then the EOS token that ended the row (TGI reports it, special).

    Texts are decoded incrementally (core/modeling/detok.py: linear in the length), so the
    non-special texts add up to the generated text even where one character spans several
    tokens: the token that completes a character carries it, the ones before carry "".
    """
    special = special_ids(tokenizer)
    ids = list(row.generated)
    lps = list(row.logprobs)
    if row.eos_token is not None:
        ids.append(row.eos_token)
        lps.append(row.eos_logprob)
    detok = Detokenizer(tokenizer, special)
    pieces: list[str] = []
    last = -1  # the last non-special token: it carries what is left at the end
    for k, t in enumerate(ids):
        if t in special:
            pieces.append(tokenizer.decode([t], skip_special_tokens=False))
        else:
            pieces.append(detok.push(t))
            last = k
    if last >= 0:
        pieces[last] += detok.flush()
    return [
        TokenInfo(
            id=t,
            text=piece,
            logprob=lp,
            special=t in special,
            top=row.tops[k] if k < len(row.tops) else (),
        )
        for k, (t, lp, piece) in enumerate(zip(ids, lps, pieces, strict=True))
    ]


@torch.inference_mode()
def prompt_logprobs(
    model: Any, ids: list[int], top_n: int = 0
) -> tuple[list[float | None], list[tuple[TopToken, ...]]]:
    """Log-probability of each prompt token given the ones before it (None for the first),
    and its `top_n` alternatives: TGI's `decoder_input_details`, OpenAI's `echo` logprobs."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
    target = x[0, 1:]
    lps: list[float | None] = [None, *logp.gather(1, target[:, None])[:, 0].tolist()]
    tops: list[tuple[TopToken, ...]] = [()]
    if top_n > 0:
        vals, idx = logp.topk(top_n, dim=-1)
        tops += [
            tuple(TopToken(id=t, logprob=v) for t, v in zip(ti, vi, strict=True))
            for ti, vi in zip(idx.tolist(), vals.tolist(), strict=True)
        ]
    else:
        tops += [()] * (len(ids) - 1)
    return lps, tops
