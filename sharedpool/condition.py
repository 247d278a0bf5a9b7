"""A :class:`threading.Condition` whose ``with`` cannot be cut short holding its lock.

``threading.Condition``'s ``__enter__`` and ``__exit__`` are Python functions:
a signal handler's exception (KeyboardInterrupt, celery's soft time limit, a
SIGTERM handler's SystemExit) can land just after ``__enter__`` took the lock,
before the ``with`` block (whose ``__exit__`` then never runs), or at
``__exit__``'s first instruction, before it lets go. Either way the lock stays
held for good, and every later user of the condition (a client's every lease
call, a pool's every checkout) blocks for ever. Here the ``with`` statement
gets the lock's own C-level methods: nothing runs between the acquire and the
block, nor between the block and the release.

Its lock is an ``RLock``, never a ``Lock``: ``wait()`` lets go of the lock and
takes it back, and over a ``Lock`` (Python ``_release_save`` and
``_acquire_restore``) a handler's exception while it took it back (a blocking
acquire, interrupted) left it unheld, and the ``with`` then released another
thread's hold on it: that thread ran on unguarded, and raised "release unlocked
lock" at its own exit. An ``RLock``'s own are C, owner-checked, and take it
back uninterrupted. And ``wait()`` takes it back even when the exception lands
just after it let go, before its ``try`` (threading's left it let go: the
``with`` then raised "cannot release un-acquired lock" in place of the
handler's exception).
"""

from __future__ import annotations

import _thread
import re
import threading
from typing import Any


def _enter(cond: Any) -> Any:
    return cond._lock.__enter__  # looked up before the acquire: cut short here, nothing is held


def _exit(cond: Any) -> Any:
    return cond._lock.__exit__


def _held(lock: Any) -> int:
    """How many times this thread holds ``lock`` (an RLock it owns). The C
    RLock's ``_recursion_count()`` is missing from early 3.11 releases
    (Debian's 3.11.2: every wait raised AttributeError); its repr says it."""
    count = getattr(lock, "_recursion_count", None)
    if count is not None:
        return int(count())
    found = re.search(r" count=(\d+)", repr(lock))
    return int(found.group(1)) if found else 1


class Condition(threading.Condition):
    """:class:`threading.Condition`, safe to use in ``with`` (and ``wait()``) under
    signal handlers that raise. Over an ``RLock`` only (the default)."""

    def __init__(self, lock: Any = None) -> None:
        if lock is not None and not hasattr(lock, "_acquire_restore"):
            raise TypeError("sharedpool.condition.Condition needs an RLock (see the module's docstring)")
        super().__init__(lock)

    def wait(self, timeout: float | None = None) -> bool:
        """:meth:`threading.Condition.wait`, the lock let go inside its ``try``."""
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot wait on un-acquired lock")
        held = _held(self._lock)  # type: ignore[attr-defined]
        waiter = _thread.allocate_lock()
        waiter.acquire()
        saved: Any = None
        gotit = False
        try:
            self._waiters.append(waiter)  # type: ignore[attr-defined]
            saved = self._release_save()  # type: ignore[attr-defined]
            if timeout is None:
                gotit = waiter.acquire()
            elif timeout > 0:
                gotit = waiter.acquire(True, timeout)
            else:
                gotit = waiter.acquire(False)
            return gotit
        finally:
            if saved is None and not self._is_owned():  # type: ignore[attr-defined]
                saved = (held, threading.get_ident())  # let go, and cut short before it said how
            if saved is not None:
                self._acquire_restore(saved)  # type: ignore[attr-defined]  # C: uninterrupted
            if not gotit:
                try:  # noqa: SIM105 - not suppress(): its Python frames are more places a handler runs
                    self._waiters.remove(waiter)  # type: ignore[attr-defined]
                except ValueError:
                    pass

    # Properties: the with statement looks both up on the type, then calls the
    # bound C methods with no Python frame between them and the block.
    __enter__ = property(_enter)  # type: ignore[assignment]
    __exit__ = property(_exit)  # type: ignore[assignment]


class Event(threading.Event):
    """:class:`threading.Event` whose lock a signal handler's exception in
    :meth:`wait` cannot leave held: a later :meth:`set` (a pool hands a
    connection over under its own lock) would block for ever, and with it
    every thread that takes that lock."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = Condition()  # threading.Event's own, made safe
