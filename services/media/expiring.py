"""A set whose members expire: what a node remembers about calls, for a bounded time."""

from __future__ import annotations

from collections import OrderedDict


class ExpiringSet:
    """Keys kept ``window_s`` after they were last put, oldest first.

    Every deadline is ``now + window_s`` with a monotonic ``now``, so insertion order (a
    key put again moves to the end) is deadline order: :meth:`sweep` pops expired keys
    from the front and stops at the first live one, so each key costs O(1) to forget.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._deadlines: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._deadlines)

    def put(self, key: str, now: float) -> None:
        self.sweep(now)
        self._deadlines[key] = now + self.window_s
        self._deadlines.move_to_end(key)

    def contains(self, key: str, now: float) -> bool:
        self.sweep(now)
        return key in self._deadlines

    def discard(self, key: str) -> None:
        self._deadlines.pop(key, None)

    def sweep(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines:
            key, deadline = next(iter(deadlines.items()))
            if deadline > now:
                return
            del deadlines[key]


class ExpiringMap:
    """Like :class:`ExpiringSet`, with a value per key (the latest put wins)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, value: float, now: float) -> None:
        self.sweep(now)
        self._entries[key] = (now + self.window_s, value)
        self._entries.move_to_end(key)

    def get(self, key: str, now: float) -> float | None:
        self.sweep(now)
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def sweep(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (deadline, _) = next(iter(entries.items()))
            if deadline > now:
                return
            del entries[key]
