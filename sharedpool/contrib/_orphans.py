"""What is left when a host-library pool goes without close(): the
connections its LeaseBook still tracks, closed (confirmed) and their leases
released in a thread, never blocking the finalizer that finds them (I1, I2).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..client import Client, Lease, current_pid
from ..closing import close_and_confirm

if TYPE_CHECKING:
    from ._leases import _Entry

log = logging.getLogger("sharedpool.contrib")


def closable(key: Any) -> bool:
    """A connection (not a placeholder for one being opened)."""
    return callable(getattr(key, "close", None)) or callable(getattr(key, "disconnect", None))


class Left:
    """What a book leaves behind when it is garbage-collected (its pool was
    dropped without close() / dispose()): the connections it still tracks."""

    __slots__ = ("entries", "pid", "confirm_timeout", "resource")

    def __init__(self, resource: str, confirm_timeout: float) -> None:
        self.entries: dict[int, _Entry] = {}
        self.pid = current_pid()
        self.resource, self.confirm_timeout = resource, confirm_timeout


def close_left(left: Left) -> None:
    """Finalizer of a collected book: close its connections (confirmed), then
    release their leases, in a thread (a finalizer must not block)."""
    if left.pid != current_pid():
        return  # the parent's (I7)
    entries = [e for e in left.entries.values() if e.lease is not None or closable(e.key)]
    left.entries = {}
    if not entries:
        return
    log.warning("%r: a pool was garbage-collected without close()/dispose(); closing its %d "
                "connection(s) and returning their leases", left.resource, len(entries))

    def run() -> None:
        for entry in entries:
            client, lease = entry.client, entry.lease

            def back(confirmed: bool, client: Client | None = client,
                     lease: Lease | None = lease) -> None:
                if client is not None and lease is not None:
                    client.release(lease)
            if not closable(entry.key):  # a lease taken for a connection never opened
                back(True)
                continue
            kept, entry.kept = entry.kept, None
            try:
                if close_and_confirm(entry.key, left.confirm_timeout, on_late=back, kept=kept):
                    back(True)
            except Exception:  # noqa: BLE001 - the session's end covers the rest
                log.exception("closing a connection of a collected %r pool failed", left.resource)

    threading.Thread(target=run, name=f"sharedpool-orphans-{left.resource}", daemon=True).start()


_orphans_warned: set[str] = set()


def close_orphan(entry: _Entry, sock: Any, resource: str, confirm_timeout: float) -> None:
    """Close ``sock``, the socket of a connection whose book is gone (its pool
    was garbage-collected with it: the connection's own ``__del__`` calls this),
    then release ``entry``'s lease once the server has let go. All of it in a
    thread: a finalizer must neither block nor take the client's lock, which
    the collecting thread may hold. The caller has detached ``sock`` from its
    connection and must not shut it down for reading (that fakes the EOF)."""
    lease, client, kept = entry.lease, entry.client, entry.kept
    entry.lease = entry.kept = None
    if kept is not None:
        # Not used: collected in the same garbage cycle, its finalizer may close
        # it under the thread below. ``sock`` is still open: a dup of it is watched.
        kept.close()
    # At interpreter exit (module globals collected): a thread started now never
    # runs, and Thread.start() waited for it forever (3.11; 3.12+ refuses). The
    # process is ending: so is its session, and the coordinator fences the lease.
    if lease is None or client is None or entry.pid != current_pid() or sys.is_finalizing():
        sock.close()
        return
    level = logging.DEBUG if resource in _orphans_warned else logging.WARNING
    _orphans_warned.add(resource)
    log.log(level, "%r: a pool was garbage-collected without disconnect(); closing its "
            "connection and returning its lease", resource)

    def back(confirmed: bool) -> None:
        client.release(lease)

    def run() -> None:
        try:
            # A socket's close() leaves the dup open: the FIN goes out, the EOF is real.
            if close_and_confirm(sock, confirm_timeout, on_late=back):
                back(True)
        except Exception:  # noqa: BLE001 - the session's end covers the rest
            log.exception("closing a connection of a collected %r pool failed", resource)

    try:
        threading.Thread(target=run, name=f"sharedpool-orphan-{resource}", daemon=True).start()
    except RuntimeError:  # no thread to be had: the lease stays held until the session ends
        sock.close()
