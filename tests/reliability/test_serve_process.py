"""§4 supervision, §10 SIGTERM and §12 public interface, on a real `selflm serve`.

A real `selflm serve` process (embedded Celery worker, SQLite, tiny:llama): its worker is
killed with SIGKILL and comes back (restart with backoff, visible in /health); SIGTERM to
serve stops the worker too (uvicorn re-raises the signal; the old code left it orphaned);
and serve refuses a non-loopback interface without API keys.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
    env.update(
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_CHECKPOINT_DIR=str(tmp / "checkpoints"),
        SELFLM_DATABASE_URL=f"sqlite:///{tmp / 'selflm.db'}",
        SELFLM_DEVICE="cpu",
        SELFLM_EMBEDDED_WORKER="true",
        **extra,
    )
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(pred: Any, timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen; serve log:\n{log.read_text()[-4000:]}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(
            lambda: httpx.get(base + "/health/ready", timeout=5).status_code == 200,
            180,
            "serve becoming ready",
            log,
        )
        yield proc, base, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _embedded(base: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(base + "/health", timeout=5).json()
    return dict(body["details"]["workers"]["embedded"])


def test_embedded_worker_is_restarted_and_sigterm_stops_it(
    serve: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, base, log = serve
    first = _embedded(base)
    assert first["alive"] and first["restarts"] == 0
    # kill -9 of the whole worker (its own process group: Celery's main and pool children)
    os.killpg(first["pid"], signal.SIGKILL)
    second = _wait(
        lambda: (w := _embedded(base))["restarts"] == 1 and w["alive"] and w,
        60,
        "the embedded worker's restart",
        log,
    )
    assert second["pid"] != first["pid"] and second["last_exit"] == -signal.SIGKILL
    _wait(
        lambda: httpx.get(base + "/health/ready", timeout=5).status_code == 200,
        60,
        "readiness after the restart",
        log,
    )

    # SIGTERM to serve: it must stop, and take its worker (the whole group) with it.
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=90)
    _wait(lambda: not _group_alive(second["pid"]), 60, "the worker stopping with serve", log)
    assert not _group_alive(first["pid"])


def test_serve_refuses_a_public_interface_without_keys(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "selflm.cli", "serve", "--host", "0.0.0.0", "--port", "1"]
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, timeout=120)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "SELFLM_API_KEYS" in err and "SELFLM_ALLOW_PUBLIC_WITHOUT_KEYS" in err
    assert not (tmp_path / "checkpoints").exists()  # refused before doing anything


def test_public_bind_rules() -> None:
    from core.settings import Settings
    from selflm.supervise import public_bind_error

    s = Settings(api_keys="")
    assert public_bind_error(s, "127.0.0.1") is None
    assert public_bind_error(s, "::1") is None
    assert public_bind_error(s, "localhost") is None
    assert public_bind_error(s, "0.0.0.0") is not None
    assert public_bind_error(s, "::") is not None
    assert public_bind_error(s, "example.org") is not None
    assert public_bind_error(Settings(api_keys="k1"), "0.0.0.0") is None
    assert public_bind_error(Settings(allow_public_without_keys=True), "0.0.0.0") is None
