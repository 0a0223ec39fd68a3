"""Engine and session factory, plus running the Alembic migrations programmatically."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# Defaults for callers that pass no settings (CLI tools, tests); the service passes its own.
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 15.0
POOL_TIMEOUT_S = 5.0
# A reply later than the statement timeout plus this is a partition, not a slow query.
CLIENT_MARGIN_S = 3.0


def _timed_connection_class(deadline_s: float) -> Any:
    """A psycopg connection whose every wait for the server ends after `deadline_s`.

    PostgreSQL's statement_timeout only helps while the server can answer. A partition that
    drops packets (or a proxy that swallows them) leaves libpq waiting forever; this client-side
    deadline closes the connection instead, so the pool discards it and the caller gets an
    OperationalError (503 at the API) instead of a hung thread.
    """
    import psycopg
    from psycopg import errors

    class TimedConnection(psycopg.Connection):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval=interval, timeout=timeout or deadline_s)
            except errors.OperationalError as e:
                if type(e).__name__ == "_WaitTimeout":
                    self.pgconn.finish()  # state unknown: never reuse this connection
                    raise errors.OperationalError(
                        f"database did not answer within {deadline_s:g}s"
                    ) from None
                raise

    return TimedConnection


def migrations_dir() -> Path:
    """Where the top-level `migrations` package lives (source tree or installed wheel).

    Located, not imported: the schema's history sits above this layer.
    """
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `migrations` package is not installed beside `core`")
    return Path(next(iter(spec.submodule_search_locations)))


def make_engine(
    url: str,
    connect_timeout_s: int = CONNECT_TIMEOUT_S,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
    pool_timeout_s: float = POOL_TIMEOUT_S,
) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    timed: Any = None
    if url.startswith("postgresql"):
        # Bounded everything: connecting, each statement (server side), each wait for a reply
        # (client side), and waiting for a pooled connection.
        options = make_url(url).query.get("options", "")
        if isinstance(options, tuple):
            options = " ".join(options)
        ms = int(statement_timeout_s * 1000)
        kwargs["connect_args"] = {
            "connect_timeout": connect_timeout_s,
            "options": f"{options} -c statement_timeout={ms}".strip(),
            # A real partition: unacknowledged data or silent keepalives end the connection.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": int((statement_timeout_s + CLIENT_MARGIN_S) * 1000),
        }
        kwargs["pool_timeout"] = pool_timeout_s
        if "+psycopg" in url.split("://", 1)[0] and "async" not in url.split("://", 1)[0]:
            timed = _timed_connection_class(statement_timeout_s + CLIENT_MARGIN_S)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # The API's threads and the worker process share the file: wait on locks
        # instead of failing with "database is locked".
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if timed is not None:

        @event.listens_for(engine, "do_connect")
        def _timed_connect(_d: Any, _rec: Any, cargs: Any, cparams: Any) -> Any:
            return timed.connect(*cargs, **cparams)

    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


class Database:
    """Owns one SQLAlchemy engine and hands out sessions."""

    def __init__(self, url: str, **timeouts: Any) -> None:
        """`timeouts`: connect_timeout_s, statement_timeout_s, pool_timeout_s (make_engine)."""
        self.url = url
        self.engine = make_engine(url, **timeouts)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._factory() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> bool:
        from sqlalchemy import text

        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    @classmethod
    def from_settings(cls, settings: Any) -> Database:
        """The service's database with the timeouts its settings ask for."""
        return cls(
            settings.database_url,
            connect_timeout_s=settings.db_connect_timeout_s,
            statement_timeout_s=settings.db_statement_timeout_s,
            pool_timeout_s=settings.db_pool_timeout_s,
        )

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if url.startswith("sqlite"):
        make_engine(url).dispose()  # creates the parent directory
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
