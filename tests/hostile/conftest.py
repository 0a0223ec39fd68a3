"""A real `selflm serve` process on tiny:llama for the hostile-input tests.

`serve(**env)` starts one on a free port with SQLite under a temporary directory (extra
`SELFLM_*` settings as keyword arguments) and stops it at the end of the module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url + "/health", timeout=10).json()
        return body

    def engine_stats(self) -> dict[str, Any]:
        details: dict[str, Any] = self.health()["details"]
        return details


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(root: Path, settings: dict[str, str]) -> Server:
    port = _free_port()
    env = dict(os.environ)
    env.update(
        SELFLM_DATABASE_URL=f"sqlite:///{root / 'selflm.db'}",
        SELFLM_CHECKPOINT_DIR=str(root / "checkpoints"),
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_DEVICE="cpu",
        SELFLM_DTYPE="float32",
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_API_KEYS="",
    )
    env.pop("SELFLM_REDIS_URL", None)
    env.update(settings)
    log = root / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=root,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"selflm serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise AssertionError(f"selflm serve did not become healthy:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(**settings: Any) -> Server:
        env = {f"SELFLM_{k.upper()}": str(v) for k, v in settings.items()}
        server = _start(tmp_path_factory.mktemp("serve"), env)
        started.append(server)
        return server

    yield start
    for server in started:
        _stop(server.proc)
