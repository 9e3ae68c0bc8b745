"""Dead letters as a Redis list: when the broker is Redis, its queues are lists of the envelopes kept here.

Entries are JSON texts appended with RPUSH, oldest first. Every removal is
an LREM of the exact bytes and the list is never rewritten, so entries that
workers append meanwhile are never lost; a requeue moves the envelope to the
queue's list in one server-side step.
"""
from __future__ import annotations

import json
import typing as t
import uuid

from ._entries import UNREADABLE_PREFIX, read_entry, recorded_at, unreadable_id


class RedisStore:
    """One app's dead-letter list on its Redis broker."""

    def __init__(self, url: str, key: str):
        self.url = url
        self.key = key
        self._client: t.Any = None

    @property
    def where(self) -> str:
        """What operators are told the letters are in."""
        return self.key

    @property
    def client(self) -> t.Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url)
        return self._client

    def append(self, text: str, entry: dict[str, t.Any]) -> None:
        self.client.rpush(self.key, text)

    def read(self, start: int, stop: int, kind: str | None) -> list[dict[str, t.Any]]:
        if kind is None:
            return [read_entry(raw) for raw in self.client.lrange(self.key, start, stop)]
        # A list has no index by kind: the whole list is read and filtered.
        matching = [entry for entry in self._all() if entry["kind"] == kind]
        return lrange_slice(matching, start, stop)

    def count(self) -> int:
        return int(self.client.llen(self.key))

    def _all(self) -> list[dict[str, t.Any]]:
        return [read_entry(raw) for raw in self.client.lrange(self.key, 0, -1)]

    def find(self, task_id: str) -> t.Iterator[tuple[bytes, dict[str, t.Any]]]:
        """``(handle, entry)`` of every entry with id ``task_id``, oldest first; the handle is the entry's bytes.

        A list has no index, so every entry is looked at, but only in Redis
        (:data:`_FIND_SCRIPT`, :data:`FIND_CHUNK` entries per call), and
        only the entries whose bytes hold the id as JSON writes it (ASCII
        escaped, as workers write it, or as UTF-8) come back to be parsed.
        The plain way, reading the whole list and parsing each entry, took
        4 to 14 s for one drop at 100,000 entries, most of it moving 128 MB.
        An ``unreadable-...`` id is a hash of the entry's bytes, which only
        the whole list can be checked for. Such ids are rare, so they take
        the plain way.
        """
        if task_id.startswith(UNREADABLE_PREFIX):
            candidates: t.Iterable[bytes] = (raw for raw in self.client.lrange(self.key, 0, -1)
                                             if unreadable_id(raw) == task_id)
        else:
            needles = dict.fromkeys((json.dumps(task_id).encode("ascii"),
                                     json.dumps(task_id, ensure_ascii=False).encode("utf-8", "surrogatepass")))
            candidates = self._holding(list(needles))
        for raw in candidates:
            # Something other than a worker may have written to the list: such an
            # entry comes as its unreadable-entry dict rather than stopping the walk.
            entry = read_entry(raw)
            if entry.get("id") == task_id:
                yield raw, entry

    def _holding(self, needles: list[bytes]) -> t.Iterator[bytes]:
        """The entries whose bytes hold any of ``needles``, oldest first, a chunk at a time.

        An entry removed between two chunks shifts the later ones down by
        one, and one entry can then be passed over. A drop or requeue that
        raced another operator's this way finds nothing, and the page says
        the letter is no longer there. Nothing is removed by mistake: a
        removal is always by the entry's exact bytes.
        """
        start = 0
        while True:
            seen_now, found = self.client.eval(_FIND_SCRIPT, 1, self.key, start, start + FIND_CHUNK - 1, *needles)
            yield from found
            if int(seen_now) < FIND_CHUNK:
                return
            start += FIND_CHUNK

    def remove(self, handle: bytes) -> bool:
        # 0 means another operator removed this one first.
        return bool(self.client.lrem(self.key, 1, handle))

    def requeue(self, app: t.Any, handle: bytes, entry: dict[str, t.Any], target: str) -> bool:
        """Move the entry's envelope to the Redis list of queue ``target`` in one step; False if it was gone."""
        message = entry["message"]
        properties = dict(message.get("properties") or {})
        properties["delivery_tag"] = str(uuid.uuid4())
        properties["delivery_info"] = dict(properties.get("delivery_info") or {}, routing_key=target)
        message = dict(message, properties=properties)
        # One atomic step: of two operators requeueing the same letter at
        # once, only the one whose removal succeeds pushes the message.
        return bool(self.client.eval(_MOVE_SCRIPT, 2, self.key, target, handle, json.dumps(message)))

    def older_than(self, cutoff: float) -> list[bytes]:
        """Handles of the entries recorded before ``cutoff``; unreadable ones have no time and are never among them."""
        return [raw for raw in self.client.lrange(self.key, 0, -1)
                if (when := recorded_at(read_entry(raw))) is not None and when < cutoff]

    def remove_all(self, handles: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for raw in handles:
            pipe.lrem(self.key, 1, raw)
        return sum(pipe.execute())


#: Entries one call of :data:`_FIND_SCRIPT` looks at: a few milliseconds of Redis's time, so that a search of a
#: long list never holds up the queues on the same server for longer.
FIND_CHUNK = 2000

# KEYS[1] the list; ARGV[1], ARGV[2] the range; the rest, byte strings an entry must hold one of (a plain find).
_FIND_SCRIPT = """
local items = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
local found = {}
for _, item in ipairs(items) do
    for i = 3, #ARGV do
        if string.find(item, ARGV[i], 1, true) then
            found[#found + 1] = item
            break
        end
    end
end
return {#items, found}
"""

_MOVE_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[2])
    return 1
end
return 0
"""


def lrange_slice(items: list[t.Any], start: int, stop: int) -> list[t.Any]:
    """``items[start..stop]`` with Redis LRANGE's meaning: both ends included, negative from the end."""
    size = len(items)
    start = max(size + start, 0) if start < 0 else start
    stop = size + stop if stop < 0 else min(stop, size - 1)
    return items[start:stop + 1] if start <= stop else []
