"""The serving engine's own Llama forward (core/modeling/llama.py) computes what transformers'
``LlamaForCausalLM`` computes, loads from a checkpoint under the same names, and keeps
transformers' modelling stack out of a serving process."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from core import store
from core.modeling import llama, loader
from core.modeling.decode import Row, decode_batch
from core.modeling.details import prompt_logprobs
from core.modeling.packed import supports_packed
from core.modeling.params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def _serving(hf: Any) -> llama.LlamaForServing:
    """The serving forward over `hf`'s tensors, configured from its config.json's dict."""
    config = llama.serving_config(hf.config.to_dict())
    assert config is not None
    served, missing = llama.build(config, dict(hf.state_dict()))
    assert not missing
    return served.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[Any, llama.LlamaForServing, Any]:
    """transformers' tiny Llama and the serving forward over the same tensors."""
    base = loader.tiny_model("llama", seed=11)
    base.model.eval()
    return base.model, _serving(base.model), base.tokenizer


def _ids(tok: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, as the decoder builds them."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def test_which_configs_it_serves() -> None:
    from transformers import LlamaConfig

    config = loader.tiny_model("llama").model.config.to_dict()
    assert llama.serving_config(config) is not None
    assert llama.serving_config(loader.tiny_model("qwen2").model.config.to_dict()) is None
    assert llama.serving_config(loader.tiny_model("gpt2").model.config.to_dict()) is None
    scaled = {
        **config,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    }
    assert llama.serving_config(scaled) is None
    assert llama.serving_config({**config, "hidden_act": "gelu"}) is None
    assert llama.serving_config({**config, "num_key_value_heads": 3}) is None  # 4 heads
    assert llama.serving_config({**config, "hidden_size": "many"}) is None
    # A config.json that leaves keys out means transformers' LlamaConfig defaults.
    defaults = LlamaConfig()
    for key, value in llama.DEFAULTS.items():
        rope: Any = defaults.rope_parameters
        theirs = rope["rope_theta"] if key == "rope_theta" else getattr(defaults, key)
        assert theirs == value, key
    sparse = {
        k: config[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size")
    }
    sparse |= {"num_hidden_layers": 2, "num_attention_heads": 4}
    own = llama.serving_config(sparse)
    assert own is not None
    assert (own.num_key_value_heads, own.head_dim, own.tie_word_embeddings) == (4, 16, False)
    # transformers 4.x's rope keys
    legacy = {**config, "rope_parameters": None, "rope_theta": 5e5, "rope_scaling": None}
    assert (own := llama.serving_config(legacy)) is not None and own.rope_theta == 5e5


@torch.inference_mode()
def test_prefill_and_decode_steps_match_transformers(pair: Any) -> None:
    hf, served, tok = pair
    ids, mask = _ids(tok, ["The Python language is used for", "Hi", "def f(x): return"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = DynamicCache(), DynamicCache()
    outs = [
        m(input_ids=ids, attention_mask=mask, position_ids=positions, cache=c, use_cache=True)
        for m, c in zip((hf, served), caches, strict=True)
    ]
    real = mask.bool()
    torch.testing.assert_close(outs[1].logits[real], outs[0].logits[real], atol=1e-5, rtol=1e-5)
    for _ in range(3):  # decode steps over the cache, one new token per row
        nxt = outs[0].logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((3, 1))], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        outs = [
            m(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=c, use_cache=True)
            for m, c in zip((hf, served), caches, strict=True)
        ]
        torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    keep = mask.bool()[:, None, :, None]
    for mine, theirs in zip(caches[1].layers, caches[0].layers, strict=True):
        assert isinstance(mine, DynamicLayer) and isinstance(theirs, DynamicLayer)
        assert mine.keys is not None and theirs.keys is not None
        torch.testing.assert_close(mine.keys * keep, theirs.keys * keep, atol=1e-5, rtol=1e-5)
    # logits_to_keep, as the decoder's prefill asks for it
    whole = served(input_ids=ids).logits
    one = served(input_ids=ids, logits_to_keep=1).logits
    assert one.shape == (3, 1, whole.shape[-1])
    torch.testing.assert_close(one[:, 0], whole[:, -1])


def test_generation_and_prompt_logprobs_match_transformers(pair: Any) -> None:
    hf, served, tok = pair
    texts = ["Hello", "The Python language", "A", "def f(x):", "import os"]

    def run(model: Any) -> list[list[int]]:
        rows = [
            Row(
                prompt_ids=tok(t, add_special_tokens=False)["input_ids"],
                params=SamplingParams(8 + i, do_sample=bool(i % 2), top_p=0.9, seed=i),
            )
            for i, t in enumerate(texts)
        ]
        waiting = rows[2:]

        def admit(room: int) -> list[Row]:  # newcomers join the running batch (packed step)
            take = waiting[: min(room, 2)]
            del waiting[: len(take)]
            return take

        decode_batch(model, tok, rows[:2], admit=admit, max_rows=4)
        return [r.generated for r in rows]

    assert supports_packed(served)  # newcomers join through the packed step
    assert run(served) == run(hf)
    prompt = tok("The os module provides", add_special_tokens=False)["input_ids"]
    mine, theirs = prompt_logprobs(served, prompt, 3), prompt_logprobs(hf, prompt, 3)
    assert mine[0][0] is None and len(mine[0]) == len(prompt)
    assert mine[0][1:] == pytest.approx(theirs[0][1:], abs=1e-4)
    assert [[t.id for t in top] for top in mine[1]] == [[t.id for t in top] for top in theirs[1]]


@torch.inference_mode()
def test_bfloat16_logits_match_transformers_in_bfloat16(pair: Any) -> None:
    hf, _, tok = pair
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    served16 = _serving(hf16)
    assert served16.lm_head.weight.dtype == torch.bfloat16
    assert served16.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it
    ids, mask = _ids(tok, ["The Python language is used for", "Hi"])
    theirs = hf16(input_ids=ids, attention_mask=mask).logits
    mine = served16(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(mine[real].float(), theirs[real].float(), atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, pair: Any) -> Path:
    hf, _, tok = pair
    path = tmp_path_factory.mktemp("ck") / "v1"
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_load_checkpoint_serves_llama_with_its_own_forward(checkpoint: Path, pair: Any) -> None:
    cpu = torch.device("cpu")
    served = loader.load_checkpoint(checkpoint, cpu, torch.bfloat16, serving=True)
    trained = loader.load_checkpoint(checkpoint, cpu, torch.bfloat16)
    assert isinstance(served.model, llama.LlamaForServing)
    assert not isinstance(trained.model, llama.LlamaForServing)  # rounds train transformers'
    assert served.model.lm_head.weight is served.model.model.embed_tokens.weight  # tied
    assert {p.dtype for p in served.model.parameters()} == {torch.bfloat16}
    theirs = dict(trained.model.named_parameters())
    for name, p in served.model.named_parameters():
        assert torch.equal(p, theirs[name]), name


def test_a_checkpoint_missing_a_weight_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(store.CheckpointError, match="up_proj"):
        loader.load_checkpoint(broken, torch.device("cpu"), torch.float32, serving=True)


def test_a_serving_process_never_imports_transformers_modelling(checkpoint: Path) -> None:
    """What a replica does for a Llama checkpoint — import the app, load, decode — leaves
    ``transformers.modeling_utils`` (and torch._dynamo, sympy) unimported."""
    script = f"""
import json, sys, torch
from pathlib import Path
import app.main
from core.modeling.loader import load_checkpoint
from core.modeling.decode import Row, decode_batch
from core.modeling.params import SamplingParams
path = Path({str(checkpoint)!r})
loaded = load_checkpoint(path, torch.device("cpu"), torch.float32, serving=True)
rows = [Row(prompt_ids=[1, 2, 3], params=SamplingParams(4, do_sample=True, seed=1))]
decode_batch(loaded.model, loaded.tokenizer, rows)
print(json.dumps({{
    "tokens": len(rows[0].generated),
    "imported": [m for m in ("transformers.modeling_utils", "torch._dynamo", "sympy")
                 if m in sys.modules],
}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"tokens": 4, "imported": []}
