"""The library's tables: schema.metadata for Alembic, ``ws-celery INI -- init [--sql]``, ``create_tables = never``.

Every database test gets a PostgreSQL database of its own, created and
dropped here, so that tables made or missing in one never show in another
(nor in the session's shared database).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy.dialects import postgresql, sqlite

import websauna_tasks.schema as schema
from websauna_tasks import TransactionalTask, task
from websauna_tasks.settings import CREATE_TABLES_KEY

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The tables of the modules this file knows; a table added to schema.py joins the checks through LIBRARY_TABLES.
KNOWN_TABLES = {"websauna_tasks_outbox", "websauna_tasks_done", "websauna_tasks_names", "websauna_tasks_iterations",
                "websauna_tasks_iteration_shards"}
LIBRARY_TABLES = set(schema.metadata.tables)


@task(name="tests.schema.idempotent_job", base=TransactionalTask, bind=True, idempotent=True)
def idempotent_job(self):
    return None


def main(global_config, **settings):
    """The application of this module's INI files; ``test.idempotent = true`` scans an idempotent task."""
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    if settings.get("test.idempotent") == "true":
        config.scan("tests.test_schema")
    return config.make_wsgi_app()


# -- without a database ----------------------------------------------------------------------------------

def test_one_metadata_holds_every_table_the_modules_use():
    from websauna_tasks import idempotency, iteration, names, outbox

    assert KNOWN_TABLES <= LIBRARY_TABLES
    assert schema.TABLES == tuple(schema.metadata.sorted_tables)
    # The modules' names are the very objects of the MetaData: one definition per table.
    assert outbox.outbox_table is schema.metadata.tables["websauna_tasks_outbox"]
    assert idempotency.done_table is schema.metadata.tables["websauna_tasks_done"]
    assert names.names_table is schema.metadata.tables["websauna_tasks_names"]
    assert iteration.iterations_table is schema.metadata.tables["websauna_tasks_iterations"]
    assert iteration.shards_table is schema.metadata.tables["websauna_tasks_iteration_shards"]
    assert idempotency.metadata is schema.metadata


def test_no_module_defines_a_table_of_its_own():
    # A Table(...) outside schema.py would be a table Alembic and init never see.
    package = ROOT / "websauna_tasks"
    found = [str(path.relative_to(ROOT)) for path in package.rglob("*.py")
             if path.name != "schema.py" and re.search(r"\bTable\(|\bMetaData\(", path.read_text())]
    assert found == [], ("define the library's tables in websauna_tasks/schema.py, in its one MetaData, so that "
                         "Alembic, init and the create_tables = never check see them")


@pytest.mark.parametrize("dialect", [postgresql.dialect(), sqlite.dialect()], ids=["postgresql", "sqlite"])
def test_the_ddl_creates_every_table_and_index_in_the_dialect(dialect):
    statements = schema.ddl_statements(dialect)
    created = {re.match(r"CREATE TABLE (\w+)", text).group(1) for text in statements if text.startswith("CREATE TABLE")}
    assert created == LIBRARY_TABLES
    indexes = [text for text in statements if text.startswith("CREATE INDEX")]
    assert len(indexes) == sum(len(table.indexes) for table in schema.TABLES) >= 3
    pending = next(text for text in indexes if "ix_websauna_tasks_outbox_pending" in text)
    assert pending.endswith("WHERE sent_at IS NULL")
    # Parents first: the shards refer to the iterations.
    names = [re.match(r"CREATE TABLE (\w+)", text).group(1) for text in statements if text.startswith("CREATE TABLE")]
    assert names.index("websauna_tasks_iterations") < names.index("websauna_tasks_iteration_shards")


def include(**settings: str) -> Configurator:
    config = Configurator(settings={"websauna.celery_config": '{"broker_url": "memory://"}', **settings})
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    return config


@pytest.mark.parametrize("value", ["sometimes", "false", "1", "auto never", "nevr"])
def test_a_wrong_create_tables_value_stops_the_application(value):
    with pytest.raises(ConfigurationError, match=re.escape(CREATE_TABLES_KEY)) as caught:
        include(**{CREATE_TABLES_KEY: value})
    assert "auto or never" in str(caught.value) and repr(value) in str(caught.value)


@pytest.mark.parametrize("value, parsed", [("", "auto"), ("auto", "auto"), (" Never ", "never"), ("NEVER", "never")])
def test_create_tables_words(value, parsed):
    from websauna_tasks import get_task_settings

    assert get_task_settings(include(**{CREATE_TABLES_KEY: value}).registry).create_tables == parsed


def test_never_without_a_database_starts(tmp_path):
    # Nothing to check: no engine (the tables are checked when a request first needs one).
    config = include(**{CREATE_TABLES_KEY: "never"})
    config.make_wsgi_app()


# -- with a database of its own ------------------------------------------------------------------------------

@pytest.fixture
def fresh_db(database_url):
    """The URL of an empty PostgreSQL database private to this test, dropped at its end."""
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    name = f"wsschema_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def tables_of(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def settings_for(url: str, **extra: str) -> dict[str, str]:
    return {"sqlalchemy.url": url, "websauna.celery_config": '{"broker_url": "memory://"}', **extra}


@pytest.fixture
def cli(tmp_path, subprocess_env):
    """``cli(settings, *args)``: ``ws-celery INI -- args`` on an INI of this module's app; its CompletedProcess."""

    def run(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        lines = ["[app:main]", "use = call:tests.test_schema:main", *(f"{key} = {value}" for key, value in
                                                                     settings.items())]
        ini = tmp_path / "schema.ini"
        ini.write_text("\n".join(lines) + "\n")
        return subprocess.run([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--", *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, **subprocess_env})

    return run


def test_init_creates_the_tables_then_verifies_them(fresh_db, cli):
    url, engine = fresh_db
    first = cli(settings_for(url), "init")
    assert first.returncode == 0, first.stderr
    assert tables_of(engine) == LIBRARY_TABLES
    for name in LIBRARY_TABLES:
        assert re.search(rf"^  created {name}\b", first.stdout, re.M), first.stdout
    assert "with its indexes ix_websauna_tasks_outbox_pending, ix_websauna_tasks_outbox_sent" in first.stdout
    indexes = {index["name"] for index in sa.inspect(engine).get_indexes("websauna_tasks_outbox")}
    assert indexes == {"ix_websauna_tasks_outbox_pending", "ix_websauna_tasks_outbox_sent"}
    assert first.stdout.startswith(f"websauna_tasks tables in {sa.engine.make_url(url).render_as_string()}:\n")

    second = cli(settings_for(url), "init")
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    for name in LIBRARY_TABLES:
        assert re.search(rf"^  verified {name}: exists with its \d+ columns$", second.stdout, re.M), second.stdout


def test_init_adds_a_missing_index_and_reports_a_missing_column(fresh_db, cli):
    url, engine = fresh_db
    with engine.begin() as conn:
        # An outbox table from before the redeliveries column, without its indexes.
        conn.execute(sa.text("CREATE TABLE websauna_tasks_outbox (id VARCHAR(64) PRIMARY KEY, "
                             "app VARCHAR(255) NOT NULL, task_name VARCHAR(255) NOT NULL, args TEXT NOT NULL, "
                             "kwargs TEXT NOT NULL, options TEXT NOT NULL, created_at FLOAT NOT NULL, sent_at FLOAT)"))
    result = cli(settings_for(url), "init")
    assert result.returncode == 1
    assert "websauna_tasks_outbox exists but lacks column websauna_tasks_outbox.redeliveries" in result.stdout
    assert "created its missing indexes" in result.stdout
    assert result.stderr.count("\n") == 1 and "migration" in result.stderr, result.stderr
    # Not altered: a column is a migration's business.
    columns = {column["name"] for column in sa.inspect(engine).get_columns("websauna_tasks_outbox")}
    assert "redeliveries" not in columns
    assert tables_of(engine) == LIBRARY_TABLES


def test_init_sql_prints_the_ddl_and_touches_nothing(fresh_db, cli):
    url, engine = fresh_db
    result = cli(settings_for(url, **{CREATE_TABLES_KEY: "never"}), "init", "--sql")
    assert result.returncode == 0, result.stderr
    assert tables_of(engine) == set()
    assert "postgresql dialect" in result.stdout
    for name in LIBRARY_TABLES:
        assert f"CREATE TABLE {name} (" in result.stdout
    assert "CREATE INDEX ix_websauna_tasks_outbox_pending ON websauna_tasks_outbox (app, created_at) " \
           "WHERE sent_at IS NULL;" in result.stdout
    assert "TIMESTAMP WITH TIME ZONE" in result.stdout  # PostgreSQL's, not SQLite's
    # What it prints is what init runs: executed as it is, it makes the same tables.
    with engine.begin() as conn:
        conn.exec_driver_sql(result.stdout)
    assert tables_of(engine) == LIBRARY_TABLES
    assert schema.missing_parts(engine) == []


def test_init_help(cli, fresh_db):
    url, _engine = fresh_db
    result = cli(settings_for(url), "init", "--help")
    assert result.returncode == 0, result.stderr
    assert "--sql" in result.stdout and "usage: ws-celery INI -- init" in result.stdout


def test_the_init_command_is_registered_with_a_one_line_description():
    from websauna_tasks.operator_commands import COMMANDS, init

    assert COMMANDS["init"] is init
    first = init.__doc__.strip().splitlines()[0]
    assert first.endswith(".") and "tables" in first and len(first) < 120


def test_never_with_missing_tables_refuses_to_start_naming_the_command(fresh_db, make_app):
    url, engine = fresh_db
    with pytest.raises(ConfigurationError) as caught:
        make_app(**settings_for(url, **{CREATE_TABLES_KEY: "never"}))
    assert isinstance(caught.value, schema.MissingTables)  # as raised, not wrapped by Pyramid
    message = str(caught.value)
    assert message.startswith("websauna_tasks.create_tables = never, and the database in ")
    assert "ws-celery INI -- init" in message
    assert "table websauna_tasks_iterations" in message and "table websauna_tasks_names" in message
    assert "postgresql+psycopg://root@" in message
    assert tables_of(engine) == set()  # and nothing was created by trying


def test_never_names_a_missing_column(fresh_db, make_app):
    url, engine = fresh_db
    schema.create_missing(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE websauna_tasks_names DROP COLUMN expires_at"))
    with pytest.raises(ConfigurationError, match=r"column websauna_tasks_names\.expires_at.*ws-celery INI -- init"):
        make_app(**settings_for(url, **{CREATE_TABLES_KEY: "never"}))


def test_never_through_ws_celery_is_one_line_and_init_still_runs(fresh_db, cli):
    url, engine = fresh_db
    settings = settings_for(url, **{CREATE_TABLES_KEY: "never"})
    refused = cli(settings, "outbox-status")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "ws-celery INI -- init" in refused.stderr, refused.stderr
    # init loads the same application, without the check it is there to satisfy.
    made = cli(settings, "init")
    assert made.returncode == 0, made.stderr
    assert tables_of(engine) == LIBRARY_TABLES


def test_never_with_the_tables_present_starts(fresh_db, make_app):
    url, engine = fresh_db
    schema.create_missing(engine)
    make_app(**settings_for(url, **{CREATE_TABLES_KEY: "never"}))


def test_never_requires_only_the_tables_of_features_in_use(fresh_db):
    url, engine = fresh_db
    never = {CREATE_TABLES_KEY: "never"}
    # Redis claims names: no names table; no outbox; no idempotent task: no done-table.
    redis_broker = {"websauna.celery_config": '{"broker_url": "redis://127.0.0.1:6379/15"}'}
    schema.create_missing(engine, [schema.iterations_table, schema.shards_table])
    main({}, **settings_for(url, **never, **redis_broker))

    with pytest.raises(ConfigurationError, match="lacks table websauna_tasks_outbox:"):
        main({}, **settings_for(url, **never, **redis_broker, **{"websauna_tasks.outbox": "true"}))
    with pytest.raises(ConfigurationError, match="lacks table websauna_tasks_done:"):
        main({}, **settings_for(url, **never, **redis_broker, **{"test.idempotent": "true"}))
    # memory:// broker + a database: claims live in SQL, and so do dead letters.
    with pytest.raises(ConfigurationError,
                       match="lacks table websauna_tasks_dead_letters, table websauna_tasks_names:"):
        main({}, **settings_for(url, **never))
    schema.create_missing(engine)
    main({}, **settings_for(url, **never, **{"websauna_tasks.outbox": "true", "test.idempotent": "true"}))


def test_never_creates_nothing_on_use_and_says_what_to_run(fresh_db, make_app):
    from websauna_tasks import get_celery
    from websauna_tasks.names import claim_name

    url, engine = fresh_db
    schema.create_missing(engine)
    app = get_celery(make_app(**settings_for(url, **{CREATE_TABLES_KEY: "never"})).registry)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE websauna_tasks_names"))
    with pytest.raises(schema.MissingTables, match=r"table websauna_tasks_names.*ws-celery INI -- init"):
        claim_name(app, "nightly", "task-1")
    assert "websauna_tasks_names" not in tables_of(engine)


def test_auto_creates_on_first_use(fresh_db, make_app):
    from websauna_tasks import get_celery
    from websauna_tasks.names import claim_name

    url, engine = fresh_db
    app = get_celery(make_app(**settings_for(url)).registry)
    assert tables_of(engine) == set()  # nothing at startup
    assert claim_name(app, "nightly", "task-1") is None
    assert tables_of(engine) == {"websauna_tasks_names"}


# -- the Alembic recipe of docs/schema.md --------------------------------------------------------------------

MODELS = '''
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(200))
'''


def recipe_env_block() -> str:
    """The env.py lines docs/schema.md tells the reader to put in place of ``target_metadata = None``."""
    text = (ROOT / "docs" / "schema.md").read_text()
    section = text.split("\n## Alembic\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    block = next(block for block in blocks if "target_metadata" in block)
    assert "websauna_tasks.schema.metadata" in block
    return block


def test_the_alembic_recipe_of_the_docs(fresh_db, tmp_path):
    url, engine = fresh_db
    project = tmp_path / "project"
    (project / "myapp").mkdir(parents=True)
    (project / "myapp" / "__init__.py").write_text("")
    (project / "myapp" / "models.py").write_text(MODELS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(ROOT)])}

    def alembic(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=project, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"alembic {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    alembic("init", "migrations")
    env_py = project / "migrations" / "env.py"
    assert "target_metadata = None" in env_py.read_text()
    env_py.write_text(env_py.read_text().replace("target_metadata = None", recipe_env_block()))
    ini = project / "alembic.ini"
    ini.write_text(re.sub(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", ini.read_text()))

    alembic("revision", "--autogenerate", "-m", "first")
    alembic("upgrade", "head")
    assert tables_of(engine) == LIBRARY_TABLES | {"orders", "alembic_version"}
    assert schema.missing_parts(engine) == []
    outbox_indexes = {index["name"]: index for index in sa.inspect(engine).get_indexes("websauna_tasks_outbox")}
    assert set(outbox_indexes) == {"ix_websauna_tasks_outbox_pending", "ix_websauna_tasks_outbox_sent"}
    with engine.connect() as conn:
        definition = conn.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = "
                                          "'ix_websauna_tasks_outbox_pending'")).scalar_one()
    assert definition.endswith("WHERE (sent_at IS NULL)")

    # A second autogenerate has nothing to do.
    checked = alembic("check")
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr
    second = alembic("revision", "--autogenerate", "-m", "second")
    revision = next(pathlib.Path(path) for path in re.findall(r"Generating (\S+\.py)", second.stdout + second.stderr))
    body = revision.read_text()
    upgrade = body.split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]
    assert "op." not in upgrade, upgrade


def test_tables_made_by_init_are_the_ones_alembic_expects(fresh_db):
    # init (or auto) first, Alembic adopted later: autogenerate must find nothing of ours to change.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    _url, engine = fresh_db
    schema.create_missing(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert differences == []
