"""A process's copy of the library's latest versions, kept current from the registry's change log.

Reading the whole library costs time in its size (about 70 µs a skill: 0.7 s at 10,000 skills), and a
server that re-read it after every upload would make the next ``auto`` request wait that long. The view
reads it once, then after each change reads only the skills the change log names (two round trips), and
reads everything again only when the log no longer reaches back to the copy's generation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from adapter_store.registry import Registry
from adapter_store.skill_info import SkillInfo, parse_ref

SKILL_EVENTS = {"add", "delete", "recode"}  # the changes that name a skill (``pools`` names a pool version)


class LibraryView:
    """The latest version of every skill ``keep`` accepts, by name, as of a generation of the registry.

    :meth:`current` gives a new list object whenever the library changed and the same one while it did not
    (a router may key its caches by the list's identity)."""

    def __init__(self, registry: Registry, keep: Callable[[SkillInfo], bool] = lambda s: True) -> None:
        self.registry = registry
        self.keep = keep
        self.full_reads = 0  # how many times the whole library was read (once, unless the log fell behind)
        self._lock = threading.Lock()
        self._generation = -1
        self._kept: dict[str, SkillInfo] = {}
        self._list: list[SkillInfo] = []

    @property
    def generation(self) -> int:
        """The registry's generation the last list was read at (-1 before the first read)."""
        return self._generation

    def current(self) -> list[SkillInfo]:
        """The library now (raises the registry's UnavailableError when Redis is lost)."""
        with self._lock:
            if self._generation < 0:
                self._read_all()
                return self._list
            now, changes = self.registry.changes_since(self._generation)
            if changes is None:
                self._read_all()
            elif changes:
                if names := {parse_ref(ref)[0] for event, ref in changes if event in SKILL_EVENTS}:
                    for name, info in self.registry.latest(sorted(names)).items():
                        if info is not None and self.keep(info):
                            self._kept[name] = info
                        else:
                            self._kept.pop(name, None)
                    self._list = [self._kept[n] for n in sorted(self._kept)]
            self._generation = now
            return self._list

    @property
    def last(self) -> list[SkillInfo]:
        """The last list read, without asking Redis (empty before the first read)."""
        return self._list

    def _read_all(self) -> None:
        now = self.registry.generation()  # before the read: a change during it is read again next time
        self._kept = {s.name: s for s in self.registry.list() if self.keep(s)}
        self._list = [self._kept[n] for n in sorted(self._kept)]
        self._generation = now
        self.full_reads += 1
