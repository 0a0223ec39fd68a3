"""`selflm serve | worker | migrate`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from core.settings import Settings
from selflm.supervise import WorkerSupervisor, exit_on_sigterm, public_bind_error

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


def cmd_serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from app.main import create_app
    from core.db.session import Database, upgrade
    from core.registry import ensure_base_checkpoint

    refused = public_bind_error(settings, host)
    if refused is not None:
        log.error("%s", refused)
        print(f"selflm: {refused}", file=sys.stderr)
        return 2
    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)
    db = Database(settings.database_url)
    ensure_base_checkpoint(settings, db)  # before the worker starts: one importer
    db.dispose()
    exit_on_sigterm()
    supervisor = WorkerSupervisor(settings).start() if settings.is_embedded else None
    try:
        app = create_app(settings)
        app.state.worker_supervisor = supervisor
        uvicorn.run(app, host=host, port=port, log_config=None)
    finally:
        if supervisor is not None:
            supervisor.stop()
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
