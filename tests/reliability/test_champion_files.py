"""§6: the served weights are memory the process owns; a broken champion is not fatal.

A real `selflm serve` (tiny:llama, SQLite): its champion's safetensors file is overwritten
and then truncated while it serves — it keeps answering with the same greedy output (the
old code served from a memory map of that file: SIGBUS, or silently different weights).
Started with a corrupt champion it serves the newest earlier version that verifies, and
/health says so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from core.db.session import Database, upgrade
from core.modeling.loader import tiny_model
from core.registry import ensure_base_checkpoint, promote, publish
from core.settings import Settings

GREEDY = {"inputs": "The weights on disk", "parameters": {"max_new_tokens": 12}}


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
    env.update(
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_CHECKPOINT_DIR=str(tmp / "checkpoints"),
        SELFLM_DATABASE_URL=f"sqlite:///{tmp / 'selflm.db'}",
        SELFLM_DEVICE="cpu",
        # The checkpoint's own dtype: nothing converts the tensors, so without owned memory
        # they would stay mapped from the file (bfloat16 would copy them by accident).
        SELFLM_DTYPE="float32",
        SELFLM_EMBEDDED_WORKER="false",
    )
    return env


@contextmanager
def serve(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=_env(tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(base + "/health/live", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(log.read_text()[-4000:])
        yield proc, base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _generate(base: str) -> Any:
    r = httpx.post(base + "/generate", json=GREEDY, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"], r.headers["x-model-version"]


def _weights(tmp: Path, version: int) -> Path:
    return tmp / "checkpoints" / "default" / f"v{version:06d}" / "model.safetensors"


def test_overwritten_then_truncated_champion_keeps_serving_the_same(tmp_path: Path) -> None:
    with serve(tmp_path) as (proc, base):
        before = _generate(base)
        f = _weights(tmp_path, 1)
        assert f.is_file()
        size = f.stat().st_size
        with f.open("r+b") as fh:  # in place: the same inode a mapping would see
            fh.write(os.urandom(size))
        assert _generate(base) == before
        with f.open("r+b") as fh:
            fh.truncate(0)
        assert _generate(base) == before
        assert _generate(base) == before
        assert proc.poll() is None  # no SIGBUS
        assert httpx.get(base + "/health").status_code == 200


def test_start_with_a_corrupt_champion_serves_the_previous_version(tmp_path: Path) -> None:
    env = _env(tmp_path)
    settings = Settings(
        base_model="tiny:llama",
        checkpoint_dir=env["SELFLM_CHECKPOINT_DIR"],
        database_url=env["SELFLM_DATABASE_URL"],
        device="cpu",
    )
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    ensure_base_checkpoint(settings, db)
    other = tiny_model("llama", seed=7)
    ref = publish(
        db,
        settings.checkpoint_dir,
        "default",
        other.model,
        other.tokenizer,
        parent_version=1,
        source="test",
    )
    assert ref.version == 2
    promote(db, "default", 2, redis_url=None)
    db.dispose()
    f = _weights(tmp_path, 2)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum catches it
    f.write_bytes(bytes(data))

    with serve(tmp_path) as (_, base):
        _, version = _generate(base)
        assert version == "1"
        h = httpx.get(base + "/health").json()
        assert h["status"] == "degraded" and h["serving_version"] == 1
        fb = h["details"]["fallback"]
        assert fb["champion_version"] == 2 and fb["serving_version"] == 1
        assert "checksum" in fb["reason"]
