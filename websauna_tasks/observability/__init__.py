"""Metrics and tracing: what the library does, seen from outside (docs/observability.md).

Its modules: ``hooks`` the one way the library reports what happens (an
app's observer, None when nobody watches); ``metrics`` the Prometheus
counters, the web route and the worker's endpoint (imports prometheus_client);
``tracing`` the OpenTelemetry context through dispatch, the outbox and the
run (imports opentelemetry); ``configure`` which of them the settings turn on.

This face imports nothing: the hot paths import ``hooks`` alone, and
neither prometheus_client nor opentelemetry is imported unless the settings
ask for it.
"""
