"""redis-py: a ``BlockingConnectionPool`` whose connections are leased.

    import redis
    from sharedpool.contrib.redis import BlockingConnectionPool

    pool = BlockingConnectionPool(host="127.0.0.1", resource="redis", max_connections=8, timeout=20)
    r = redis.Redis(connection_pool=pool)
    r.set("k", "v")

It *is* a :class:`redis.BlockingConnectionPool` (same arguments, blocking
``get_connection`` with ``timeout``, LIFO reuse, health checks, fork reset),
plus ``resource=``, ``coordinator=``, ``lease_timeout=`` (None: the pool's
``timeout``) and ``confirm_timeout=``. redis-py connects lazily: the lease is
taken when a connection object opens its socket, and given back when the
socket is closed (``disconnect()``: errors, ``pool.disconnect()``,
``pool.close()``) and the server confirmed it dropped the client. A thread that
waits for a lease takes a connection another thread checks in meanwhile.

A lease that does not come in time raises :class:`LeaseTimeout` from
``get_connection``: a ``redis.ConnectionError`` (what redis-py raises when its
own pool is exhausted, so ``except redis.RedisError`` catches both) and a
:class:`sharedpool.PoolTimeout`. Call ``pool.disconnect()`` (or
``pool.close()``) at shutdown: ``Redis.close()`` leaves a pool it was given
open (a pool garbage-collected with its connections gives their leases back
then, with a warning). After a fork, redis-py resets the pool in the child; the parent's
connections and leases are left alone and the child opens its own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

try:
    import redis
    from redis.connection import Connection
except ImportError as missing:
    raise ImportError(f"sharedpool.contrib.redis needs redis-py ({missing}); "
                      "pip install 'sharedpool[redis]'") from missing

from ..config import NO_ASYNCIO, blocked_loop_note, check_seconds
from ..errors import ConfigError, PoolTimeout, ResourceUnavailable, TooManyWaiters
from ._acquiring import connect_failed
from ._leases import LeaseBook
from ._orphans import collecting, put_off, start_collector

__all__ = ["BlockingConnectionPool", "LeaseRefused", "LeaseTimeout", "LeaseUnavailable",
           "LeasedConnectionMixin"]

if not hasattr(redis.connection.AbstractConnection, "connect_check_health"):  # pragma: no cover
    # Older redis-py opens sockets elsewhere: leasing would silently not happen.
    raise ImportError(f"sharedpool.contrib.redis needs redis-py >= 6.0, whose connections have "
                      f"connect_check_health() (this is redis-py {redis.__version__}); upgrade redis")

log = logging.getLogger("sharedpool.contrib.redis")

NOT_ASYNCIO = f"this pool serves redis.Redis only; {NO_ASYNCIO}"


class LeaseTimeout(redis.ConnectionError, PoolTimeout):
    """No lease within the pool's timeout: the global cap is reached.

    Both redis-py's ``ConnectionError`` (what an exhausted
    BlockingConnectionPool raises: ``No connection available.``) and
    sharedpool's :class:`~sharedpool.PoolTimeout`."""


class LeaseRefused(redis.ConnectionError, TooManyWaiters):
    """The coordinator would not queue another wait (the resource's
    ``max_waiting``): refused at once, as a redis-py ``ConnectionError`` and
    sharedpool's :class:`~sharedpool.TooManyWaiters`."""


class LeaseUnavailable(redis.ConnectionError, ResourceUnavailable):
    """The coordinator grants no lease for now (the resource is failing: connects
    fail everywhere; or draining): a redis-py ``ConnectionError``, what a server
    that is down raises (so redis-py's ``Retry`` retries it), and sharedpool's
    :class:`~sharedpool.ResourceUnavailable`."""


class _NoShutdown:
    """A connection's socket whose ``shutdown()`` does nothing (see ``disconnect``)."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def shutdown(self, how: int) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name == "_sock":  # not set yet (copy.copy): no recursion
            raise AttributeError(name)
        return getattr(self._sock, name)


class _UseAnother(Exception):  # noqa: N818 - internal signal, never escapes get_connection
    """A connected connection came back while we waited for a lease: use it
    (``connection``, when it was handed to us; else take one from the queue)."""

    def __init__(self, connection: Any = None) -> None:
        super().__init__()
        self.connection = connection


class _WaitSpent(BaseException):  # noqa: N818 - internal signal, past redis-py's Retry
    """A retried call's lease wait ended with ``error``: that ends the call.
    A BaseException: no ``retry_on_error`` list retries it."""

    def __init__(self, error: LeaseTimeout) -> None:
        super().__init__()
        self.error = error


def _lease_timeout(resource: str, exc: PoolTimeout) -> LeaseTimeout:
    if isinstance(exc, LeaseTimeout):
        return exc
    # A plain PoolTimeout would slip past `except redis.RedisError`.
    error = LeaseTimeout(f"no {resource!r} lease in time: {exc}{blocked_loop_note()}")
    error.__cause__ = exc
    return error


class _OneLeaseWait:
    """A leased connection's ``retry``, as redis-py sees it: the user's Retry
    (everything else is its own), whose ``call_with_retry`` runs under
    :meth:`LeasedConnectionMixin._sp_one_wait`. redis-py retries a connect,
    and a command whose connection dropped (reconnecting inside it), on a
    ConnectionError, and LeaseTimeout is one: each attempt would wait the
    whole lease timeout again, and with ``retries=-1`` for ever."""

    __slots__ = ("_conn", "_inner")

    def __init__(self, conn: LeasedConnectionMixin, inner: Any) -> None:
        self._conn, self._inner = conn, inner

    def __getattr__(self, name: str) -> Any:
        if name in _OneLeaseWait.__slots__:  # not set yet (copy.copy): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any],
                        *args: Any, **kwargs: Any) -> Any:
        return self._conn._sp_one_wait(lambda: self._inner.call_with_retry(do, fail, *args, **kwargs))


class LeasedConnectionMixin:
    """Mixed into the pool's ``connection_class``: a socket only under a lease.

    The pool makes one subclass per pool (see ``BlockingConnectionPool``), whose
    ``_sp_pool`` refers (weakly) to it."""

    _sp_pool: weakref.ref[BlockingConnectionPool]
    #: closes the socket and gives the lease back once the pool is gone (close_orphan)
    _sp_orphan: Callable[[Any], None] | None = None
    _sock: Any
    pid: int
    #: when the lease wait of the retried call under way ends (set at its first wait)
    _sp_deadline: float | None = None
    #: a retried call (connect(), a command...) is under way: its attempts share one wait
    _sp_connecting: bool = False
    _sp_retry: Any = None  # the view of the Retry redis-py gave (made once per assignment)

    @property
    def retry(self) -> Any:
        return self._sp_retry

    @retry.setter
    def retry(self, value: Any) -> None:  # redis-py sets it (__init__, the pool's set_retry)
        # Another leased connection's view (copied over): this one's own, over the same Retry.
        inner = value._inner if isinstance(value, _OneLeaseWait) else value
        self._sp_retry = _OneLeaseWait(self, inner)

    def _sp_one_wait(self, run: Callable[[], Any]) -> Any:
        """Run a retried call (a connect, a command) whose attempts share one
        lease wait; once it is spent, the call raises the LeaseTimeout,
        without another attempt (as redis-py's own exhausted pool does)."""
        if self._sp_connecting:  # nested (a connect inside a command): the outer wait
            return run()
        self._sp_connecting = True
        try:
            return run()
        except _WaitSpent as spent:
            raise spent.error from spent.error.__cause__
        finally:
            self._sp_deadline, self._sp_connecting = None, False

    def connect(self) -> None:
        # Also when redis-py's connect() does not go through its retry (older versions).
        self._sp_one_wait(super().connect)  # type: ignore[misc]

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        if self._sock:
            return
        pool = self._sp_pool()
        if pool is None:
            # The pool was collected (this connection kept by its caller): no
            # book to lease from. A plain connect would be a socket under no
            # lease (I1), e.g. redis-py's retry after an error whose
            # disconnect() gave the lease back.
            raise redis.ConnectionError("this connection's sharedpool BlockingConnectionPool was "
                                        "garbage-collected: it cannot connect again without a lease")
        book = pool.lease_book
        local = pool._sp_connected_idle if pool._sp_local_wait() else None
        timeout = pool._sp_timeout()
        if self._sp_connecting and timeout is not None:
            # A retried call: its first wait sets the deadline (not the call's
            # start: a command may have run a while before its connection
            # dropped), its retries wait what is left. (None: each wait is the
            # resource's acquire_timeout; one that runs out ends the call.)
            if self._sp_deadline is None:
                self._sp_deadline = time.monotonic() + timeout
            timeout = max(0.0, self._sp_deadline - time.monotonic())
        try:
            other = book.acquire(self, timeout, local=local, owner=pool)
        except PoolTimeout as exc:
            error = _lease_timeout(book.resource, exc)
            if self._sp_connecting:
                # The call's wait is spent: another attempt would ask again
                # without waiting, in a loop with retries=-1 (for ever) and
                # never queued behind other waiters. _sp_one_wait raises it.
                raise _WaitSpent(error) from None
            raise error from error.__cause__
        except TooManyWaiters as exc:
            if isinstance(exc, LeaseRefused):
                raise
            raise LeaseRefused(exc.reason, f"no {book.resource!r} lease: {exc.detail}") from exc
        except ResourceUnavailable as exc:
            if isinstance(exc, LeaseUnavailable):
                raise
            raise LeaseUnavailable(exc.reason, f"no {book.resource!r} lease: {exc.detail}") from exc
        if other is not None:
            raise _UseAnother(None if other is True else other)
        try:
            if retry_socket_connect:  # redis-py < 6.3 has no such argument (nor passes it)
                super().connect_check_health(check_health)  # type: ignore[misc]
            else:
                super().connect_check_health(check_health, retry_socket_connect)  # type: ignore[misc]
        except BaseException as exc:
            if self._sock is None:  # no socket left: the lease goes straight back
                # Cut short by the process's exit (SystemExit, KeyboardInterrupt):
                # no failed connect (see open_under).
                book.opened(self, failed=True, report=connect_failed(exc))
            raise
        book.opened(self)
        start_collector()  # before a collection's disconnect() or release() (put_off)
        self._sp_orphan = book.orphan_closer(self)
        # That wait is over: a drop later in the same call (a command that
        # connected lazily, then ran a while) waits afresh.
        self._sp_deadline = None

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        parent = super().disconnect  # type: ignore[misc]
        pool = self._sp_pool()
        # Made in another process (inherited across fork): redis-py closes our
        # copy of the fd without shutdown(), and the lease is the parent's (I7).
        if self._sock is None or self.pid != os.getpid():
            parent(*args, **kwargs)
            return
        if pool is None:
            # The pool was collected (dropped without disconnect()): this is our
            # own __del__, or a disconnect of a connection its caller kept.
            # redis-py's shutdown would fake the server's EOF: the socket is
            # taken away first, closed and confirmed elsewhere, then released.
            orphan = getattr(self, "_sp_orphan", None)
            sock = self._sock
            if orphan is not None:
                self._sock = None
            parent(*args, **kwargs)
            if orphan is not None:
                orphan(sock)
            return
        book = pool.lease_book
        if not book.owns(self):
            parent(*args, **kwargs)
            return
        if collecting():
            # A PubSub (or client) dropped in a reference cycle, reset by its
            # __del__ inside a collection, in whatever thread it interrupted: one
            # holding the book's lock waited on itself for good. Its release()
            # that follows is put off as well, so the two keep their order.
            put_off(functools.partial(self.disconnect, *args, **kwargs), "disconnect")
            return
        # redis-py's disconnect() shuts the socket down both ways, which would
        # fake the server's EOF to the close's confirmation; so would a later one
        # while a watcher still waits for an unconfirmed close (redis-py calls it
        # again for the same error: its connect's cleanup, its retry's). With a
        # shutdown() that does nothing, it just closes the fd and the socket leaves
        # the connection at once; the confirmation sends our FIN on its dup.
        self._sock = _NoShutdown(self._sock)
        book.close(self, lambda: parent(*args, **kwargs))


#: Keywords redis-py's pool takes out of its connection keywords itself (client-side caching).
_POOL_TAKES = frozenset({"cache", "cache_config"})


def _keywords(cls: type) -> tuple[frozenset[str], bool]:
    """The keywords ``cls(...)`` names: its ``__init__``'s and its bases' as far as
    each passes ``**kwargs`` on; and whether that is all it takes (False if an
    ``__init__`` outside redis-py, or the last one, takes any ``**kwargs``, or
    one takes ``*args``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            # A decorator that hides the signature (no functools.wraps): what it
            # takes is not known here, and the next class up would answer wrongly.
            break
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return frozenset(names - {"self"}), True
        if not klass.__module__.startswith("redis."):
            break
    return frozenset(names - {"self"}), False


def _check_connection_keywords(connection_class: type, kwargs: dict[str, Any]) -> None:
    """Every keyword not the pool's is one ``connection_class`` takes: redis-py
    passes them to each connection it makes, so a typo (``hots=``) or one of
    another class (``ssl_certfile=`` without SSLConnection) was a TypeError
    from inside redis-py at the first command, not at construction."""
    takes, known = _keywords(connection_class)
    if not known or not kwargs:  # a class of the user's that takes any **kwargs: it may use them
        return
    allowed = (takes | _keywords(redis.BlockingConnectionPool)[0] | _POOL_TAKES) - {"connection_class"}
    unknown = [k for k in kwargs if k not in allowed]
    if not unknown:
        return
    name = unknown[0]
    raise ConfigError(name, f"unknown keyword for {connection_class.__name__} (redis-py passes every "
                      f"keyword it does not take itself to each connection){_hint(name, connection_class)}; "
                      f"allowed: {', '.join(sorted(allowed))}")


def _hint(name: str, connection_class: type) -> str:
    """What an unknown keyword suggests, by the class given: a typo (``ssl_certfiel=``
    with SSLConnection, ``host_addr=`` with Connection) was told to change the class."""
    kind = name.partition("_")[0]
    if kind == "ssl":
        if not issubclass(connection_class, redis.SSLConnection):
            return "; TLS settings need connection_class=redis.SSLConnection"
        if name == "ssl":
            return "; ssl=True is redis.Redis's: connection_class=redis.SSLConnection is TLS already"
    unix = issubclass(connection_class, redis.UnixDomainSocketConnection)
    if kind == "path" and not unix:
        return "; a Unix socket path needs connection_class=redis.UnixDomainSocketConnection"
    if kind in ("host", "port") and unix:
        return "; a Unix socket connection takes path= instead"
    return ""


class BlockingConnectionPool(redis.BlockingConnectionPool):
    """:class:`redis.BlockingConnectionPool` whose connections each hold a lease of ``resource``.

    ``coordinator``: the coordinator's socket path (None: ``$SHAREDPOOL_SOCKET``;
    with neither, nothing is leased). ``lease_timeout``: how long opening a
    connection waits for a lease (None: the pool's ``timeout``; None there too:
    the resource's default). ``confirm_timeout``: how long a close waits for
    the server to drop the client. Every other argument is redis-py's.
    """

    def __init__(self, max_connections: int = 50, timeout: float | None = 20, *,
                 resource: str, coordinator: str | None = None, lease_timeout: float | None = None,
                 confirm_timeout: float = 2.0, connection_class: type[Any] = Connection,
                 **kwargs: Any) -> None:
        if not isinstance(connection_class, type):  # not an AttributeError from inside
            raise ConfigError("connection_class", f"must be a redis-py connection class, "
                              f"got {connection_class!r}")
        if inspect.iscoroutinefunction(getattr(connection_class, "connect", None)):
            raise ConfigError("connection_class", f"is redis.asyncio's {connection_class!r}: {NOT_ASYNCIO}")
        _check_connection_keywords(connection_class, kwargs)
        # redis-py's connections refer to their pool (maint_notifications handler):
        # a book finalizer holding them would keep the pool alive for ever.
        self._sp_book = LeaseBook(resource, coordinator, confirm_timeout=confirm_timeout,
                                  idle=self._sp_idle, reclaim=self._sp_reclaim,
                                  close_when_collected=False)
        self._sp_lease_timeout = check_seconds("lease_timeout", lease_timeout, optional=True, forever=True)
        # Without lease_timeout, the lease wait is the pool's timeout (None: the resource's
        # default): nan made it 0, -1 and "5" failed at the first command, deep inside.
        # With it too: not inf nor past TIMEOUT_MAX, with which redis-py's own wait
        # raises OverflowError at the cap (None waits).
        timeout = check_seconds("timeout", timeout, optional=True, host_wait=True)
        self._sp_local = threading.local()
        leased = type(f"Leased{connection_class.__name__}", (LeasedConnectionMixin, connection_class),
                      {"_sp_pool": weakref.ref(self), "__module__": __name__})
        super().__init__(max_connections=max_connections, timeout=timeout,
                         connection_class=leased, **kwargs)

    @property
    def lease_book(self) -> LeaseBook:
        return self._sp_book

    def lease_stats(self) -> dict[str, int]:
        """Lease counters: ``leases_held``, ``leases_acquired``, ``lease_wait_ms``..."""
        return self._sp_book.stats()

    def _sp_timeout(self) -> float | None:
        return self._sp_lease_timeout if self._sp_lease_timeout is not None else self.timeout

    # ------------------------------------------------------------------ checkout / checkin

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__", "").startswith("redis.asyncio."):
            # A redis.asyncio client awaits what this returns: a TypeError, and the
            # connection (its lease) checked out for good. Refused before either.
            raise ConfigError("connection_pool", f"is given to a redis.asyncio client: {NOT_ASYNCIO}")
        self._sp_local.handing_out = True
        try:
            while True:
                try:
                    return super().get_connection(*args, **kwargs)
                except _UseAnother as use:
                    # The unconnected one went back to the queue's far end.
                    if use.connection is not None:
                        return use.connection  # handed over at checkin, still counted in use
        finally:
            self._sp_local.handing_out = False

    def _sp_local_wait(self) -> bool:
        """Whether a lease wait may end with another connection of ours: inside
        get_connection (always then: a peer may be connecting right now)."""
        return bool(getattr(self._sp_local, "handing_out", False))

    def make_connection(self) -> Any:
        connection = super().make_connection()
        connection._sp_generation = self._sp_generation  # which reset() it belongs after
        return connection

    def release(self, connection: Any) -> None:
        if self.pid == os.getpid() and collecting():  # see LeasedConnectionMixin.disconnect
            put_off(functools.partial(self.release, connection), "release")
            return
        if self.pid == os.getpid():
            inner = getattr(connection, "_conn", connection)  # CacheProxyConnection wraps one
            if getattr(connection, "_sp_generation", self._sp_generation) != self._sp_generation:
                # Checked out before a reset(): the pool has forgotten it (its queue
                # has an empty slot for it already) and redis-py would drop it as it
                # is, socket and lease with it. Close it: the lease goes back.
                connection.disconnect()
                return
            if inner._sock is not None and self._sp_book.owes_back(inner):
                # The coordinator wants a lease back: this connection pays.
                self._sp_book.count("leases_reclaimed")
                connection.disconnect()
            elif (inner._sock is not None and self.owns_connection(connection)
                  and not _should_reconnect(connection) and self._sp_book.offer(connection, owner=self,
                                                          back=lambda: self.release(connection))):
                return  # handed, still in use, to a thread waiting for a lease
        super().release(connection)
        if self.pid != os.getpid():
            return
        if not self._sp_connected(connection):
            self._sp_to_far_end(connection)  # handed out last: connected ones go first
        else:
            self._sp_book.notify_returned()

    def _sp_to_far_end(self, connection: Any) -> None:
        q: Any = self.pool
        with _locked(q):
            try:
                q.queue.remove(connection)
            except ValueError:
                return  # taken already, or not put back (pool reset)
            _insert_far(q, connection)

    # ------------------------------------------------------------------ reclaim

    def _sp_connected(self, conn: Any) -> bool:
        return conn is not None and getattr(conn, "_conn", conn)._sock is not None

    def reset(self) -> None:
        """redis-py's reset: the pool forgets its connections (at init, after a
        fork, or when a caller asks). In the process that made them, the idle
        ones are disconnected first (confirmed, their leases back): forgotten,
        they kept their sockets and leases, which the lease book still counts."""
        if getattr(self, "pid", None) == os.getpid() and hasattr(self, "pool"):
            for conn in self._sp_idle():
                try:
                    conn.disconnect()
                except Exception:  # noqa: BLE001 - reset the rest whatever one does
                    log.exception("sharedpool: disconnecting a connection at reset failed")
        # Those checked out now are closed when they come back (see release()).
        self._sp_generation = getattr(self, "_sp_generation", 0) + 1
        super().reset()

    def _sp_idle(self) -> Iterable[Any]:
        if self.pid != os.getpid():
            return []
        with _locked(self.pool):
            return [getattr(c, "_conn", c) for c in self.pool.queue if self._sp_connected(c)]

    def _sp_connected_idle(self) -> bool | None:
        with _locked(self.pool):
            return True if any(self._sp_connected(c) for c in self.pool.queue) else None

    def _sp_reclaim(self, count: int) -> int:
        """Disconnect up to ``count`` idle connections, the coldest first."""
        if self.pid != os.getpid():
            return 0
        q: Any = self.pool
        with _locked(q):
            order = list(q.queue) if isinstance(q, queue.LifoQueue) else list(reversed(q.queue))
            book = self._sp_book
            order.sort(key=lambda c: not book.revoked(getattr(c, "_conn", c)))  # revoked ones first
            picked: list[Any] = []
            for conn in order:
                if len(picked) >= count:
                    break
                # pays_back claims an owed lease: no other pool of the process pays it too
                if self._sp_connected(conn) and book.pays_back(getattr(conn, "_conn", conn)):
                    picked.append(conn)
            for conn in picked:
                q.queue.remove(conn)
        for conn in picked:
            # One disconnect that raises must not leave the rest picked and
            # never closed (their leases claimed as given back).
            try:
                # Counted before the disconnect releases the lease: the waiter
                # elsewhere, served then, may read our stats at once.
                self._sp_book.count("leases_reclaimed")
                conn.disconnect()
            except Exception:  # noqa: BLE001 - logged; the others still go
                log.exception("sharedpool: disconnecting an idle connection given back on reclaim failed")
            finally:
                _put_back_far(q, conn)
        return len(picked)


def _locked(q: Any) -> contextlib.AbstractContextManager[Any]:
    """``q``'s lock. A queue gevent or eventlet monkey-patched in (redis-py's
    LifoQueue then) has none: its greenlets switch only where one waits, and
    nothing waits inside these blocks."""
    mutex = getattr(q, "mutex", None)
    return contextlib.nullcontext() if mutex is None else mutex


def _insert_far(q: Any, conn: Any) -> None:
    """Put ``conn`` where ``q`` hands out last (under :func:`_locked`)."""
    if isinstance(q, queue.LifoQueue):
        q.queue.insert(0, conn)
    else:
        q.queue.append(conn)


def _put_back_far(q: Any, conn: Any) -> None:
    """Put ``conn``, taken out of ``q``, back at its far end and wake a waiter."""
    not_empty = getattr(q, "not_empty", None)
    if not_empty is not None:  # the standard queue
        with q.mutex:
            _insert_far(q, conn)
            not_empty.notify()
        return
    # A green queue (no mutex, no condition): its put() wakes a getter, which runs
    # only once we switch; moved to the far end before that.
    q.put_nowait(conn)
    q.queue.remove(conn)
    _insert_far(q, conn)


def _should_reconnect(connection: Any) -> bool:
    """redis-py's mark for a connection to drop at checkin (7.0+; none before)."""
    should = getattr(connection, "should_reconnect", None)
    return bool(should()) if should is not None else False
