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

    :meth:`read` gives a new list object whenever the library changed and the same one while it did not
    (a router may key its caches by the list's identity). One thread catches up at a time; the others take
    the last list meanwhile rather than queue behind its Redis calls."""

    def __init__(self, registry: Registry, keep: Callable[[SkillInfo], bool] = lambda s: True) -> None:
        self.registry = registry
        self.keep = keep
        self.full_reads = 0  # how many times the whole library was read (once, unless the log could not say)
        self._lock = threading.Lock()
        self._mark: str | None = None  # the change log's entry at the generation read
        self._kept: dict[str, SkillInfo] = {}
        self._state: tuple[int, list[SkillInfo]] = (-1, [])  # (generation, list), replaced as one

    @property
    def generation(self) -> int:
        """The registry's generation the last list was read at (-1 before the first read)."""
        return self._state[0]

    @property
    def last(self) -> tuple[int, list[SkillInfo]]:
        """The last list read and its generation, without asking Redis ((-1, []) before the first read)."""
        return self._state

    def current(self) -> list[SkillInfo]:
        """The library now (raises the registry's UnavailableError when Redis is lost)."""
        return self.read()[1]

    def read(self) -> tuple[int, list[SkillInfo]]:
        """The library now and the generation it was read at (raises the registry's UnavailableError when
        Redis is lost; while another thread is catching up: the last list read)."""
        if not self._lock.acquire(blocking=self._state[0] < 0):
            return self._state
        try:
            if self._state[0] < 0:
                self._read_all()
                return self._state
            found = self.registry.changes_since(self._state[0], self._mark)
            if found.changes is None:
                self._read_all()
                return self._state
            listed = self._state[1]
            if names := {parse_ref(ref)[0] for event, ref in found.changes if event in SKILL_EVENTS}:
                for name, info in self.registry.latest(sorted(names)).items():
                    if info is not None and self.keep(info):
                        self._kept[name] = info
                    else:
                        self._kept.pop(name, None)
                listed = [self._kept[n] for n in sorted(self._kept)]
            self._mark = found.mark
            self._state = (found.generation, listed)
            return self._state
        finally:
            self._lock.release()

    def _read_all(self) -> None:
        now, mark = self.registry.mark()  # before the read: a change during it is read again next time
        self._kept = {s.name: s for s in self.registry.list() if self.keep(s)}
        self._mark = mark
        self._state = (now, [self._kept[n] for n in sorted(self._kept)])
        self.full_reads += 1
