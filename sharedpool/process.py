"""This process's pools, so that a worker about to exit can give everything back.

gunicorn's ``worker_exit`` and celery's ``worker_process_shutdown`` call
:func:`release_process`: every pool closes its connections (each close
confirmed, then its lease released) and the process's coordinator sessions
end. Pools register themselves when made; the registry holds them weakly.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Protocol

log = logging.getLogger("sharedpool")


class _Releasable(Protocol):
    def release_for_exit(self, timeout: float) -> None: ...


_POOLS: weakref.WeakSet[Any] = weakref.WeakSet()


def register(pool: _Releasable) -> None:
    """Called by every pool (ours and the integrations' lease books) when made."""
    _POOLS.add(pool)


def release_process(timeout: float = 5.0) -> None:
    """Close this process's leased connections and end its coordinator sessions.

    Pools wait up to ``timeout`` in all (one deadline, however many pools)
    for connections in use. Pools inherited across ``fork()`` release nothing
    of the parent's (I7)."""
    from .client import _ALL

    deadline = time.monotonic() + timeout
    for pool in list(_POOLS):
        try:
            pool.release_for_exit(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - release the rest whatever one pool does
            log.exception("releasing %r at exit failed", pool)
    for client in list(_ALL):
        client.close()
