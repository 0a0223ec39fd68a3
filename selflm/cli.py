"""`selflm`: serve | worker | migrate, and the client commands (round, checkpoints, ...)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

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
    from core.modeling.onednn import SERVE_ONEDNN_CACHE, limit_onednn_cache

    limit_onednn_cache(SERVE_ONEDNN_CACHE)  # before any torch op of this process
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


app = typer.Typer(
    name="selflm",
    help="selflm: a language model that improves itself while it serves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
) -> None:
    """Run the API (and, embedded, a worker beside it)."""
    _logging()
    raise typer.Exit(cmd_serve(Settings(), host, port))


@app.command(
    "worker",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker(ctx: typer.Context) -> None:
    """Run a Celery worker for self-update rounds (extra arguments go to Celery)."""
    _logging()
    raise typer.Exit(cmd_worker(Settings(), ctx.args))


@app.command("migrate")
def migrate() -> None:
    """Upgrade the database to the latest schema."""
    _logging()
    raise typer.Exit(cmd_migrate(Settings()))


def _client_commands() -> None:
    # The client commands talk to a running server over HTTP (selflm/commands/).
    from selflm.commands import checkpoints, generate, rounds

    app.add_typer(rounds.app, name="round")
    app.command("checkpoints")(checkpoints.checkpoints)
    app.command("promote")(checkpoints.promote)
    app.command("export")(checkpoints.export)
    app.command("generate")(generate.generate)
    app.command("chat")(generate.chat)


_client_commands()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        app(args=list(argv) if argv is not None else None, prog_name="selflm")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
