"""The transactional outbox: a task message is a row written with the request's own writes (docs/outbox.md).

Its modules: ``_table`` the table and a message's row; ``_outbox`` an app's :class:`Outbox`, which
writes rows and publishes them; ``_fast_path`` the thread publishing each commit's rows at once;
``_relay`` the loop publishing whatever is left (and the worker's step, and ``outbox-relay``);
``_redelivery`` rows of idempotent tasks sent again when they never finished.
"""
from ..settings import DEFAULT_OUTBOX_BATCH_SIZE as DEFAULT_BATCH_SIZE
from ..settings import DEFAULT_OUTBOX_POLL_SECONDS as DEFAULT_POLL_SECONDS
from ..settings import DEFAULT_OUTBOX_RETENTION_SECONDS as DEFAULT_RETENTION_SECONDS
from ..settings import OUTBOX_BATCH_KEY as BATCH_KEY
from ..settings import OUTBOX_IN_WORKER_KEY as IN_WORKER_KEY
from ..settings import OUTBOX_KEY as OUTBOX_KEY
from ..settings import OUTBOX_ON_COMMIT_KEY as ON_COMMIT_KEY
from ..settings import OUTBOX_POLL_KEY as POLL_KEY
from ..settings import OUTBOX_RETENTION_KEY as RETENTION_KEY
from ._fast_path import FastPath
from ._outbox import Outbox, OutboxStatus, find_outbox, get_outbox, note_failed_run, outbox_enabled
from ._redelivery import Redeliverer
from ._relay import BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS, OutboxRelay, OutboxRelayStep, configure_outbox, run_relay
from ._table import CHANNEL, OutboxError, ensure_table, message_row, outbox_table

__all__ = [
    "Outbox", "OutboxError", "OutboxRelay", "OutboxRelayStep", "OutboxStatus", "FastPath", "Redeliverer",
    "configure_outbox", "find_outbox", "get_outbox", "note_failed_run", "outbox_enabled", "run_relay",
    "ensure_table", "message_row", "outbox_table", "CHANNEL", "BACKOFF_BASE_SECONDS", "BACKOFF_MAX_SECONDS",
    # Setting names under the names this module had before settings.py declared them all.
    "OUTBOX_KEY", "RETENTION_KEY", "POLL_KEY", "BATCH_KEY", "IN_WORKER_KEY", "ON_COMMIT_KEY",
    "DEFAULT_BATCH_SIZE", "DEFAULT_POLL_SECONDS", "DEFAULT_RETENTION_SECONDS",
]
