"""End to end: `python -m selflm.cli serve` on the bundled SmolLM2-135M, over real HTTP.

The service runs exactly as the README's run command starts it — default settings (SQLite,
server-less broker, embedded Celery worker beside the API, the bundled GGUF base model) —
in a fresh working directory, so the first start dequantises the GGUF into version 1.
Slow (about a minute on a CPU), but part of the default test run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.db.session import Database
from core.registry import get_champion
from core.store import verify_checkpoint

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300
PROMPT = "The capital of France is"
COMMON_WORDS = {
    "the", "a", "an", "of", "is", "and", "in", "to", "it", "city", "that", "was", "its",
    "for", "on", "with", "as", "by", "france", "paris", "capital", "country", "located",
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid → (parent pid, state, start time) for every process we can read."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces; the fields after its ')' are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid → start time of every live descendant of `root`."""
    table = _proc_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def _alive(pid: int, started: str) -> bool:
    entry = _proc_table().get(pid)
    # Same pid and start time (not a reused pid), and not a zombie awaiting its reaper.
    return entry is not None and entry[2] == started and entry[1] != "Z"


def _looks_like_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    plain = sum(c.isascii() and (c.isalpha() or c.isspace() or c in ".,;:'!?-") for c in text)
    return (
        len(words) >= 3
        and plain >= 0.9 * len(text.strip())
        and sum(w.lower() in COMMON_WORDS for w in words) >= 1
    )


def test_serve_bundled_smollm2_and_generate(tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # Defaults only: drop any SELFLM_ setting the calling shell may have.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    children: dict[int, str] = {}
    try:
        # -- wait for readiness ---------------------------------------------------------
        deadline = time.monotonic() + START_TIMEOUT_S
        health = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}:\n{log_text()[-6000:]}")
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"no healthy /health within {START_TIMEOUT_S}s:\n{log_text()[-6000:]}")
        assert health is not None
        print("health:", health.json())
        assert health.json()["serving_version"] == 1
        assert health.headers["x-model-version"] == "1"
        children = _descendants(server.pid)

        # -- generate ---------------------------------------------------------------------
        r = httpx.post(
            f"{base}/generate",
            json={
                "inputs": PROMPT,
                "parameters": {"max_new_tokens": 20, "do_sample": False, "details": True},
            },
            timeout=120,
        )
        print("generate:", r.status_code, dict(r.headers), json.dumps(r.json(), indent=None)[:600])
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == "1"
        text = r.json()["generated_text"]
        print(f"continuation of {PROMPT!r}: {text!r}")
        assert "Paris" in text or _looks_like_english(text), text
        assert 0 < r.json()["details"]["generated_tokens"] <= 20

        info = httpx.get(f"{base}/info", timeout=10).json()
        assert info["model_id"] == "bundled:smollm2-135m-instruct"
        assert info["model_version"] == 1

        # -- the base model became version 1 in the store, under the working directory ---
        ck = tmp_path / "data" / "checkpoints" / "default" / "v000001"
        manifest = verify_checkpoint(ck)
        assert manifest["source"] == "bundled:smollm2-135m-instruct"
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
        assert "quantization_config" not in json.loads((ck / "config.json").read_text())
        db = Database(f"sqlite:///{tmp_path / 'data' / 'selflm.db'}")
        try:
            with db.session() as s:
                champ = get_champion(s, "default")
                assert champ is not None and champ.version == 1
                assert Path(champ.path) == ck and champ.manifest == manifest
        finally:
            db.dispose()
    finally:
        # -- stop: the server and everything it started must go ---------------------------
        children.update(_descendants(server.pid))
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            pytest.fail(f"server ignored SIGINT for 90s:\n{log_text()[-6000:]}")
        print("server log tail:\n" + log_text()[-3000:])

    assert server.returncode in (0, 130, -signal.SIGINT), server.returncode
    match = re.search(r"embedded Celery worker \(pid (\d+)\)", log_text())
    assert match, "serve did not start the embedded worker"
    worker_pid = int(match.group(1))
    assert worker_pid in children, (worker_pid, children)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p, t) for p, t in children.items()):
        time.sleep(0.5)
    left = [p for p, t in children.items() if _alive(p, t)]
    assert not left, f"processes left behind by serve: {left}"
