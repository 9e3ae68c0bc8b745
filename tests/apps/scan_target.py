"""A module scanned with a plain config.scan() in tests/test_tasks.py."""
from datetime import timedelta

from websauna_tasks import RetryableTransactionTask, task


@task
def bare(x):
    return x * 2


@task(name="scan_target.options", base=RetryableTransactionTask, bind=True, queue="special", time_limit=30,
      soft_time_limit=20, max_retries=7, rate_limit="10/s", retry_attempts=9, autoretry_for=(KeyError,),
      acks_late=True)
def with_options(self):
    return self.name


EXPIRES = timedelta(minutes=5)
