"""An ``async def`` body that defers with ``defer_async`` (tests/test_defer_async.py, through ``tests.scan``)."""
import asyncio

from tests.apps import deferred_functions
from websauna_tasks import TransactionalTask, defer_async, get_celery, task


@task(name="tests.async_defer.fan_out", base=TransactionalTask, bind=True)
async def fan_out(self, count: int, fail: bool = False) -> list[str]:
    """Defer ``count`` records and one function, concurrently; they wait for this run's commit."""
    record = get_celery(self.get_request().registry).tasks["tests.record"]
    ids = await asyncio.gather(*(record.defer_async(f"child-{index}") for index in range(count)),
                               defer_async(deferred_functions.record, "child-fn"))
    if fail:
        raise ValueError("asked to fail after deferring")
    return list(ids)
