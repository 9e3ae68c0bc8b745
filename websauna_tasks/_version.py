"""The version, in one place: ``websauna_tasks.__version__`` and the package metadata (pyproject.toml) read it."""

__version__ = "0.1.0"
