"""The engine's adapter folders on local disk, within a byte budget.

Every skill content and every composition the server has served has a folder the engine loads from
(``DATA/adapters/CONTENT``, ``DATA/compositions/KEY``). Any inference client can ask for a new
composition, so the folders never pass ``MOSAIC_ADAPTER_DISK_MB`` in all: a folder's bytes are admitted
before it is written, the least recently used folders going first to make room. Two kinds are never
removed: a folder a request holds (a :class:`Hold`, alive as long as the request keeps the adapter: the
engine reads the folder when it schedules the request, for a stream after the handler has returned),
and a folder used in the last ``grace`` seconds (``MOSAIC_ADAPTER_GRACE_SECONDS``: what a caller that
hands the path to an engine without holding it, as the vLLM resolver plugin does, leaves the engine to
load it). When those leave no room the new folder is not written and the request gets a 503, which
OpenAI's clients retry: writing it anyway, for the one request, would let concurrent clients put any
number of folders on disk past the budget. A folder larger than the whole budget is a 400.

Removing a folder loses nothing: it is written again from the registry the next time it is asked for.
With no budget (``None``) nothing is ever removed: a plain ``vllm serve`` that resolves skills through
Mosaic's plugin remembers each folder's path and never asks again.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora.errors import InvalidRequestError, UnavailableError

KINDS = ("adapters", "compositions")
STALE = 3600.0  # seconds after which a half-written folder is taken for a crashed write


@dataclass
class _Entry:
    size: int
    used: float  # last handed out or released
    inputs: frozenset[str] = field(default_factory=frozenset)  # the skill contents it was made from
    holds: int = 0
    doomed: bool = False  # forgotten while held: removed when the last hold goes


class Hold:
    """Keeps one folder on disk while it lives: until :meth:`release`, or until nothing refers to it any more.

    The release is queued and applied by the next call to :class:`Folders` (under its lock): a release from
    the garbage collector may come in any thread, even inside a call that already holds that lock."""

    def __init__(self, folder: Path, released: deque[Path]) -> None:
        self.folder = folder
        self._release = weakref.finalize(self, released.append, folder)

    def release(self) -> None:
        self._release()  # once: later calls do nothing


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _amount(n: float) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{int(n):,} bytes"


class Folders:
    def __init__(self, root: Path, budget_bytes: int | None, grace: float = 60.0) -> None:
        self.root = root
        self.budget = budget_bytes
        self.grace = grace
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()  # least recently used first
        self._released: deque[Path] = deque()  # holds let go of, applied under the lock
        self._scan()

    def _scan(self) -> None:
        """Count the folders left by an earlier run, oldest first (by modification time), and remove the
        oldest while they pass the budget (it may have been lowered since)."""
        found = []
        for kind in KINDS:
            d = self.root / kind
            for folder in d.iterdir() if d.is_dir() else ():
                if folder.name.startswith("."):  # a write that never finished (not one in progress elsewhere)
                    if folder.stat().st_mtime < time.time() - STALE:
                        shutil.rmtree(folder, ignore_errors=True)
                elif (folder / "adapter_config.json").exists():
                    found.append((folder.stat().st_mtime, folder))
        for mtime, folder in sorted(found):
            self._entries[folder] = _Entry(_size(folder), mtime - self.grace, _inputs(folder))
        with self._lock:
            for folder in self._removable(0, time.time() - self.grace) or ():
                self._remove(folder)

    def claim(self, folder: Path) -> Hold | None:
        """Hold ``folder`` (used now) when it is on disk; None when it is not: write it after :meth:`admit`."""
        with self._lock:
            self._apply_releases()
            entry = self._entries.get(folder)
            if not (folder / "adapter_config.json").exists():
                if entry is not None and not entry.holds:
                    del self._entries[folder]
                return None
            if entry is None:
                entry = self._entries[folder] = _Entry(_size(folder), 0.0, _inputs(folder))
            return self._hold(folder, entry)

    def admit(self, folder: Path, size: int, inputs: Iterable[str], param: str | None = None) -> Hold:
        """Room for a folder of ``size`` bytes about to be written at ``folder`` from the skill contents
        ``inputs``, held: the least recently used folders that are neither held nor used in the last
        ``grace`` seconds go to make it. A folder larger than the budget is refused (InvalidRequestError,
        naming ``param``), and so is one the other folders leave no room for (UnavailableError)."""
        with self._lock:
            self._apply_releases()
            if self.budget is not None and size > self.budget:
                raise InvalidRequestError(
                    f"this adapter takes {_amount(size)} on disk, more than the server keeps for all its adapter "
                    f"folders ({_amount(self.budget)}, setting MOSAIC_ADAPTER_DISK_MB)", param=param)
            old = self._entries.pop(folder, None)  # (counted again below, at its new size)
            doomed = self._removable(size, time.time() - self.grace)
            if doomed is None:
                if old is not None:
                    self._entries[folder] = old
                raise UnavailableError(
                    f"the adapter folders are full ({_amount(self._total())} of {_amount(self.budget)}, setting "
                    f"MOSAIC_ADAPTER_DISK_MB) with folders in use or used in the last {self.grace:g} s "
                    "(MOSAIC_ADAPTER_GRACE_SECONDS): try again in a few seconds")
            for f in doomed:
                self._remove(f)
            entry = self._entries[folder] = _Entry(size, 0.0, frozenset(inputs), holds=old.holds if old else 0)
            return self._hold(folder, entry)

    def forget(self, contents: Iterable[str]) -> list[Path]:
        """Remove every folder made from any of ``contents`` (skill contents no longer in the library); one
        a request holds goes when its last hold does. Returns the folders removed now."""
        contents = set(contents)
        with self._lock:
            self._apply_releases()
            gone = []
            for folder, entry in list(self._entries.items()):
                if entry.inputs & contents:
                    if entry.holds:
                        entry.doomed = True
                    else:
                        self._remove(folder)
                        gone.append(folder)
            return gone

    def total(self) -> int:
        """Bytes of every folder counted: on disk, or admitted and being written."""
        with self._lock:
            self._apply_releases()
            return self._total()

    def held(self) -> int:
        """How many folders a request holds now."""
        with self._lock:
            self._apply_releases()
            return sum(1 for e in self._entries.values() if e.holds)

    # ---- under the lock ------------------------------------------------------------
    def _total(self) -> int:
        return sum(e.size for e in self._entries.values())

    def _hold(self, folder: Path, entry: _Entry) -> Hold:
        entry.holds += 1
        entry.doomed = False  # asked for again: in use again
        self._touch(folder, entry)
        return Hold(folder, self._released)

    def _touch(self, folder: Path, entry: _Entry) -> None:
        entry.used = time.time()
        self._entries.move_to_end(folder)

    def _apply_releases(self) -> None:
        while self._released:
            folder = self._released.popleft()
            entry = self._entries.get(folder)
            if entry is None or not entry.holds:
                continue
            entry.holds -= 1
            self._touch(folder, entry)
            if not entry.holds and (entry.doomed or not (folder / "adapter_config.json").exists()):
                self._remove(folder)  # forgotten meanwhile, or its write failed

    def _removable(self, size: int, cutoff: float) -> list[Path] | None:
        """The least recently used folders to remove so that ``size`` more bytes fit the budget (none
        held, none used after ``cutoff``); None when those are not enough."""
        if self.budget is None:
            return []
        total, doomed = self._total(), []
        for folder, entry in self._entries.items():
            if total + size <= self.budget or entry.used > cutoff:
                break  # in order of use: everything after it was used more recently
            if not entry.holds:
                doomed.append(folder)
                total -= entry.size
        return doomed if total + size <= self.budget else None

    def _remove(self, folder: Path) -> None:
        self._entries.pop(folder, None)
        # renamed first, so a reader never sees half a folder, then deleted
        doomed = folder.with_name(f".gone.{folder.name}.{time.monotonic_ns()}")
        try:
            folder.rename(doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)


def _inputs(folder: Path) -> frozenset[str]:
    """The skill contents a folder was made from: its own content id for a skill, the composition's inputs."""
    meta = folder / "mosaic.json"
    if meta.exists():
        try:
            return frozenset(json.loads(meta.read_text()).get("inputs", ()))
        except (OSError, ValueError):
            return frozenset()
    return frozenset({folder.name.split("-r", 1)[0]}) if folder.parent.name == "adapters" else frozenset()
