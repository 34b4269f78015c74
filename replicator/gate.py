"""Client I/O gates: a writer-preferring readers-writer lock, and striped chunk locks.

:class:`Gate` is shared by client requests and closed by commands that need a quiescent point
(split, resync, delete) and by a journal fold.  :class:`ChunkLocks` orders a client write and a
copy of the same chunk strictly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

STRIPES = 1024


class Gate:
    """A writer-preferring readers-writer lock: client I/O shares it, commands close it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ChunkLocks:
    """Striped locks over chunk numbers; a range takes its stripes in ascending order."""

    def __init__(self) -> None:
        self._locks = [threading.Lock() for _ in range(STRIPES)]

    @contextlib.contextmanager
    def hold(self, first: int, last: int) -> Iterator[None]:
        release = self.take(first, last)
        try:
            yield
        finally:
            release()

    def take(self, first: int, last: int) -> Callable[[], None]:
        """Take the locks of chunks ``first..last``; the function returned releases them,
        once, from any thread (a store finished by another thread than the one that
        fetched)."""
        count = last - first + 1
        stripes = (
            range(STRIPES)
            if count >= STRIPES
            else sorted({c % STRIPES for c in range(first, last + 1)})
        )
        taken: list[int] = []
        try:
            for s in stripes:
                self._locks[s].acquire()
                taken.append(s)
        except BaseException:
            for s in reversed(taken):
                self._locks[s].release()
            raise

        def release() -> None:
            for s in reversed(taken):
                self._locks[s].release()
            taken.clear()

        return release
