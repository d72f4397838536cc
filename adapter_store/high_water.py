"""What a data dir remembers of a registry outside Redis, so that a Redis that went back is noticed.

A Redis that is flushed, or restored from an older copy, forgets what this file keeps:

- that API keys were created: the server stays locked (adapter_store/keys.py, server/edge/auth.py);
- the registry's generation and its change-log entry as last written from here: a Redis behind them lost
  writes (a deleted skill may be back, a pinned ``name@N`` gone), so the server refuses to start, and
  writes are refused, until a reset is accepted;
- the highest version number handed out: after an accepted reset, new versions are numbered above it,
  so ``name@N`` never names other weights than it did.

One small JSON file per registry (Redis URL and key prefix) under ``DATA_DIR/registry-state/``, replaced
atomically under a file lock (the CLI and the server may share a data dir), written only when a mark
rises. It guards what this data dir saw: servers sharing a Redis but not a data dir each guard their own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel

from adapter_store.layout import KeyLayout
from lora.errors import UnavailableError

log = logging.getLogger("mosaic.registry")

STATE_DIR = "registry-state"

# the generation now, the change log's entry at generation ARGV[1] (false: the log does not reach back to
# it) and its last entry (the generation's own), read together
ENTRY_AT = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
local back = now - tonumber(ARGV[1])
local last = redis.call('LINDEX', KEYS[2], -1)
if back < 0 then return {now, false, last} end
return {now, redis.call('LINDEX', KEYS[2], -(back + 1)), last}
"""


class RegistryBehindError(UnavailableError):
    """Redis holds less than this data dir saw written to it (flushed, or restored from an older copy)."""

    code = "registry_behind"


class Marks(BaseModel):
    registry: str  # the Redis URL (no password) and key prefix, for whoever reads the file
    keys_seen: bool = False
    generation: int = 0  # the registry's generation after the last write seen from here ...
    entry: str | None = None  # ... and the id of its change-log entry
    max_version: int = 0  # the highest version number handed out from here
    version_floor: int = 0  # after an accepted reset: new versions are numbered above this


class HighWater:
    """The marks of one registry, in memory and in their file."""

    def __init__(self, path: Path, label: str, *, accept_reset: bool = False,
                 reset_hint: str = "accept the reset explicitly") -> None:
        self.path = Path(path)
        self.accept_reset = accept_reset
        self.reset_hint = reset_hint  # how an operator accepts a reset (named in the error)
        self._lock = threading.Lock()
        self.marks = self._read() or Marks(registry=label)

    @classmethod
    def for_registry(cls, data_dir: Path, redis_url: str, prefix: str, **kw) -> HighWater:
        """The marks of the registry at ``redis_url`` under ``prefix``, kept in ``data_dir``."""
        digest = hashlib.sha256(f"{redis_url}\0{prefix}".encode()).hexdigest()[:16]
        name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', prefix)[:64]}-{digest}.json"
        return cls(Path(data_dir) / STATE_DIR / name, f"{_without_password(redis_url)} prefix {prefix!r}", **kw)

    # ---- what was seen ----------------------------------------------------------------------------
    @property
    def keys_seen(self) -> bool:
        return self.marks.keys_seen

    def saw_keys(self) -> None:
        if not self.marks.keys_seen:
            self._update(lambda m: _rise(m, keys_seen=True))

    def wrote(self, r: redis.Redis, keys: KeyLayout, version: int = 0) -> None:
        """After a write to the registry: its generation now (and log entry), the version handed out."""
        with r.pipeline(transaction=True) as pipe:
            now, last = pipe.get(keys.gen).lindex(keys.changes, -1).execute()
        try:
            self._reached(int(now or 0), _entry_id(last), version)
        except OSError as exc:  # the write is done: a mark left lower only weakens the guard
            log.error("could not record the registry's marks in %s: %s", self.path, exc)

    def _reached(self, now: int, entry: str | None, version: int = 0) -> None:
        """Raise the marks to generation ``now`` (its log entry ``entry``) and ``version``."""
        def rise(m: Marks) -> bool:
            moved = _rise(m, max_version=version)
            if now > m.generation:
                m.generation, m.entry, moved = now, entry, True
            return moved

        if now > self.marks.generation or version > self.marks.max_version:
            self._update(rise)

    # ---- checks -------------------------------------------------------------------------------------
    def behind(self, r: redis.Redis, keys: KeyLayout) -> tuple[str | None, int, str | None]:
        """Why Redis is behind the marks (None: it is not, as far as its change log tells), and its
        generation and log entry id now."""
        m = self.marks
        now, at_mark, entry = r.register_script(ENTRY_AT)(keys=[keys.gen, keys.changes], args=[m.generation])
        now, at_mark, entry = int(now), _entry_id(at_mark), _entry_id(entry)
        if now < m.generation:
            return f"its generation is {now}, and it was {m.generation} after the last write seen from here", now, entry
        if m.entry is not None and at_mark is not None and at_mark != m.entry:
            return (f"its change log at generation {m.generation} is not the one written from here (it was emptied "
                    "and written again)"), now, entry
        return None, now, entry

    def check_at_start(self, r: redis.Redis, keys: KeyLayout, key_store) -> None:
        """At a server's start: a Redis behind the marks (its generation, its change log, or API keys seen
        here that it has no record of) raises :class:`RegistryBehindError` unless a reset is accepted; else
        where Redis is now is recorded. A lock Redis forgot is set there again (``key_store``: a KeyStore)."""
        why, now, entry = self.behind(r, keys)
        locked = key_store.locked_in_redis()
        if why is None and self.keys_seen and not locked:
            why = "API keys were made for it, and it has no record of any"
        if why is not None:
            self._refuse_or_accept(why, now, entry)
        else:
            self._reached(now, entry)
        if self.keys_seen and not locked:
            key_store.lock()
        elif locked:
            self.saw_keys()

    def floor(self, r: redis.Redis, keys: KeyLayout) -> int:
        """Before a write: the number a new version must exceed besides Redis's own count (0 unless a reset
        was accepted). Raises :class:`RegistryBehindError` when Redis is behind and no reset is accepted."""
        why, now, entry = self.behind(r, keys)
        if why is not None:
            self._refuse_or_accept(why, now, entry)
        return self.marks.version_floor

    def _refuse_or_accept(self, why: str, now: int, entry: str | None) -> None:
        if not self.accept_reset:
            log.error("registry %s is behind %s: %s", self.marks.registry, self.path, why)
            raise RegistryBehindError(
                f"the registry (Redis) is behind what this server's data dir remembers of it ({STATE_DIR}/"
                f"{self.path.name}): {why}. Redis was flushed or restored from an older copy, and writes made since "
                f"are lost; to serve it anyway, {self.reset_hint} (new versions are then numbered above "
                f"{self.marks.max_version}, the highest handed out; API keys stay required if any were made)")
        log.warning("registry %s went back (%s): accepted; new versions are numbered above %d",
                    self.marks.registry, why, self.marks.max_version)

        def accept(m: Marks) -> bool:
            m.version_floor = max(m.version_floor, m.max_version)
            m.generation, m.entry = now, entry
            return True

        self._update(accept)

    # ---- the file -----------------------------------------------------------------------------------
    def _read(self) -> Marks | None:
        try:
            return Marks.model_validate_json(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RegistryBehindError(f"{self.path} (what this data dir remembers of the registry) is unreadable: "
                                      f"{exc}; restore it, or remove it to start the guard afresh") from exc

    def _update(self, change: Callable[[Marks], bool]) -> None:
        """Apply ``change`` to the marks as the file holds them now (another process may have raised them)
        and write the file when it changed something."""
        with self._lock, _locked(self.path):
            marks = self._read() or self.marks
            if change(marks):
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    f.write(marks.model_dump_json(indent=1))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            self.marks = marks


def _entry_id(raw: bytes | None) -> str | None:
    return json.loads(raw).get("id") if raw else None


def _rise(m: Marks, **marks) -> bool:
    """Raise each of ``marks`` on ``m`` (never lower one); whether any rose."""
    moved = False
    for field, value in marks.items():
        if value > getattr(m, field):
            setattr(m, field, value)
            moved = True
    return moved


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


__all__ = ["HighWater", "Marks", "RegistryBehindError"]
