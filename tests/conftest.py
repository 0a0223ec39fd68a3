"""Shared fixtures: real PostgreSQL and SQLite databases, tiny-model settings, a live app.

Nothing here is mocked: PostgreSQL is the machine's server (``SELFLM_TEST_PG_URL`` or
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), the app is the real FastAPI app with
a real (tiny, random) model behind its real batching engine, or a real `selflm serve`
process (`serve`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from core.settings import Settings

PG_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _url_str(url: URL) -> str:
    return url.render_as_string(hide_password=False)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of the test PostgreSQL server's `test` database (skipped if unreachable, not on CI)."""
    url = os.environ.get("SELFLM_TEST_PG_URL", PG_DEFAULT_URL)
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        msg = f"PostgreSQL at {make_url(url).render_as_string()} is unreachable: {e}"
        if _in_ci():
            pytest.fail(msg + " (CI is set: a missing database is a failure, not a skip)")
        pytest.skip(msg)
    finally:
        engine.dispose()
    return url


def _create_database(base: URL, name: str) -> tuple[str, Callable[[], None]] | None:
    """CREATE DATABASE `name` via the server's `postgres` database; None if not permitted."""
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except (sa.exc.ProgrammingError, sa.exc.OperationalError):
        admin.dispose()
        return None

    def drop() -> None:
        with admin.connect() as conn:
            # FORCE ends any connection a failed test left open (PostgreSQL ≥ 13).
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return _url_str(base.set(database=name)), drop


def _create_schema(base: URL, name: str) -> tuple[str, Callable[[], None]]:
    """Fallback without CREATEDB: a private schema in the given database, via search_path."""
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        engine.dispose()

    url = base.update_query_dict({"options": f"-csearch_path={name}"})
    return _url_str(url), drop


def _fresh_pg(pg_url: str) -> Iterator[str]:
    base = make_url(pg_url)
    name = f"selflm_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    created = _create_database(base, name) or _create_schema(base, name)
    url, drop = created
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def pg_db_url(pg_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (or schema) for one test, removed afterwards.

    The name is unique per process and call, so parallel runs never share one.
    """
    yield from _fresh_pg(pg_url)


@pytest.fixture(scope="module")
def pg_module_db_url(pg_url: str) -> Iterator[str]:
    """Like `pg_db_url`, shared by the tests of one module (those that start servers)."""
    yield from _fresh_pg(pg_url)


# --------------------------------------------------------------------------- SQLite


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'selflm.db'}"


# --------------------------------------------------------------------------- settings and app


def _tiny_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "base_model": "tiny:llama",
        "checkpoint_dir": str(root / "checkpoints"),
        "database_url": f"sqlite:///{root / 'selflm.db'}",
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "api_keys": "",
        "embedded_worker": False,
        "lineage": "default",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def make_tiny_settings() -> Callable[..., Settings]:
    """Factory: `make_tiny_settings(root, **overrides)` → Settings for a tiny:llama store."""
    return _tiny_settings


@pytest.fixture
def tiny_settings(tmp_path: Path) -> Settings:
    return _tiny_settings(tmp_path)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real app on tiny:llama, started once per module (the lifespan runs: ~10 s)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = _tiny_settings(tmp_path_factory.mktemp("app"))
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


# --------------------------------------------------------------------------- a real server
# `serve(**settings)` (module scope): a `selflm serve` process on tiny:llama with SQLite in a
# temporary directory, extra SELFLM_* settings as keyword arguments; stopped at module end.


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
