"""A real ``selflm serve`` process for the benchmarks: start on a free port, wait for health,
stop; the request body and a warm-up.

Nothing is mocked: the server is ``python -m selflm.cli serve`` in a subprocess against the
benchmark's fresh SQLite database."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.state import BenchState
from core.settings import Settings

log = logging.getLogger("bench")


# Server settings that would change what is measured (auth, pub/sub, prompt recording).
_STRIPPED_ENV = (
    "SELFLM_REDIS_URL",
    "SELFLM_API_KEYS",
    "SELFLM_RECORD_PROMPTS",
    "SELFLM_BROKER_URL",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float  # process start → first healthy answer

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def server_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
    env.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_CHECKPOINT_DIR=settings.checkpoint_dir,
        SELFLM_BASE_MODEL=settings.base_model,
        SELFLM_LINEAGE=settings.lineage,
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_POLL_INTERVAL_S="0.5",
    )
    env.update(extra or {})
    return env


def start_server(
    state: BenchState, extra_env: Mapping[str, str] | None = None, timeout: float = 600
) -> Server:
    """``python -m selflm.cli serve`` on a free port; returns once /health answers 200."""
    port = free_port()
    log_path = state.workdir / f"server-{port}.log"
    started = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=server_env(state.settings, extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state.workdir,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, 0.0)
    log.info("starting server pid %d on port %d (log %s)", proc.pid, port, log_path)
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                server.started_s = time.monotonic() - started
                log.info("server healthy after %.1fs", server.started_s)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{server.tail()}")


def stop_server(server: Server, timeout: float = 30) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    log.info("server pid %d stopped", server.pid)


def health(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(server.url + "/health", timeout=30).json()
    return body


def server_info(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(server.url + "/info", timeout=30).json()
    return body


def generate_body(
    prompt: str,
    max_new_tokens: int,
    sample: bool = False,
    seed: int = 0,
    temperature: float = 0.8,
    top_p: float = 0.95,
) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if sample:
        params.update(do_sample=True, seed=seed, temperature=temperature, top_p=top_p)
    return {"inputs": prompt, "parameters": params}


def warm_up(server: Server, prompts: Sequence[str], n: int, max_new_tokens: int = 8) -> None:
    with httpx.Client(timeout=600) as c:
        for i in range(n):
            body = generate_body(prompts[i % len(prompts)], max_new_tokens)
            c.post(server.url + "/generate", json=body).raise_for_status()
    log.info("warm-up: %d requests", n)
