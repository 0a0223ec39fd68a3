"""A benchmark's store: a fresh SQLite database whose v1 champion is the (reused) base
checkpoint, the fixed prompt list, and a perturbed candidate to swap to."""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.db.models import Checkpoint
from core.db.session import Database, upgrade
from core.registry import ensure_base_checkpoint
from core.settings import Settings
from worker.rounds.data import load_corpus, prompts_from

log = logging.getLogger("bench")


DEFAULT_MODEL = "bundled:smollm2-135m-instruct"


@dataclass
class BenchState:
    """A fresh SQLite database whose v1 champion is the (possibly reused) base checkpoint."""

    settings: Settings
    db: Database
    workdir: Path
    base_path: Path
    base_manifest: dict[str, Any]


def prepare_state(model: str, checkpoint_dir: str | None, workdir: Path) -> BenchState:
    """Fresh database in ``workdir``; the base model is imported into ``checkpoint_dir``
    (default: ``workdir/checkpoints``) on first use and reused on later runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    ck = Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else workdir / "checkpoints"
    db_path = (workdir / "bench.db").resolve()
    if db_path.exists():
        db_path.unlink()
    settings = Settings(
        database_url=f"sqlite:///{db_path}",
        checkpoint_dir=str(ck),
        base_model=model,
        embedded_worker=False,
        redis_url=None,
        api_keys="",
    )
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    started = time.perf_counter()
    champ = ensure_base_checkpoint(settings, db)
    log.info("base checkpoint %s ready in %.1fs", champ.path, time.perf_counter() - started)
    return BenchState(
        settings=settings,
        db=db,
        workdir=workdir,
        base_path=Path(champ.path),
        base_manifest=dict(champ.manifest),
    )


@contextmanager
def workdir_for(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` (kept afterwards) or a temporary directory (removed afterwards)."""
    if path:
        p = Path(path).resolve()
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    """A fixed prompt list: openings of passages of the default corpus's train split."""
    return prompts_from(load_corpus(None).train, n, random.Random(seed))


def add_candidate(state: BenchState, version: int = 2, noise: float = 1e-3, seed: int = 0) -> Path:
    """Write v1's weights, each multiplied by (1 + noise·N(0,1)), as candidate ``version``.

    The copy goes into ``workdir/candidates`` so a reused base store is never written to.
    """
    import torch

    from core.modeling.loader import load_checkpoint
    from core.store import write_checkpoint

    shutil.rmtree(state.workdir / "candidates", ignore_errors=True)  # a kept --workdir
    base = load_checkpoint(state.base_path, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.model.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    stored = write_checkpoint(
        base.model,
        base.tokenizer,
        state.workdir / "candidates",
        state.settings.lineage,
        version,
        source=f"bench: v1 perturbed ({noise:g})",
    )
    with state.db.session() as s:
        s.add(
            Checkpoint(
                lineage=state.settings.lineage,
                version=version,
                parent_version=1,
                path=str(stored.path),
                manifest=stored.manifest,
                status="candidate",
            )
        )
    del base
    return stored.path
