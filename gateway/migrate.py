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


class BadRevision(Exception):
    """``gateway db downgrade`` was given a revision it cannot step down to."""


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


def downgrade(url: str, revision: str) -> str:
    """Step the database at ``url`` down to ``revision`` (a rollback: the newest revision of
    the version to run again); the revision it was at before. BadRevision for a revision this
    version does not know, none (an empty database), or one not below the database's."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        current = _known(engine)
    finally:
        engine.dispose()
    order = [r.revision for r in reversed(list(ScriptDirectory.from_config(alembic_config(url)).walk_revisions()))]
    if revision not in order:
        raise BadRevision(f"no schema revision {revision!r}: this version knows {order[0]} to {order[-1]} "
                          f"(the newest revision of the version to go back to is in the message it gives "
                          f"when it meets this database, or in its gateway/migrations/versions/)")
    if current is None:
        raise BadRevision("the database has no schema yet: there is nothing to step down")
    if order.index(revision) >= order.index(current):
        raise BadRevision(f"the database is at schema revision {current}, not above {revision}: nothing to step down "
                          f"('gateway db upgrade' goes up)")
    command.downgrade(alembic_config(url), revision)
    return current


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
                          f"run that version, step the database down to {head} with that version's "
                          f"'gateway db downgrade {head}', or restore the database from before the upgrade")
    return current


def head() -> str:
    """This version's newest schema revision."""
    return _script()[0]


def current_is_head(engine) -> bool:  # type: ignore[no-untyped-def]
    return _known(engine) == _script()[0]
