"""The round's memory savings change no number: chunked LM-head NLL against full logits,
micro-batches against whole batches, a spilled best epoch, the parent read from its files."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from core.modeling.loader import LoadedBase, load_base
from worker.rounds import lm_loss
from worker.rounds.evaluate import collate, encode_texts, nll_terms, pad_id_of, perplexity
from worker.rounds.metastep import interpolate_into, meta_step, state_copy
from worker.rounds.update import TrainConfig, finetune, micro_batches
from worker.rounds.weights_file import FileWeights, compatible, load_into, spill, swapped_in

TEXTS = [
    "The cat sat on the mat. The cat sat on the mat.",
    "Lists are mutable sequences, tuples are immutable ones.",
    "Exceptions are raised with the raise statement and handled by try.",
    "A for loop iterates over the items of any sequence.",
    "Dictionaries map hashable keys to values.",
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny(request: pytest.FixtureRequest) -> LoadedBase:
    return load_base(f"tiny:{request.param}")


def _batch(tiny: LoadedBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = encode_texts(tiny.tokenizer, TEXTS)
    return collate(ids, pad_id_of(tiny.tokenizer), torch.device("cpu"))


def _grads(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_chunked_head_nll_and_grads_match_full_logits(
    tiny: LoadedBase, autocast: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy.deepcopy(tiny.model).eval()  # eval: no dropout, so two passes agree
    assert lm_loss.decoder_and_head(model) is not None, "the tiny archs take the chunked path"
    # Several chunks per batch, the last one partial.
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 7)
    ids, mask, labels = _batch(tiny)
    ctx = (
        torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    )

    with ctx:
        total, rows, counts = nll_terms(model, ids, mask, labels)
    grads = _grads(model, total)
    with lm_loss.full_logits(), ctx:
        ref_total, ref_rows, ref_counts = nll_terms(model, ids, mask, labels)
    ref_grads = _grads(model, ref_total)

    assert torch.equal(counts, ref_counts)
    assert not rows.requires_grad
    tol = 1e-5 if autocast is None else 2e-2
    torch.testing.assert_close(rows, ref_rows.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-8)
        err = (g - ref_grads[name]).abs().max() / scale
        assert err < (1e-4 if autocast is None else 5e-2), (name, float(err))


def test_scoring_is_unchanged_by_chunking(tiny: LoadedBase) -> None:
    chunked = perplexity(tiny.model, tiny.tokenizer, TEXTS, batch_size=2)
    with lm_loss.full_logits():
        full = perplexity(tiny.model, tiny.tokenizer, TEXTS, batch_size=2)
    assert chunked.tokens == full.tokens
    assert chunked.ppl == pytest.approx(full.ppl, rel=1e-5)


def test_micro_batches_cut_rows_by_padded_tokens() -> None:
    rows = [[1] * n for n in (3, 4, 5, 9, 10)]
    parts = micro_batches(rows, 12)
    assert [len(r) for p in parts for r in p] == [3, 4, 5, 9, 10]  # every row, in order
    assert all(len(p) * max(len(r) for r in p) <= 12 or len(p) == 1 for p in parts)
    assert micro_batches(rows, 0) == [rows]
    assert micro_batches(rows, 1) == [[r] for r in rows]  # never an empty slice


def test_checkpointed_micro_batches_spilled_match_whole_batches_in_ram(tmp_path: Path) -> None:
    tiny = load_base("tiny:llama")
    # float32: under bf16 autocast slices of a batch round differently (bf16 noise, ~1e-4).
    base: dict[str, Any] = dict(
        learning_rate=3e-3, epochs=3, batch_size=4, max_length=16, seed=3, patience=2
    )
    base["autocast"] = "off"
    plain, small = copy.deepcopy(tiny.model), copy.deepcopy(tiny.model)
    ref = finetune(plain, tiny.tokenizer, TEXTS * 2, TEXTS[:2], TrainConfig(**base))
    checkpointed: list[bool] = []
    got = finetune(
        small,
        tiny.tokenizer,
        TEXTS * 2,
        TEXTS[:2],
        TrainConfig(
            **base, micro_batch_tokens=24, spill_dir=str(tmp_path), gradient_checkpointing=True
        ),
        on_step=lambda *_: checkpointed.append(small.is_activation_checkpointing),
    )
    # Recomputed activations give the same step; checkpointing is on only while training.
    assert checkpointed and all(checkpointed) and not small.is_activation_checkpointing
    assert got.best_epoch == ref.best_epoch and len(got.epochs) == len(ref.epochs)
    for a, b in zip(got.epochs, ref.epochs, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.valid_loss == pytest.approx(b.valid_loss, rel=1e-4)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(small.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert list(tmp_path.iterdir()) == [], "the spilled best epoch is deleted"
    assert all(p.grad is None for p in small.parameters()), "gradients are freed"


def test_file_weights_stand_in_for_a_state_copy(tmp_path: Path) -> None:
    tiny = load_base("tiny:llama")
    tiny.model.save_pretrained(tmp_path / "ck", safe_serialization=True)
    files = FileWeights.of_checkpoint(tmp_path / "ck")
    assert compatible(tiny.model, files)
    ram = state_copy(tiny.model)

    # The meta-step with the parent read from its files: the same ε, scores and weights.
    def tuned() -> Any:
        m = copy.deepcopy(tiny.model)
        finetune(m, tiny.tokenizer, TEXTS, [], TrainConfig(learning_rate=3e-3, epochs=1))
        return m

    def score(m: Any) -> float:
        return perplexity(m, tiny.tokenizer, TEXTS[:2]).ppl

    a, b = tuned(), tuned()
    got = meta_step(a, files, [0.25, 0.5, 1.0], score, keep_delta=True)
    ref = meta_step(b, ram, [0.25, 0.5, 1.0], score, keep_delta=True)
    assert got.epsilon == ref.epsilon and got.scores == ref.scores
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    # ε = 0 through the lazy delta gives back the parent bit for bit.
    assert got.delta is not None
    interpolate_into(a, files, got.delta, 0.0)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in ram.items())

    # swapped_in holds the parent for the block and restores the model exactly.
    c = tuned()
    own = state_copy(c)
    with swapped_in(c, files):
        assert all(torch.equal(c.state_dict()[k], v) for k, v in ram.items())
    assert all(torch.equal(c.state_dict()[k], v) for k, v in own.items())
    assert c.lm_head.weight is c.model.embed_tokens.weight, "ties survive"

    # A spilled state loads back exactly and its file goes with clear().
    spilled = spill(c, tmp_path / "spill" / "x.safetensors")
    load_into(a, spilled)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in own.items())
    spilled.clear()
    assert not (tmp_path / "spill" / "x.safetensors").exists()


def test_file_weights_refuse_a_file_changed_after_verification(tmp_path: Path) -> None:
    tiny = load_base("tiny:llama")
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    files = FileWeights.of_checkpoint(tmp_path)
    key = next(iter(files))
    assert files[key].shape  # readable while unchanged
    path = next(tmp_path.glob("*.safetensors"))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(RuntimeError, match="changed on disk"):
        files[key]
