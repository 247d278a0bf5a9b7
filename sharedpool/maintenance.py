"""What a local pool's background thread does, once a second or so: close idle
connections past ``max_lifetime`` or ``idle_timeout`` (and fallback ones once
the coordinator is back), validate those idle past ``validation_interval``,
check in checkouts dropped without a checkin (sharedpool.unowned),
top up to ``min_size`` (on a thread of its own: a hanging factory must not
stall the rest), and warn of connections checked out past
``leak_detection_threshold``.

The thread holds only a weak reference to its pool, so a pool nobody uses any
more is collected and the thread ends.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import giveback, opening, unowned
from .client import current_pid
from .errors import AccessDenied, UnknownResource
from .status import PoolStatus
from .wrapper import ConnectionWrapper

if TYPE_CHECKING:
    from .pool import ConnectionPool

log = logging.getLogger("sharedpool.pool")

#: The shortest pause between rounds: a validation_interval or leak threshold
#: of a few microseconds (both only have to be > 0) must not make a busy loop.
MIN_INTERVAL = 0.01


def thread_for(pool: ConnectionPool[Any]) -> threading.Thread:
    """``pool``'s maintenance thread, not started; it stops when ``pool._stop`` is
    set, the pool is collected, or the process is a forked child."""
    return threading.Thread(target=_run, args=(weakref.ref(pool), pool._stop),
                            name=f"sharedpool-maintain-{pool.resource}", daemon=True)


def _run(ref: weakref.ref[ConnectionPool[Any]], stop: threading.Event) -> None:
    first = True
    while True:
        pool = ref()
        if pool is None or pool._pid != current_pid():
            return
        interval = max(MIN_INTERVAL, min(pool.config.validation_interval, 1.0,
                                         (pool.config.leak_detection_threshold or 2.0) / 2))
        if not first:
            del pool
            if stop.wait(interval):
                return
            pool = ref()
            if pool is None:
                return
        first = False
        try:
            maintain_once(pool)
        except Exception:  # noqa: BLE001 - keep maintaining
            log.exception("sharedpool pool maintenance failed")
        del pool


def maintain_once(pool: ConnectionPool[Any]) -> None:
    """One round: connections no checkin will come for (dropped checkouts),
    expiry, validation, top-up, leak warnings."""
    pool._close_dropped()
    unowned.take_back(pool)  # draining too: checked in, they close
    now = time.monotonic()
    cfg = pool.config
    expired = []
    to_check = []
    client = pool._client
    # Fallback connections (opened without a lease while the coordinator
    # was away) go once it is back, idle ones here, in-use ones at checkin.
    back = client is not None and client.connected
    unleased = False
    with pool._lock:
        if pool.status is not PoolStatus.ACTIVE:
            return
        keep = len(pool._all)
        for wrapper in list(pool._idle):
            unleased = unleased or wrapper.lease is None
            too_old = now - wrapper.created_at > cfg.max_lifetime or (back and wrapper.lease is None)
            too_idle = now - wrapper.last_used > cfg.idle_timeout and keep > cfg.min_size
            if too_old or too_idle:
                pool._idle.remove(wrapper)
                del pool._all[wrapper.id]
                pool._closing += 1
                expired.append(wrapper)
                keep -= 1
            elif now - max(wrapper.last_used, wrapper.checked_at) > cfg.validation_interval:
                to_check.append(wrapper)
        for wrapper in to_check:  # checked out to the maintenance thread meanwhile
            pool._idle.remove(wrapper)
            wrapper.in_use = True
        missing = cfg.min_size - len(pool._all) - pool._opening
    if unleased and not back and client is not None:
        # Asked at their checkin, once: if the coordinator was still away
        # then, nothing asked again, and they stayed however long it was back.
        client.reconnect_soon()
    for wrapper in expired:
        pool._close(wrapper)
    for wrapper in to_check:
        if pool._validate(wrapper):
            pool._park(wrapper)
        else:
            pool._discard(wrapper)
    if missing > 0:
        with pool._lock:
            begin, pool._filling = not pool._filling, True
        if begin:  # a hanging factory must not stall maintenance (leaks, lifetime, validation)
            threading.Thread(target=_fill_in_background, args=(pool, missing),
                             name=f"sharedpool-fill-{pool.resource}", daemon=True).start()
    check_leaks(pool, now)


def _fill_in_background(pool: ConnectionPool[Any], count: int) -> None:
    pid = pool._pid
    try:
        fill(pool, count)
    finally:
        with pool._lock:
            if pool._pid == pid:  # not reset by a fork meanwhile
                pool._filling = False


def fill(pool: ConnectionPool[Any], count: int) -> None:
    """Top up to min_size, taking a lease only if one is free right now."""

    for _ in range(count):
        with pool._lock:
            if (len(pool._all) + pool._opening >= pool.config.min_size
                    or pool.status is not PoolStatus.ACTIVE):
                return
            pool._opening += 1
            pool._stalled += 1  # no waiter counts on a top-up
            pool._lease_waits += 1  # not connecting until its lease is in
        client = lease = None
        attempted = False
        try:
            client = pool._get_client()  # a bad $SHAREDPOOL_SOCKET raises: undo the counts
            if client is not None:
                # The pool as owner: a grant that comes after this gave up counts as unused.
                lease = client.acquire(pool.resource, 0, _owner=pool)
            with pool._lock:
                pool._lease_waits -= 1
                pool._m["connect_attempts"] += 1
                # Once in, as an opener's: a failed connect's lease was granted all the same.
                pool._m["leases_acquired"] += lease is not None
            attempted = True
            t0 = time.monotonic()
            conn = pool.factory()
        except Exception as exc:  # noqa: BLE001 - retried next round
            if lease is not None and client is not None:
                # As an opener's: counted for the coordinator's "failing" back-off.
                client.report_failure(pool.resource)
                client.release(lease)
            with pool._lock:
                pool._opening -= 1
                pool._stalled -= 1
                pool._lease_waits -= not attempted
                pool._returned.notify_all()  # a close() or drain() may be waiting for it
            pool._end_session_if_done()
            # The factory failed, not the lease: a failed connect. A lease refused
            # for good (a resource name the coordinator does not know, a peer it
            # does not admit) is said as loudly: no checkout will get one either.
            _top_up_failed(pool, "stopped", exc, connect=attempted,
                           loud=isinstance(exc, (UnknownResource, AccessDenied)))
            return
        wrapper = ConnectionWrapper(conn, pool, lease)
        pool._handoff.connected(time.monotonic() - t0)
        pool._handoff.tell(client, pool.resource)
        if client is not None:  # ends a "failing" streak, as an opener's connect does
            client.report_success(pool.resource)
        with pool._lock:
            pool._opening -= 1
            pool._stalled -= 1
            pool._m["total_created"] += 1
            pool._m["connections_ms"] += int((time.monotonic() - t0) * 1000)
            pool._all[wrapper.id] = wrapper
            pool._leased += lease is not None
            revoked = giveback.drop_revoked(pool, wrapper, client)
            wrapper.in_use = True
        if revoked:
            giveback.warn_revoked(pool, wrapper)
        if pool.configure is not None and (error := opening.setup(pool, wrapper, client)) is not None:
            _top_up_failed(pool, "configure failed", error, connect=True)  # as for a caller's checkout
            return  # retried next round
        with pool._lock:
            pool._top_up_failing = False  # connected (and configured): the next failure warns again
        if pool.configure is None and client is not None and wrapper.backend_pid is not None:
            client.report_now()  # the fence must know its backend pid before it is used
        pool._park(wrapper)


def _top_up_failed(pool: ConnectionPool[Any], what: str, error: object, connect: bool,
                   loud: bool = False) -> None:
    """Count a failed top-up connect (connections_errors) and log it: nobody
    waits on a top-up to see its error, and a database that is down must still
    show, once at warning, not at every maintenance round. ``loud``: not a
    connect, but as much worth saying (a lease refused for good)."""
    with pool._lock:
        if connect:
            pool._m["connect_errors"] += 1
        first = (connect or loud) and not pool._top_up_failing
        pool._top_up_failing = pool._top_up_failing or connect or loud
    log.log(logging.WARNING if first else logging.DEBUG, "pool %r: top-up to min_size %s: %s%s",
            pool.name, what, error,
            " (until one succeeds, later failures are logged at debug level)" if first else "")


def check_leaks(pool: ConnectionPool[Any], now: float) -> None:
    """Warn (once each) of connections checked out past leak_detection_threshold."""
    threshold = pool.config.leak_detection_threshold
    if threshold is None:
        return
    with pool._lock:
        # Only checkouts stamped since the last checkin: a connection handed to
        # a waiter is in use a moment before that waiter's thread stamps it,
        # with the last checkout's time still there (0.0 for a new one: a
        # "leak" as old as the host's uptime, with no call site).
        suspects = [w for w in pool._all.values()
                    if w.in_use and not w.warned and w.checked_out_at >= w.last_used
                    and now - w.checked_out_at > threshold]
        for w in suspects:
            w.warned = True
        pool._m["leaks_suspected"] += len(suspects)
    for w in suspects:
        # The pid, resource and lease id are what `sharedpool leases` shows for it.
        lease = "none" if w.lease is None else w.lease.id
        log.warning("pool %r: connection %s (pid %s, resource %r, lease %s) checked out for "
                    "%.1fs (leak_detection_threshold=%gs); acquired at:\n%s",
                    pool.name, w.id[:8], pool._pid, pool.resource, lease,
                    now - w.checked_out_at, threshold, w.site or "(unknown)")
