"""The results database's schema version, and the migrations that bring an older database up to it.

A lab keeps one database for years while edgedeploy changes under it: every shape the tables have had is a numbered
migration, run in order, each in its own transaction (the two so far create tables; one that changes a table would
use Alembic's ``Operations``, e.g. ``add_column``, on SQLite and PostgreSQL alike). The number lives in
``edgedeploy_schema``. A database from before versioning (its ``runs`` table and no number) is version 1; a
database newer than this edgedeploy is refused rather than written with the wrong shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Column, Integer, MetaData, Table, inspect, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from edgedeploy.errors import StageError

VERSION_TABLE = Table("edgedeploy_schema", MetaData(), Column("version", Integer, nullable=False))


def _runs_and_samples(connection: Connection, tables: MetaData) -> None:
    tables.tables["runs"].create(connection, checkfirst=True)
    tables.tables["latency_samples"].create(connection, checkfirst=True)


def _tuning_records(connection: Connection, tables: MetaData) -> None:
    tables.tables["tuning_records"].create(connection, checkfirst=True)


# (version, what it adds, the step). Never edit a step that has shipped: add the next one (e.g. with
# alembic.operations.Operations(MigrationContext.configure(connection)).add_column(...)).
MIGRATIONS: list[tuple[int, str, Callable[[Connection, MetaData], None]]] = [
    (1, "runs and their raw latency samples", _runs_and_samples),
    (2, "tuning records shared by the lab (pipeline.tuning_share)", _tuning_records),
]
LATEST = MIGRATIONS[-1][0]


def current_version(connection: Connection) -> int:
    """The database's schema version: 0 for an empty database, 1 for one from before versioning."""
    names = set(inspect(connection).get_table_names())
    if VERSION_TABLE.name not in names:
        return 1 if "runs" in names else 0
    return int(connection.execute(select(VERSION_TABLE.c.version)).scalar() or 0)


def _set_version(connection: Connection, version: int) -> None:
    VERSION_TABLE.create(connection, checkfirst=True)
    connection.execute(VERSION_TABLE.delete())
    connection.execute(VERSION_TABLE.insert().values(version=version))


def migrate(engine: Engine, tables: MetaData, url: str, attempts: int = 3) -> list[int]:
    """Bring the database to LATEST; the versions applied. Two processes opening a new database at once both find
    it old, and the slower one's step fails on what the faster one made: it looks again."""
    for attempt in range(attempts):
        try:
            return _migrate_once(engine, tables, url)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    return []


def _migrate_once(engine: Engine, tables: MetaData, url: str) -> list[int]:
    with engine.connect() as connection:
        version = current_version(connection)
    if version > LATEST:
        raise StageError("The results database is newer than this edgedeploy", value=url,
                         expected=f"schema version {LATEST} or older", found=f"schema version {version}",
                         fix="upgrade edgedeploy on this host (the lab's other hosts wrote a newer schema)")
    applied = []
    for number, _what, step in MIGRATIONS:
        if number <= version:
            continue
        with engine.begin() as connection:
            step(connection, tables)
            _set_version(connection, number)
        applied.append(number)
    return applied
