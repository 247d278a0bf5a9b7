"""Closing a pool's connections: one (close, confirm the server let go, then
release its lease: I1), or all of them, as close() and drain() do (take every
idle connection and waiter out at once under the lock, close and fail them
outside it, and wait for the connections in use). A signal handler's
exception anywhere in a close() leaves the pool either as it was or all taken
out, the rest finished by a thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, TypeVar

from .client import _PID, AcquireRequest
from .closing import WAIT_SLICE, NotClosable, close_and_confirm, close_in_background
from .dropped import in_a_thread
from .errors import ConfigError, PoolClosed
from .process import short_of
from .status import PoolStatus, valid_timeout
from .unowned import take_back
from .wrapper import ConnectionWrapper

if TYPE_CHECKING:
    from .pool import ConnectionPool
    from .waiting import _Waiter

log = logging.getLogger("sharedpool.pool")

T = TypeVar("T")


def evict(pool: ConnectionPool[T], idle: deque[ConnectionWrapper[T]], waiters: deque[_Waiter],
           status: PoolStatus) -> None:
    """Under the lock: what a close() or drain() took out of the pool leaves
    it: the idle connections out of _all (counted in _closing until closed),
    the waiters failed. Can run again (a wrapper leaves _all once)."""
    for wrapper in idle:
        if pool._all.get(wrapper.id) is wrapper:
            del pool._all[wrapper.id]
            pool._closing += 1
    for waiter in waiters:
        if waiter.error is None:
            waiter.error = PoolClosed(f"pool {pool.name!r} is {status.value}")
        waiter.event.set()


def let_go(pool: ConnectionPool[T], idle: deque[ConnectionWrapper[T]], requests: set[AcquireRequest],
           hand_off: bool = True, wait: float | None = None) -> None:
    """Withdraw the openers' lease requests, close the idle connections
    (evicted), each confirmed within ``wait`` (None: close_confirm_timeout).
    Can run again: both are consumed as they go."""
    for ticket in list(requests):  # a closed pool must not take grants ahead of others
        ticket.cancel()
        requests.discard(ticket)
    while idle:
        # Subscript and del, not popleft(): no call between taking it and
        # the guard of its close (a close cut short settles itself once begun).
        wrapper = idle[0]
        del idle[0]
        try:
            confirmed = pool._close(wrapper, wait=wait)
        except BaseException:
            close_if_untaken(pool, wrapper)  # cut short at _close's entry: not closed yet
            raise
        if not confirmed and idle and hand_off:
            # Not confirmed in close_confirm_timeout (a server that hangs): each
            # of the rest would wait as long in turn (5 idle: close(timeout=5)
            # took 10 s; an admin drain held the session's thread as long). They
            # are closed in a thread, and without that wait (as the integrations'
            # LeaseBook does after one): waited each in turn there, the last was
            # only closed (n - 1) x close_confirm_timeout later and close() waited
            # for that. Each lease is still kept until its server lets go (I1).
            try:
                threading.Thread(target=let_go, args=(pool, idle, set(), False, 0.0), daemon=True,
                                 name=f"sharedpool-close-{pool.resource}").start()
                return
            except RuntimeError:  # no thread to be had: closed here, in turn
                hand_off = False


def let_go_later(pool: ConnectionPool[T], idle: deque[ConnectionWrapper[T]], waiters: deque[_Waiter],
                  requests: set[AcquireRequest], status: PoolStatus) -> None:
    """Thread: the rest of a close() or drain() cut short by a signal handler's
    exception. Nothing else would ever close those connections (a second
    close() returns at once), and their leases would stay held."""
    with pool._lock:
        evict(pool, idle, waiters, status)
    let_go(pool, idle, requests)


def shut(pool: ConnectionPool[T], status: PoolStatus, timeout: float,
         confirm: float | None = None, wait_in_use: bool = True, exit_timeout: float | None = None) -> None:
    """Take ``status`` (DRAINING or CLOSED): close the idle connections (each
    confirmed within ``confirm``, None: close_confirm_timeout) and wait up to
    ``timeout`` for those in use (unless not ``wait_in_use``), closing or opening.
    ``exit_timeout``: release_process()'s, of which ``timeout`` is what is left."""
    if not valid_timeout(timeout):  # NaN would spin below, inf overflows the wait
        raise ConfigError("timeout", f"must be a number of seconds >= 0, got {timeout!r}")
    deadline = time.monotonic() + timeout  # from the call: the idle closes count too
    idle: deque[ConnectionWrapper[T]] | None = None
    try:
        with pool._lock:
            if pool.status is PoolStatus.CLOSED:
                return
            # Made first: a signal handler's exception in a call leaves the
            # pool as it was (still open) or all taken out at once, never half.
            fresh: tuple[deque[ConnectionWrapper[T]], deque[_Waiter], set[AcquireRequest]]
            fresh = deque(), deque(), set()
            idle, waiters, requests = pool._idle, pool._waiters, pool._lease_requests
            pool._idle, pool._waiters, pool._lease_requests = fresh
            pool.status = status
            # Under this lock: no waiter sees itself dropped unanswered.
            evict(pool, idle, waiters, status)
        let_go(pool, idle, requests, wait=confirm)
    except BaseException:
        if idle is not None:  # taken out of the pool: the rest goes on
            threading.Thread(target=let_go_later, args=(pool, idle, waiters, requests, status),
                             daemon=True, name=f"sharedpool-close-{pool.resource}").start()
        raise
    pool._close_dropped()  # out for good, no checkin to wait for (see _Checkout.__del__)
    take_back(pool)  # checkouts dropped without a checkin: none will ever come back by itself
    with pool._lock:
        # Done once every connection is closed and its lease released,
        # not merely checked in.
        # A connection still being opened is closed once made: waited for too.
        # One in use, unless no one would check it in (see release_process).
        while (pool._all and wait_in_use or pool._closing or pool._opening) and pool.status is status:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # timeout=0 (an admin drain or end-session pushed by the
                # coordinator, or asked so): not waiting was the request. Not
                # at an exit whose time pools released before this one took.
                log.log(logging.WARNING if timeout > 0 or exit_timeout else logging.DEBUG,
                        "pool %r: %d connection(s) still in use, %d closing, %d opening, "
                        "after %.1fs%s", pool.name, len(pool._all), pool._closing,
                        pool._opening, timeout, short_of(timeout, exit_timeout))
                break
            pool._returned.wait(min(remaining, WAIT_SLICE))
        if pool._all and not wait_in_use:
            log.warning("pool %r: %d connection(s) still checked out at exit, not waited for "
                        "(no thread would check them in): their leases go back when the process ends",
                        pool.name, len(pool._all))


def close_if_untaken(pool: ConnectionPool[T], wrapper: ConnectionWrapper[T], giving: bool = False) -> None:
    """The guard of a close: its caller took ``wrapper`` out of ``_all`` (counting
    it in ``_closing``) and was cut short (a signal handler's exception) maybe
    before :func:`close_counted` took the connection, at any call on the way
    (``_close``'s first instruction...). If none took it, closed in a thread
    (here if none is to be had), which counts it as ``_close`` does: else it
    stayed open for good, its lease held. Nothing if a close took it."""
    if pool._pid == _PID[0] and wrapper.id in pool._left.entries:
        in_a_thread(f"sharedpool-close-{pool.resource}", functools.partial(pool._close, wrapper, giving))


def close_counted(pool: ConnectionPool[T], wrapper: ConnectionWrapper[T], giving: bool,
                  wait: float | None = None, took: list[bool] | None = None) -> bool:
    """Close ``wrapper``, confirm the server let go (within ``wait``, None:
    close_confirm_timeout), then release its lease (late, from a watcher, if
    the confirmation is late). See ConnectionPool._close.
    Returns whether the server's let-go was confirmed in time. ``took``: its
    first item is set as this takes the connection, with no call between (from
    then on this sees to it, whatever cuts it short). One another close took
    already (see :func:`close_if_untaken`) is left to that one: True."""
    if wait is None:
        wait = pool.config.close_confirm_timeout
    t0 = time.monotonic()  # before the lease is taken off: no call between that and the try
    left = pool._left.entries
    # Taken from the pool finalizer's record (its connections not yet taken by a
    # close): one step with no call in it, so two closes of it never both take it.
    if wrapper.id not in left:
        return True
    lease, client, kept = wrapper.lease, pool._client, wrapper.kept
    wrapper.lease = wrapper.kept = None
    del left[wrapper.id]
    if took is not None:
        took[0] = True
    pid = pool._pid

    keep = lease is not None and client is not None
    done = False  # late() ran: a second call is a no-op

    def late(confirmed: bool) -> None:
        nonlocal done
        if done:
            return
        done = True  # no call before: cut short at its entry, it did nothing (its caller calls again)
        try:
            if client is not None and lease is not None:
                client.release(lease)
        except BaseException:
            # Cut short before it took the lease off (a signal handler's exception at
            # its first instructions), it is still held: once more (else a no-op).
            if client is not None and lease is not None:
                client.release(lease)
            raise
        finally:  # released (or cut short, then sent anyway): uncounted either way
            if keep or giving:
                with pool._lock:
                    if pool._pid == pid:  # not reset by a fork meanwhile
                        pool._leased -= keep
                        pool._giving -= giving
        if pool._pid == pid:
            pool._end_session_if_done()

    begun: list[bool | None] = [None]  # see close_and_confirm
    try:
        confirmed = close_and_confirm(wrapper.conn, wait,
                                      on_late=late if keep else None, kept=kept, begun=begun)
    except NotClosable:  # nothing to close: give the lease back
        log.exception("pool %r: closing connection %s failed", pool.name, wrapper.id[:8])
        confirmed = True
    except BaseException:
        # Cut short (a signal handler's exception): close_and_confirm left
        # the confirmation to a watcher, which calls late(); the caller
        # gets the exception. Cut short at its first instruction, nothing was
        # closed yet: the close goes on in the background. Cut short once it
        # confirmed (as it returned), the lease goes back here.
        if begun[0] is None:
            close_in_background(wrapper.conn, kept, late, wait)
        elif begun[0] or (not keep and giving):
            late(bool(begun[0]))
        raise
    if confirmed:
        try:
            pool._handoff.closed(time.monotonic() - t0)
            pool._handoff.tell(client, pool.resource)
        finally:  # a signal handler's exception here must not keep the lease for good
            try:
                late(True)
            except BaseException:
                late(True)  # cut short at its entry, it did nothing (else a no-op)
                raise
    elif keep:  # not waited for (wait=0): the first close of the row said so
        log.log(logging.WARNING if wait else logging.DEBUG,
                "pool %r: server has not dropped connection %s after %.1fs; its lease is "
                "kept until it does", pool.name, wrapper.id[:8], wait)
    elif giving:
        late(False)  # no lease to keep: only the give-back count to settle
    return confirmed
