"""Checkouts nobody can check in any more, taken back.

A wrapper from ``acquire()`` that its caller dropped without a checkin:
typically an asyncio task cancelled while a thread checked out for it (``await
asyncio.wait_for(loop.run_in_executor(None, pool.acquire), 1)``): the thread
finishes the checkout, the cancelled future drops its result. (A
``connection()`` context manager dropped unexited is wrapper._Checkout.__del__'s:
closed, whoever still refers to its connection.) Nothing could release it again: it stayed in use, its
lease held, until the process exited, and the cap was that much smaller for
every process (psycopg_pool loses the slot the same way; SQLAlchemy checks a
collected connection back in).

The pool holds every wrapper in ``_all``, so such a drop is never a garbage
collection. It is read from the reference counts instead: a wrapper in use
that only ``_all`` refers to, whose connection only the pool's own records
refer to, is nobody's. :func:`take_back` checks those in as a checkin after an
exception does (rolled back if left in a transaction, closed if mid-query or
broken), from the maintenance round and before close() / drain() wait. Off
the checkout fast path entirely. A count too high (a driver whose connection
refers to itself, such as sqlite3's; a wrapper still in a garbage cycle until
it is collected) only leaves a checkout out as before, never takes one from a
caller that can still reach it.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import ConnectionPool
    from .wrapper import ConnectionWrapper

log = logging.getLogger("sharedpool.pool")


def _refs(obj: object) -> int:
    return sys.getrefcount(obj)


def _calibrate() -> int | None:
    """What :func:`_refs` reads for an object held by one local variable of its
    caller (the shape of every call below); None where counts cannot be read
    that way (no ``sys.getrefcount``, or one more holder is not one more)."""
    try:
        probe = object()
        alone = _refs(probe)
        held = [probe]
        once = _refs(probe)
        held.append(probe)
        twice = _refs(probe)
    except AttributeError:  # not CPython
        return None
    return alone if once == alone + 1 and twice == alone + 2 else None


_ALONE = _calibrate()


def _records(wrapper: ConnectionWrapper[Any], left: dict[str, Any]) -> int:
    """The pool's own references to ``wrapper``'s connection: ``wrapper.conn``,
    the dropped-pool record, psycopg2's bound status getter."""
    conn = wrapper.conn
    entry = left.get(wrapper.id)
    return 1 + (entry is not None and entry.conn is conn) + (getattr(wrapper.txn, "__self__", None) is conn)


def take_back(pool: ConnectionPool[Any]) -> int:
    """Check in ``pool``'s checkouts that nobody refers to any more; how many."""
    if _ALONE is None:
        return 0
    found = []
    with pool._lock:
        left = pool._left.entries
        # Each count read of a local of this frame (the shape _ALONE was read in),
        # under the lock: nothing of the pool's hands a wrapper on meanwhile.
        for wrapper in pool._all.values():
            if not wrapper.in_use or _refs(wrapper) - _ALONE != 1:  # else held beyond _all
                continue
            ours = _records(wrapper, left)
            conn = wrapper.conn
            if _refs(conn) - _ALONE == ours:
                found.append(wrapper)
    for wrapper in found:
        first = not pool._told_dropped
        pool._told_dropped = True
        log.log(logging.WARNING if first else logging.DEBUG,
                "pool %r: connection %s was checked out and dropped without a checkin (a "
                "cancelled run_in_executor(None, pool.acquire)?): checked back in; run the whole "
                "`with pool.connection()` block in the thread instead%s%s", pool.name,
                wrapper.id[:8], "" if wrapper.site is None else f"; acquired at:\n{wrapper.site}",
                " (later ones are logged at debug level)" if first else "")
        try:
            pool.release_after_error(wrapper)  # its state unknown: rolled back or closed if need be
        except Exception:  # noqa: BLE001 - taken by a close meanwhile; the next round tries again
            log.exception("pool %r: checking in dropped connection %s failed", pool.name, wrapper.id[:8])
    return len(found)
