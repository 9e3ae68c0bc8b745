"""The worker main process's CPU per message before a task's run: Redis delivery, then the intake's gate.

At ``worker_prefetch_multiplier = 1`` (docs/RELIABILITY.md) a prefork child
waits while the main process takes the next message: the transport's
``BRPOP`` read and the kombu message, then the intake (intake.py: the
checks, the cancel mark, the unknown-task grace). This counts that path's
instructions with ``valgrind --tool=callgrind``, which the machine's load
does not change: a queue is filled with N real ``bench.ws.touch`` messages
(the (c) task of bench/run.py, sent through ``apply_async`` as the benchmark
sends them), and a process consumes exactly N of them under callgrind, its
instrumentation switched on once the consumer is ready. Two N give the cost
per message, ``(I(N2) - I(N1)) / (N2 - N1)``, with what is left of the
start-up cancelled out.

Two sides: ``ws``, our transport and the gate in front of a handler that
only acknowledges; ``raw``, kombu's Redis transport and the same handler
without the gate. Their difference is what ours adds before Celery's
strategy builds the request.

    .venv/bin/python -m bench.intake_cost [--n1 200] [--n2 1200]

Needs valgrind, the local Redis (BENCH_REDIS_URL, default db 15; a private
queue name, deleted afterwards) and PostgreSQL (BENCH_DATABASE_URL) as the
(c) worker's app has a database.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types
import typing as t
import uuid

from bench import settings

CONSUME_ARG = "--consume"
REPLAY_ARG = "--replay"


def make_app(queue: str) -> t.Any:
    from bench import ws_app
    return ws_app.main({}, **{"websauna.celery_config": repr(settings.celery_config(queue)),
                              "sqlalchemy.url": settings.DATABASE_URL})


def fill(queue: str, count: int) -> None:
    import transaction

    from bench import ws_tasks
    make_app(queue)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        for index in range(count):
            ws_tasks.touch.apply_async((index,), tm=tm)


def instrument() -> None:
    """Callgrind counts from here on: the worker's start-up (imports, the app) runs uninstrumented, and faster."""
    subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True, stdout=subprocess.DEVNULL)


def consume(side: str, queue: str, count: int) -> None:
    """Take ``count`` messages off ``queue`` as a worker's main process does, and acknowledge each."""
    import kombu
    from kombu.transport import redis as kombu_redis

    from websauna_tasks.intake import _gated
    from websauna_tasks.registry import get_celery
    from websauna_tasks.state import find_state

    router = make_app(queue)
    app = get_celery(router.registry)
    taken = [0]

    def handler(message: t.Any) -> None:
        taken[0] += 1
        message.payload  # noqa: B018 - Celery's Request decodes the body (once: kombu caches it)
        message.ack()

    if side == "ws":
        intake = find_state(app).intake
        # What the gate reads of Celery's consumer: the tasks it has strategies for.
        consumer = types.SimpleNamespace(strategies=dict.fromkeys(app.tasks))
        on_message = _gated(intake, lambda: handler, consumer)()
        connection = app.connection_for_read()
    else:
        on_message = handler
        connection = kombu.Connection(settings.broker_url(), transport=kombu_redis.Transport)
    with connection:
        channel = connection.default_channel
        channel.basic_qos(0, 1, False)
        with kombu.Consumer(channel, queues=[app.amqp.queues[queue]], on_message=on_message, accept=["json"]):
            instrument()
            for _ in range(count * 2 + 10):
                if taken[0] >= count:
                    break
                connection.drain_events(timeout=10)
    if taken[0] != count:
        raise SystemExit(f"took {taken[0]} of {count} messages")


def replay(side: str, queue: str, count: int) -> None:
    """``--offline``: the path without the sockets: ``count`` entries read once, then parsed and gated as delivered.

    What ``_brpop_read`` does after ``BRPOP`` answers (the envelope's JSON,
    the transport's Message) and the gate, on the queue's first entry again
    and again: only the cancel watch's poll touches a socket.
    """
    import kombu
    import redis
    from kombu.transport import redis as kombu_redis
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    from websauna_tasks.intake import _gated
    from websauna_tasks.registry import get_celery
    from websauna_tasks.state import find_state

    router = make_app(queue)
    app = get_celery(router.registry)
    item = redis.Redis.from_url(settings.broker_url()).lindex(queue, 0)
    taken = [0]

    def handler(message: t.Any) -> None:
        taken[0] += 1
        message.payload  # noqa: B018 - as in consume()

    if side == "ws":
        intake = find_state(app).intake
        consumer = types.SimpleNamespace(strategies=dict.fromkeys(app.tasks))
        on_message = _gated(intake, lambda: handler, consumer)()
        connection = app.connection_for_read()
        message_class = connection.default_channel.Message
    else:
        on_message = handler
        connection = kombu.Connection(settings.broker_url(), transport=kombu_redis.Transport)
        message_class = kombu_redis.Channel.Message
    with connection:
        channel = connection.default_channel
        on_message(message_class(loads(bytes_to_str(item)), channel=channel))  # the watch subscribes
        taken[0] = 0
        instrument()
        for _ in range(count):
            on_message(message_class(loads(bytes_to_str(item)), channel=channel))
    if taken[0] != count:
        raise SystemExit(f"took {taken[0]} of {count} messages")


def instructions(side: str, queue: str, count: int, offline: bool) -> int:
    fill(queue, 1 if offline else count)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                        sys.executable, "-m", "bench.intake_cost", REPLAY_ARG if offline else CONSUME_ARG, side, queue,
                        str(count)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            text = f.read()
    return int(re.search(r"^summary: (\d+)", text, re.M).group(1))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] in (CONSUME_ARG, REPLAY_ARG):
        (consume if sys.argv[1] == CONSUME_ARG else replay)(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n1", type=int, default=200)
    parser.add_argument("--n2", type=int, default=1200)
    parser.add_argument("--sides", default="ws,raw")
    parser.add_argument("--offline", action="store_true",
                        help="parse and gate one stored entry N times, no BRPOP and no ack (see replay())")
    options = parser.parse_args()
    queue = f"bench-intake-{uuid.uuid4().hex[:8]}"
    import redis

    from bench import services
    client = redis.Redis.from_url(settings.broker_url())
    per = {}
    try:
        for side in options.sides.split(","):
            low = instructions(side, queue, options.n1, options.offline)
            high = instructions(side, queue, options.n2, options.offline)
            if options.offline:
                client.delete(queue)
            per[side] = (high - low) / (options.n2 - options.n1)
            print(f"{side:4}: {per[side]:12,.0f} instructions per message  (I({options.n1}) = {low:,}, "
                  f"I({options.n2}) = {high:,})", flush=True)
    finally:
        services.delete_queue_keys(client, queue)
    if "ws" in per and "raw" in per:
        print(f"ours adds {per['ws'] - per['raw']:,.0f} instructions per message ({per['ws'] / per['raw']:.2f}x)")


if __name__ == "__main__":
    main()
