"""`selflm serve | worker | migrate`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from core.settings import Settings

log = logging.getLogger("selflm")


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SELFLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cmd_migrate(settings: Settings) -> int:
    from core.db.session import upgrade

    upgrade(settings.database_url)
    log.info("database at head: %s", settings.database_url.split("@")[-1])
    return 0


def start_worker_process(settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # Pin what the API resolved (absolute paths) so both processes see the same state.
    env.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_CHECKPOINT_DIR=settings.checkpoint_dir,
        SELFLM_BROKER_URL=settings.broker_url,
        SELFLM_BASE_MODEL=settings.base_model,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "selflm.cli", "worker"], env=env, start_new_session=True
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    # Warm shutdown first (Celery finishes or requeues the task), then force.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cmd_serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from app.main import create_app
    from core.db.session import Database, upgrade
    from core.registry import ensure_base_checkpoint

    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)
    db = Database(settings.database_url)
    ensure_base_checkpoint(settings, db)  # before the worker starts: one importer
    db.dispose()
    worker = start_worker_process(settings) if settings.is_embedded else None
    if worker is not None:
        log.info("started embedded Celery worker (pid %d)", worker.pid)
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_config=None)
    finally:
        if worker is not None:
            stop_process(worker)
    return 0


def cmd_worker(settings: Settings, extra: Sequence[str]) -> int:
    from core.queue import QUEUE
    from worker.celery_app import app, configure

    configure(app, settings)
    argv = ["worker", "--loglevel=INFO", "-Q", QUEUE, "--concurrency=1", *extra]
    app.worker_main(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selflm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the API (and, embedded, a worker beside it)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    worker = sub.add_parser("worker", help="run a Celery worker for self-update rounds")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER)
    sub.add_parser("migrate", help="upgrade the database to the latest schema")
    args = parser.parse_args(argv)
    _logging()
    settings = Settings()
    if args.cmd == "serve":
        return cmd_serve(settings, args.host, args.port)
    if args.cmd == "worker":
        return cmd_worker(settings, args.celery_args)
    return cmd_migrate(settings)


if __name__ == "__main__":
    sys.exit(main())
