"""Per-session KV caches with prefix reuse, an LRU bound on cached tokens and an idle timeout.

A session's cache holds the KV of exactly the tokens listed in its entry. A request's token
ids are matched against it: the common prefix is kept, the rest (a rejected draft, an
edited turn) is cropped. A new session starts from the longest common prefix of any live
session (a shared system prompt is computed once), copied so sessions never alias.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from transformers import DynamicCache


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class CacheEntry:
    tokens: list[int] = field(default_factory=list)
    kv: DynamicCache = field(default_factory=DynamicCache)
    last_used: float = 0.0

    def crop(self, length: int) -> None:
        """Keep the KV of the first ``length`` tokens only."""
        drop = len(self.tokens) - length
        if drop > 0:
            if length == 0:
                self.kv = DynamicCache()
            else:
                self.kv.crop(-drop)
            del self.tokens[length:]


class SessionCaches:
    """LRU map session id -> :class:`CacheEntry`, bounded by the total of cached tokens.

    ``idle_s`` frees sessions unused for that many seconds (checked whenever the caches are
    touched), so a client that vanishes without a release does not hold memory until the
    token bound happens to push it out.
    """

    def __init__(self, max_tokens: int, idle_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_cached_tokens must be >= 1, got {max_tokens}")
        if idle_s is not None and not idle_s > 0:
            raise ValueError(f"session_idle_s must be > 0 or None, got {idle_s}")
        self.max_tokens = max_tokens
        self.idle_s = idle_s
        self.clock = clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def expire(self) -> None:
        """Drop sessions idle for longer than ``idle_s`` (least recent ones come first)."""
        if self.idle_s is None:
            return
        deadline = self.clock() - self.idle_s
        while self._entries:
            session_id, entry = next(iter(self._entries.items()))
            if entry.last_used >= deadline:
                break
            del self._entries[session_id]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def ids(self) -> list[str]:
        """Cached session ids, least recently used first."""
        return list(self._entries)

    def tokens_of(self, session_id: str) -> list[int]:
        """The token ids whose KV the session's cache holds."""
        return list(self._entries[session_id].tokens)

    @property
    def cached_tokens(self) -> int:
        return sum(len(entry.tokens) for entry in self._entries.values())

    def acquire(self, session_id: str, token_ids: Sequence[int]) -> CacheEntry:
        """The session's entry cropped to its common prefix with ``token_ids`` (or a copy of
        the best-matching live session's prefix, or an empty entry)."""
        self.expire()
        entry = self._entries.get(session_id)
        if entry is None:
            best, best_len = None, 0
            for other in self._entries.values():
                n = common_prefix_len(other.tokens, token_ids)
                if n > best_len:
                    best, best_len = other, n
            entry = CacheEntry()
            if best is not None:
                entry = CacheEntry(list(best.tokens), copy.deepcopy(best.kv))
        entry.crop(common_prefix_len(entry.tokens, token_ids))
        return entry

    def store(self, session_id: str, entry: CacheEntry) -> None:
        """Make ``entry`` the session's most recent cache, evicting least-recent sessions
        (never this one) while the token budget is exceeded."""
        entry.last_used = self.clock()
        self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        total = self.cached_tokens
        while total > self.max_tokens and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            total -= len(evicted.tokens)

    def release(self, session_id: str) -> None:
        self._entries.pop(session_id, None)
