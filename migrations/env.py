"""Alembic environment.

The URL comes from the Alembic config when `core.db.session.upgrade` sets it (`selflm
migrate`, the embedded start, the tests), else from `SELFLM_DATABASE_URL` (the `alembic`
command line at the repository root, with `alembic.ini`).
"""

from __future__ import annotations

from alembic import context

from core.db.models import Base
from core.db.session import make_engine
from core.settings import Settings

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
