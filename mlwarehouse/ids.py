"""Client-generated ids and time stamps, the same on every backend.

Ids are 26-character ULIDs (Crockford base32: 48-bit millisecond time + 80 bits of randomness), so they sort
by creation time as plain strings; within one process they are strictly increasing even inside one millisecond.
Time stamps are ISO 8601 UTC strings with microseconds (``2026-11-23T09:20:38.123456Z``), which also sort as
strings and need no datetime type in the index.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import datetime, timezone

__all__ = ["new_id", "utc_now", "parse_time", "ALPHABET", "encode32", "ID_LENGTH", "MIN_PREFIX", "prefix_filter",
           "id_millis", "ids_after", "id_fraction"]

#: Crockford base32, the digits of every id
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DIGITS = frozenset(ALPHABET)
#: ids are 26 digits; a shorter run of their first digits (at least MIN_PREFIX, as git takes hashes) is a prefix
ID_LENGTH = 26
MIN_PREFIX = 4
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def encode32(value: int, length: int) -> str:
    """The low ``5 * length`` bits of ``value`` as ``length`` base32 digits, most significant first."""
    out = []
    for _ in range(length):
        out.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id() -> str:
    """A new sortable id (monotonic within this process)."""
    global _last_ms, _last_rand
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _last_rand += 1
            if _last_rand >= 1 << 80:  # 2**80 ids in one millisecond: borrow the next one
                ms += 1
                _last_rand = int.from_bytes(os.urandom(10), "big") >> 1
        else:
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        _last_ms = ms
        return encode32(ms, 10) + encode32(_last_rand, 16)


def utc_now() -> str:
    """The current UTC time as a sortable ISO 8601 string."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(stamp: str) -> datetime:
    """Parse a time stamp written by :func:`utc_now` back to an aware datetime."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def prefix_filter(prefix: str) -> dict | None:
    """The ``_id`` range filter of the ids that start with ``prefix`` (any case), or None when ``prefix`` cannot
    start an id (too short, too long, or not base32). A range, not a regex, so every backend uses its key index."""
    key = prefix.upper()
    if not MIN_PREFIX <= len(key) <= ID_LENGTH or not set(key) <= _DIGITS:
        return None
    return {"_id": {"$gte": key, "$lt": key + "~"}}  # "~" sorts after every base32 digit


def id_millis(value: str) -> int | None:
    """The creation time (ms since the epoch) of an id made by :func:`new_id`, or None for any other string."""
    head = value[:10].upper() if isinstance(value, str) and len(value) == ID_LENGTH else ""
    if len(head) != 10 or not set(head) <= _DIGITS:
        return None
    ms = 0
    for ch in head:
        ms = ms * 32 + ALPHABET.index(ch)
    return ms


def ids_after(ms: int) -> str:
    """The smallest id made at or after ``ms``: ``{"$gte": ids_after(ms)}`` selects the ids made since then."""
    return encode32(max(0, ms), 10) + "0" * 16


def id_fraction(value: str, seed: int = 0) -> float:
    """A number in [0, 1) drawn from an id and a seed: the same in every process and on every backend, so a fold
    derived from it (``fraction < valid``) never moves when other documents arrive or go."""
    digest = hashlib.sha256(f"{seed}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64
