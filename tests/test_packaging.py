"""The library as PyPI gets it: ``python -m build``, ``twine check``, and what the wheel holds."""
from __future__ import annotations

import email
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import websauna_tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: What a working tree has that a clone has not: never copied into the build.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", "*.egg-info", "build", "dist",
                                     ".pytest_cache", ".hypothesis", "*.sqlite*", "celerybeat-schedule*")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[pathlib.Path, str]:
    """The sdist and wheel built from a copy of the checkout (the build writes egg-info next to its sources)."""
    base = tmp_path_factory.mktemp("packaging")
    source, out = base / "src", base / "dist"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    # --no-isolation: the test extra's setuptools builds it, nothing is downloaded.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    return out, built.stdout + built.stderr


def wheel_of(out: pathlib.Path) -> pathlib.Path:
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_build_has_no_setuptools_warnings_and_twine_check_passes(dist):
    out, log = dist
    assert sorted(path.suffix for path in out.iterdir()) == [".gz", ".whl"]
    # Packaging warnings (SetuptoolsDeprecationWarning, license classifiers, packages
    # discovered by accident) all carry "Warning"; byte-compiling notes are the environment's.
    warnings = [line for line in log.splitlines() if "Warning" in line]
    assert warnings == [], "\n".join(warnings)
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, out.iterdir())],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout


def test_wheel_holds_only_the_library_typed_with_one_version(dist):
    out, _log = dist
    wheel = wheel_of(out)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"websauna_tasks-{websauna_tasks.__version__}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {"websauna_tasks", info}, top_level
    assert "websauna_tasks/py.typed" in names
    assert "websauna_tasks/__init__.py" in names and "websauna_tasks/outbox/__init__.py" in names
    assert not [name for name in names if "example" in name or name.startswith(("tests/", "conf/"))]
    # One version: the metadata's is the package's own.
    assert metadata["Version"] == websauna_tasks.__version__
    assert wheel.name == f"websauna_tasks-{websauna_tasks.__version__}-py3-none-any.whl"
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    # The example's app factory is its own distribution's (conf/pyproject.toml), not the library's.
    assert "paste.app_factory" not in entry_points
    assert "ws-celery = websauna_tasks.cli:main" in entry_points


def test_the_example_is_installed_from_the_checkout_not_from_the_library():
    import importlib.metadata

    import websauna_tasks_example

    assert pathlib.Path(websauna_tasks_example.__file__).resolve().parent == ROOT / "conf" / "websauna_tasks_example"
    assert importlib.metadata.distribution("websauna_tasks_example").entry_points.select(
        group="paste.app_factory", name="main")
    library_files = importlib.metadata.distribution("websauna_tasks").entry_points
    assert not library_files.select(group="paste.app_factory")
    assert importlib.metadata.version("websauna_tasks") == websauna_tasks.__version__
