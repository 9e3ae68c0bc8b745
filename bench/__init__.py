"""Benchmarks of websauna_tasks against raw Celery (run ``python bench/run.py``)."""
