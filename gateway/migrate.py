"""Run Alembic migrations programmatically (``gateway db upgrade``)."""
from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

HERE = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    return cfg


class NewerSchema(Exception):
    """The database was migrated by a newer version of the gateway than this one."""


def upgrade(url: str, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision``; the revision it was at before (None:
    an empty database)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # private
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        before = _known(engine)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), revision)
    return before


@functools.cache
def _script() -> tuple[str, frozenset[str]]:
    """This version's newest revision and every revision it knows (read once: the migration
    files do not change while the gateway runs; /readyz asks on every probe)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head() or "", frozenset(r.revision for r in script.walk_revisions())


def _known(engine) -> str | None:  # type: ignore[no-untyped-def]
    """The database's revision, which this version knows; NewerSchema if it does not."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head, known = _script()
    if current is not None and current not in known:
        raise NewerSchema(f"the database is at schema revision {current}, which this version of the gateway does "
                          f"not know (its newest is {head}): a newer version migrated it; "
                          f"run that version, or restore the database from before the upgrade")
    return current


def head() -> str:
    """This version's newest schema revision."""
    return _script()[0]


def current_is_head(engine) -> bool:  # type: ignore[no-untyped-def]
    return _known(engine) == _script()[0]
