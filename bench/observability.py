"""What metrics and tracing cost on the send pipeline and the run path (docs/observability.md).

    .venv/bin/python bench/observability.py            # prints the figures and the ratios to "off"

No service is needed, and no broker: the messages are handed to a sink
that drops them (``dispatch.set_message_sink``, what a test client does)
at the moment they would be published, so the figures are the send
pipeline's and the run path's own work, which a broker round trip would
hide: the ratios are the worst case. Each configuration runs in a process
of its own (twice, alternating, the best kept), so "off" is measured with
nothing watching anywhere in the process, as in production:

- off: ``websauna_tasks.metrics = false``, ``websauna_tasks.tracing = false``;
- metrics: ``websauna_tasks.metrics = true``;
- metrics+tracing: also tracing, with the OpenTelemetry SDK recording every
  span (a tracer provider with a processor that drops them) and a request
  span open around the dispatches, so a traceparent is injected each time.

(a) dispatch: N ``apply_async(tm=...)`` in one transaction, then its
commit; (b) run: N runs of a task called as a worker calls it (its
request, the observer's hook, TaskFinished). Best of several rounds.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "off": {"websauna_tasks.metrics": "false", "websauna_tasks.tracing": "false"},
    "metrics": {"websauna_tasks.metrics": "true", "websauna_tasks.tracing": "false"},
    "metrics+tracing": {"websauna_tasks.metrics": "true", "websauna_tasks.tracing": "true"},
}


def measure(config: str, count: int, rounds: int) -> dict[str, float]:
    """Seconds per dispatch and per run, in this process, for one configuration."""
    import contextlib

    import transaction
    from pyramid.config import Configurator

    from websauna_tasks import WebsaunaTask, get_celery, task
    from websauna_tasks.dispatch import set_message_sink

    class Drop:
        def capture(self, message: object) -> None:
            pass

    set_message_sink(Drop())

    span: contextlib.AbstractContextManager = contextlib.nullcontext()
    if config == "metrics+tracing":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

        provider = TracerProvider()
        provider.add_span_processor(SpanProcessor())  # spans are made and ended, then dropped
        trace.set_tracer_provider(provider)
        span = trace.get_tracer("bench").start_as_current_span("request")
    settings = {"websauna.celery_config": "{'broker_url': 'memory://', 'task_default_queue': 'bench'}",
                **CONFIGS[config]}
    configurator = Configurator(settings=settings)
    configurator.include("pyramid_tm")
    configurator.include("websauna_tasks")
    app = get_celery(configurator.registry)

    @task(name="bench.noop", base=WebsaunaTask, bind=True)
    def noop(self: WebsaunaTask, value: int) -> int:
        return value

    bound = noop.bind_to_app(app)
    dispatch = []
    run = []
    with span:
        for _ in range(rounds):
            started = time.perf_counter()
            with transaction.manager:
                for index in range(count):
                    bound.apply_async((index,), tm=transaction.manager)
            dispatch.append((time.perf_counter() - started) / count)
            started = time.perf_counter()
            for index in range(count):
                bound.apply((index,))
            run.append((time.perf_counter() - started) / count)
    return {"dispatch": min(dispatch), "run": min(run)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.config:
        print(json.dumps(measure(options.config, options.count, options.rounds)))
        return
    figures: dict[str, dict[str, float]] = {}
    for _ in range(2):
        for config in CONFIGS:
            done = subprocess.run([sys.executable, __file__, "--config", config, "--count", str(options.count),
                                   "--rounds", str(options.rounds)], capture_output=True, text=True, check=True)
            figure = json.loads(done.stdout.strip().splitlines()[-1])
            best = figures.setdefault(config, figure)
            figures[config] = {key: min(best[key], figure[key]) for key in figure}
    off = figures["off"]
    print(f"{'configuration':<18}{'dispatch µs':>14}{'ratio':>8}{'run µs':>12}{'ratio':>8}")
    for config, figure in figures.items():
        print(f"{config:<18}{figure['dispatch'] * 1e6:>14.1f}{figure['dispatch'] / off['dispatch']:>8.2f}"
              f"{figure['run'] * 1e6:>12.1f}{figure['run'] / off['run']:>8.2f}")


if __name__ == "__main__":
    main()
