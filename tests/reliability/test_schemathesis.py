"""Schema fuzzing: schemathesis over the OpenAPI document of a real `selflm serve`.

Bounded (a few examples per operation, a time budget, a fixed seed) so it fits in CI. Two
runs: no response may be a server error (5xx), and every response must match the document
(status code documented, body matching its schema).
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

import httpx
import pytest

MAX_EXAMPLES = os.environ.get("SELFLM_FUZZ_EXAMPLES", "8")
MAX_TIME_S = os.environ.get("SELFLM_FUZZ_SECONDS", "150")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
    env.update(
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_CHECKPOINT_DIR=str(tmp / "checkpoints"),
        SELFLM_DATABASE_URL=f"sqlite:///{tmp / 'selflm.db'}",
        SELFLM_DEVICE="cpu",
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_MAX_NEW_TOKENS_LIMIT="32",
    )
    log = tmp / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(url + "/health/live", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _schemathesis(url: str, checks: str, report: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(exe),
        "run",
        f"{url}/openapi.json",
        "--checks",
        checks,
        "--max-examples",
        MAX_EXAMPLES,
        "--max-time",
        MAX_TIME_S,
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(report),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=int(MAX_TIME_S) + 300, cwd=report
    )


def test_no_server_errors(base: str, tmp_path: Path) -> None:
    r = _schemathesis(base, "not_a_server_error", tmp_path)
    assert r.returncode == 0, r.stdout[-12000:]


def test_responses_match_the_document(base: str, tmp_path: Path) -> None:
    r = _schemathesis(
        base,
        "status_code_conformance,response_schema_conformance,content_type_conformance",
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-12000:]
