"""Served traffic for the quality study's online-adaptation arm (``prompt_source: "served"``).

Before each round of such an arm the study starts a real ``selflm serve`` process on the
arm's own store (its SQLite database and checkpoints, ``SELFLM_RECORD_PROMPTS=1``), replays
the next slice of a fixed stream of domain questions through ``POST /generate`` and stops the
server. The API records each prompt in ``served_prompts``; the round then draws its prompts
from there (the lineage's most recent ``num_prompts``), exactly as a deployment that adapts
to what its users ask.

The stream is a text file, one question per line (``#`` comments and blank lines skipped);
round *i* gets questions ``[(i-1)·n, i·n)`` of it, wrapping around, so every arm and rerun
sees the same traffic. Bundled streams: ``streams/<corpus name>.txt``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("studies.quality")

HERE = Path(__file__).resolve().parent
STREAMS = HERE / "streams"
START_TIMEOUT_S = 600.0  # importing and loading a model on a busy 2-core machine


@dataclass(frozen=True)
class Replay:
    questions: list[str]
    recorded: int  # rows in served_prompts after the replay
    versions: list[int]  # x-model-version of each answer
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "traffic_requests": len(self.questions),
            "traffic_recorded": self.recorded,
            "traffic_model_versions": sorted(set(self.versions)),
            "traffic_seconds": self.seconds,
        }


def stream_for(domain_name: str) -> Path:
    """The bundled question stream of a domain corpus (by its name: ``pydoc``, ...)."""
    path = STREAMS / f"{domain_name}.txt"
    if not path.exists():
        known = sorted(p.stem for p in STREAMS.glob("*.txt"))
        raise ValueError(
            f"no traffic stream for domain {domain_name!r} (known: {known}); pass --traffic FILE"
        )
    return path


def load_stream(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    questions = [ln for ln in lines if ln and not ln.startswith("#")]
    if not questions:
        raise ValueError(f"traffic stream {path} holds no questions")
    return questions


def slice_for_round(stream: list[str], round_idx: int, n: int) -> list[str]:
    start = (round_idx - 1) * n
    return [stream[(start + k) % len(stream)] for k in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_env(settings: Any) -> dict[str, str]:
    from worker.rounds.train_modes import round_only_env

    env = dict(os.environ)
    for key in [k for k in env if k.startswith("SELFLM_")]:
        del env[key]  # only the arm's store, nothing from the caller's deployment
    for key in round_only_env():
        del env[key]  # the earlier rounds' oneDNN cache cap is theirs, not serving's
    env.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_CHECKPOINT_DIR=str(settings.checkpoint_dir),
        SELFLM_BASE_MODEL=settings.base_model,
        SELFLM_LINEAGE=settings.lineage,
        SELFLM_DEVICE=settings.device,
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_RECORD_PROMPTS="true",
        SELFLM_API_KEYS="",
    )
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def replay(
    settings: Any,
    db: Any,
    questions: list[str],
    log_path: Path,
    max_new_tokens: int = 32,
    concurrency: int = 4,
) -> Replay:
    """Start ``selflm serve`` on the store of ``settings``, send ``questions`` through
    ``POST /generate``, stop it. Raises when the server does not come up or a request fails."""
    import httpx

    from core.db.models import ServedPrompt

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=_server_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"selflm serve exited ({proc.returncode}); see {log_path}")
            try:
                if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"selflm serve did not become ready; see {log_path}")
            time.sleep(0.5)

        def ask(q: str) -> int:
            body = {"inputs": q, "parameters": {"max_new_tokens": max_new_tokens}}
            r = httpx.post(url + "/generate", json=body, timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:300]}")
            return int(r.headers["x-model-version"])

        # In order, a few at a time (the server batches them); order of recording follows
        # completion, which does not matter: the round takes the most recent n as a set.
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            versions = list(pool.map(ask, questions))
    finally:
        _stop(proc)
    from sqlalchemy import func, select

    with db.session() as s:
        recorded = int(s.scalar(select(func.count()).select_from(ServedPrompt)) or 0)
    took = time.perf_counter() - started
    log.info("traffic: %d questions served by v%s in %.1fs", len(questions), versions[-1], took)
    return Replay(questions, recorded, versions, took)
