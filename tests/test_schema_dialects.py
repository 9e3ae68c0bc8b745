"""The partial index's dialect options: only the engine's dialect is loaded, and the WHERE is still made.

schema.py attaches ``<dialect>_where`` to the outbox's pending index when DDL
is made (create_missing, ddl_statements: the engine's or the given dialect)
or when ``schema.metadata`` is read (every dialect), not at import. Each check
runs in a fresh interpreter: this test process has read ``schema.metadata``
(tests/test_schema.py does at import), which attached both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

DIALECT_MODULES = ("sqlalchemy.dialects.postgresql", "sqlalchemy.dialects.sqlite")
PENDING = "ix_websauna_tasks_outbox_pending"

#: Runs the code given after it, then prints the dialect modules loaded and the value of ``result``.
PROBE = """
import json, sys
result = None
{code}
print(json.dumps({{"dialects": sorted(m for m in {modules!r} if m in sys.modules), "result": result}}))
"""


def probe(code: str, subprocess_env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(code=code, modules=DIALECT_MODULES)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **subprocess_env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_tables_loads_no_dialect(subprocess_env):
    found = probe("import websauna_tasks, websauna_tasks.schema, websauna_tasks.idempotency, "
                  "websauna_tasks.claim_check, websauna_tasks.outbox", subprocess_env)
    assert found["dialects"] == []


@pytest.mark.parametrize("name, other", [("postgresql", "sqlite"), ("sqlite", "postgresql")])
def test_the_ddl_of_one_dialect_has_the_partial_index_and_loads_only_that_dialect(name, other, subprocess_env):
    found = probe(f"from sqlalchemy.dialects import {name}\nfrom websauna_tasks import schema\n"
                  f"result = schema.ddl_statements({name}.dialect())", subprocess_env)
    pending = next(text for text in found["result"] if PENDING in text)
    assert pending.endswith("WHERE sent_at IS NULL")
    assert found["dialects"] == [f"sqlalchemy.dialects.{name}"]


@pytest.mark.parametrize("create", [
    "from websauna_tasks import schema\nschema.create_missing(engine)",
    # Neither create_missing() nor schema.metadata: the table's before_create event attaches the WHERE.
    "from websauna_tasks.schema import outbox_table\noutbox_table.create(engine)",
], ids=["create_missing", "the_tables_own_create"])
def test_creating_on_sqlite_makes_the_partial_index(create, tmp_path, subprocess_env):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    found = probe(f"import sqlalchemy as sa\nengine = sa.create_engine({url!r})\n{create}\n"
                  f"with engine.connect() as conn:\n"
                  f"    result = conn.execute(sa.text(\"SELECT sql FROM sqlite_master WHERE name = '{PENDING}'\"))"
                  f".scalar_one()", subprocess_env)
    assert found["result"].endswith("WHERE sent_at IS NULL")
    assert found["dialects"] == ["sqlalchemy.dialects.sqlite"]


def test_metadata_create_all_and_the_metadata_carry_both_dialects(tmp_path, subprocess_env):
    # schema.metadata is for tools rendering DDL for any database (Alembic's autogenerate writes the
    # options it finds into the migration): reading it attaches every dialect's WHERE.
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    found = probe(f"import sqlalchemy as sa\nimport websauna_tasks.schema\n"
                  f"metadata = websauna_tasks.schema.metadata\n"
                  f"engine = sa.create_engine({url!r})\nmetadata.create_all(engine)\n"
                  f"with engine.connect() as conn:\n"
                  f"    sql = conn.execute(sa.text(\"SELECT sql FROM sqlite_master WHERE name = '{PENDING}'\"))"
                  f".scalar_one()\n"
                  f"index = metadata.tables['websauna_tasks_outbox'].indexes\n"
                  f"index = next(i for i in index if i.name == '{PENDING}')\n"
                  f"result = [sql, sorted(index.dialect_kwargs)]", subprocess_env)
    sql, options = found["result"]
    assert sql.endswith("WHERE sent_at IS NULL")
    assert options == ["postgresql_where", "sqlite_where"]


@pytest.fixture
def private_database(database_url):
    """An empty PostgreSQL database of this test's own: its URL; dropped at the end."""
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    name = f"wsdialects_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_create_missing_on_postgresql_makes_the_partial_index(private_database, subprocess_env):
    found = probe(f"import sqlalchemy as sa\nfrom websauna_tasks import schema\n"
                  f"engine = sa.create_engine({private_database!r})\nschema.create_missing(engine)\n"
                  f"with engine.connect() as conn:\n"
                  f"    result = conn.execute(sa.text(\"SELECT indexdef FROM pg_indexes WHERE indexname = "
                  f"'{PENDING}'\")).scalar_one()\n"
                  f"engine.dispose()", subprocess_env)
    assert found["result"].endswith("WHERE (sent_at IS NULL)")
    assert found["dialects"] == ["sqlalchemy.dialects.postgresql"]
