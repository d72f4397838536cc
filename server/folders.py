"""The engine's adapter folders on local disk, within a byte budget.

Every skill content and every composition the server has served has a folder the engine loads from
(``DATA/adapters/CONTENT``, ``DATA/compositions/KEY``). Any inference client can ask for a new
composition, so the folders are kept within ``MOSAIC_ADAPTER_DISK_MB``: when a new one would pass it,
the least recently used go first. A folder used in the last ``grace`` seconds is never removed (a
request that named it may still be waiting for the engine to load it), so the total can pass the
budget for that long. Removing a folder loses nothing: it is written again from the registry the next
time it is asked for. With no budget (``None``) nothing is ever removed: a plain ``vllm serve`` that
resolves skills through Mosaic's plugin remembers each folder's path and never asks again.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("adapters", "compositions")
STALE = 3600.0  # seconds after which a half-written folder is taken for a crashed write


@dataclass
class _Entry:
    size: int
    used: float
    inputs: frozenset[str] = field(default_factory=frozenset)  # the skill contents it was made from


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


class Folders:
    def __init__(self, root: Path, budget_bytes: int | None, grace: float = 600.0) -> None:
        self.root = root
        self.budget = budget_bytes
        self.grace = grace
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()  # least recently used first
        self._scan()

    def _scan(self) -> None:
        """Count the folders left by an earlier run, oldest first (by modification time)."""
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

    def claim(self, folder: Path) -> bool:
        """Mark ``folder`` as in use now; False when it is not on disk (write it, then call ``added``)."""
        with self._lock:
            if not (folder / "adapter_config.json").exists():
                self._entries.pop(folder, None)
                return False
            entry = self._entries.get(folder)
            if entry is None:
                self._entries[folder] = _Entry(_size(folder), time.time(), _inputs(folder))
            else:
                entry.used = time.time()
                self._entries.move_to_end(folder)
            return True

    def added(self, folder: Path, inputs: Iterable[str]) -> list[Path]:
        """Count a folder just written, made from the skill contents ``inputs``; returns the folders
        removed to stay within the budget."""
        with self._lock:
            self._entries[folder] = _Entry(_size(folder), time.time(), frozenset(inputs))
            self._entries.move_to_end(folder)
            return self._evict()

    def forget(self, contents: Iterable[str]) -> list[Path]:
        """Remove every folder made from any of ``contents`` (skill contents no longer in the library)."""
        contents = set(contents)
        with self._lock:
            doomed = [f for f, e in self._entries.items() if e.inputs & contents]
            for folder in doomed:
                self._remove(folder)
            return doomed

    def total(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def _evict(self) -> list[Path]:
        if self.budget is None:
            return []
        total, cutoff, gone = sum(e.size for e in self._entries.values()), time.time() - self.grace, []
        for folder, entry in list(self._entries.items()):
            if total <= self.budget or entry.used > cutoff:
                break  # in order of use: everything after it was used more recently
            total -= entry.size
            self._remove(folder)
            gone.append(folder)
        return gone

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
