"""A real `selflm serve` on a free port for tests that talk HTTP (the CLI, the dashboard).

Test modules put `tests/` on sys.path and import `live_fixture` (the `live` fixture) from here.

PostgreSQL for the records, Celery's filesystem transport in the test's own directory for
the queue, and the real Celery worker that `serve` starts beside the API (embedded), all on
tiny:llama. Nothing is shared with other tests: the broker folder and database are private.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# Small but real: every stage runs on the tiny model (as in tests/worker/test_rounds_e2e.py).
SMALL: dict[str, Any] = {
    "num_prompts": 4,
    "samples_per_prompt": 3,
    "max_new_tokens": 16,
    "min_words": 3,
    "train_size": 6,
    "valid_size": 3,
    "eval_passages": 6,
    "diversity_prompts": 3,
    "epochs": 1,
    "batch_size": 4,
    "max_length": 48,
}
# Real replay text at a high rate: the candidate is genuinely better, so it is promoted.
BETTER = {
    **SMALL,
    "replay_fraction": 0.8,
    "learning_rate": 3e-3,
    "epochs": 2,
    "diversity_tolerance": 1.0,
    "base_diversity_tolerance": 1.0,
}
# A margin no candidate can beat: the round succeeds and is rejected.
REJECTED = {**SMALL, "promotion_margin": 0.9}


def as_sets(params: dict[str, Any]) -> list[str]:
    """`--set key=value` arguments for the CLI."""
    out: list[str] = []
    for k, v in params.items():
        out += ["--set", f"{k}={v}"]
    return out


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_round(self, round_id: int, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body: dict[str, Any] = httpx.get(f"{self.url}/update-rounds/{round_id}").json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                return body
            time.sleep(1)
        raise AssertionError(f"round {round_id} did not finish; server log:\n{self.tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(root: Path, database_url: str, **env: str) -> LiveServer:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
    environ.update(
        SELFLM_DATABASE_URL=database_url,
        SELFLM_CHECKPOINT_DIR=str(root / "checkpoints"),  # the broker folder sits beside it
        SELFLM_BROKER_URL="",
        SELFLM_EMBEDDED_WORKER="true",
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_DEVICE="cpu",
        SELFLM_DTYPE="float32",
        SELFLM_POLL_INTERVAL_S="0.5",
        **env,
    )
    log = root / "server.log"
    subprocess.run(  # as in production: `selflm migrate` before the first `serve`
        [sys.executable, "-m", "selflm.cli", "migrate"], env=environ, check=True, timeout=120
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log, environ)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"server not healthy after 300 s:\n{server.tail()}")


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def stop(server: LiveServer) -> None:
    """SIGTERM: uvicorn shuts down and `serve` stops its worker; whatever is left is killed."""
    workers = children(server.proc.pid)  # the embedded worker, in its own session
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=60)
    for pgid in [server.proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    server.proc.wait()


@pytest.fixture(scope="module", name="live")
def live_fixture(
    tmp_path_factory: pytest.TempPathFactory, pg_module_db_url: str
) -> Iterator[LiveServer]:
    """A live server for one test module (import `live_fixture` into the module to use it)."""
    server = start(tmp_path_factory.mktemp("live"), pg_module_db_url)
    try:
        yield server
    finally:
        stop(server)
