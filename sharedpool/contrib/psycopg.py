"""psycopg 3: a ``psycopg_pool.ConnectionPool`` whose connections are leased.

    from sharedpool.contrib.psycopg import ConnectionPool

    with ConnectionPool("host=db dbname=app", resource="pg", min_size=2, max_size=8) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")

It *is* a :class:`psycopg_pool.ConnectionPool` (same arguments, same methods,
same background workers, ``check`` / ``configure`` / ``reset``, ``max_lifetime``,
``max_idle``, ``resize()``, ``drain()``, stats), plus ``resource=`` and
``coordinator=``. Each connection the pool's workers open first takes a lease
(waiting up to ``lease_timeout``, default the pool's ``timeout``); a lease
that does not come in time counts as a failed connect attempt, so psycopg_pool
retries with its backoff as it would for an unreachable server. A connection
is closed (and the close confirmed) before its lease goes back, on every path
the pool closes one; a broken connection the pool merely drops gives its
lease back before the pool opens the replacement. One its user drops without
``putconn()`` is closed once garbage-collected, as with psycopg_pool, and its
lease goes back once the server let go.

With a global cap smaller than the sum of the pools' ``min_size``, pools wait
for leases rather than fail (``open(wait=True)`` may time out, as it would on
a slow server). Those waits take at most ``num_workers - 1`` of the pool's
workers: one stays free to return connections (``reset=``) and check them
(with ``num_workers=1``, the one worker may wait: give it two or more).
When the coordinator asks for leases back, idle connections are closed and
the pool shrinks (below ``min_size`` if need be; it grows back on demand).

psycopg_pool pools are not fork-safe: make (or ``open()``) the pool in the
process that uses it. A pool opened before a fork refuses to serve in the child.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

try:
    import psycopg
    import psycopg_pool
    from psycopg import errors as e
    from psycopg.pq import TransactionStatus
    from psycopg_pool.abc import CT
    from psycopg_pool.pool import AddConnection
except ImportError as missing:
    raise ImportError(f"sharedpool.contrib.psycopg needs psycopg and psycopg_pool ({missing}); "
                      "pip install 'sharedpool[psycopg-pool]'") from missing

from ..client import current_pid
from ..config import NO_ASYNCIO, check_host_number, check_seconds, check_sync_callable
from ..errors import ConfigError, PoolTimeout
from ..fence import password_spill
from ._leases import LeaseBook
from ._waiters import Waiters

__all__ = ["ConnectionPool"]

if not hasattr(psycopg_pool.ConnectionPool, "_close_connection"):  # pragma: no cover
    # Older psycopg_pool closes connections itself (conn.close()) on most paths: their
    # leases would go back unconfirmed, a busy backend still running (I1).
    raise ImportError(f"sharedpool.contrib.psycopg needs psycopg_pool >= 3.2.8 (this is psycopg_pool "
                      f"{psycopg_pool.__version__}, whose pools close connections past the lease "
                      f"book); upgrade psycopg_pool")

log = logging.getLogger("sharedpool.contrib.psycopg")

#: Seconds before an AddConnection that found every spare worker in a lease
#: wait tries again.
WAIT_SLOT_RETRY = 0.1


#: psycopg_pool's sizes: True where it counts with one (range(): an integer), False
#: where it only compares it (a float was fine there); max_size may be None (min_size) ...
_SIZES = {"min_size": True, "max_size": False, "num_workers": True, "max_waiting": False}
#: ... and its times, inf being "never" where psycopg_pool takes it so; max_idle
#: is a wait of its scheduler thread, which inf or 1e300 killed (OverflowError).
_TIMES = {"max_lifetime": True, "max_idle": False, "reconnect_timeout": True}


#: psycopg_pool 3.3 takes a callable conninfo / kwargs, called at each connect.
_CALLABLE_PARAMS = hasattr(psycopg_pool.ConnectionPool, "_resolve_conninfo")


def _check_conninfo(conninfo: Any, kwargs: Any) -> None:
    """psycopg_pool takes any ``conninfo`` and ``kwargs`` and connects in its
    worker threads: ``conninfo=3`` or ``kwargs=3`` failed every connect unseen
    (a bare PoolTimeout), and a malformed string was logged with libpq's parse
    error, which quotes a piece of it (maybe of the password). Neither value
    is shown here. A callable (psycopg_pool 3.3: parameters made at each
    connect, e.g. a token that expires) is its to call: only an async one is
    refused, whose coroutine this sync pool would connect with."""
    if _CALLABLE_PARAMS and callable(conninfo) and not isinstance(conninfo, str):
        check_sync_callable("conninfo", conninfo)
    elif not isinstance(conninfo, str):
        raise ConfigError("conninfo", f"must be a connection string (a str), got a {type(conninfo).__name__}")
    else:
        try:
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error:
            raise ConfigError("conninfo", "not a valid PostgreSQL connection string (not shown: it may "
                              "hold a password)") from None
        if (spill := password_spill(params)) is not None:  # else each connect's error quoted a piece
            raise ConfigError("conninfo", f"not a valid PostgreSQL connection string: {spill}")
    if _CALLABLE_PARAMS and callable(kwargs) and not isinstance(kwargs, Mapping):
        check_sync_callable("kwargs", kwargs)
    elif kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError("kwargs", f"must be a dict of connection parameters, got a {type(kwargs).__name__}")


def _check_kinds(args: dict[str, Any]) -> None:
    """psycopg_pool's numeric arguments in ``args``, by kind (its own checks say
    what range): a string was a TypeError from inside it, at the first checkout
    (max_waiting), or in its worker threads, every connect failing unseen
    (max_lifetime: a bare PoolTimeout)."""
    for name, integer in _SIZES.items():
        if name in args:
            check_host_number(name, args[name], integer=integer, optional=name == "max_size")
    for name, forever in _TIMES.items():
        if name in args:
            # As a float or int (a Fraction would fail psycopg_pool's own messages' formats).
            args[name] = check_seconds(name, args[name], forever=forever, host_wait=True)


class ConnectionPool(psycopg_pool.ConnectionPool[CT]):
    """:class:`psycopg_pool.ConnectionPool` with leased connections.

    ``resource``: the coordinator's resource to lease from. ``coordinator``:
    its socket path (None: ``$SHAREDPOOL_SOCKET``; with neither, nothing is
    leased). ``lease_timeout``: how long opening one connection waits for a
    lease (None: the pool's ``timeout``). ``confirm_timeout``: how long a close
    waits for the server to drop the connection. Every other argument is
    psycopg_pool's.
    """

    def __init__(self, conninfo: Any = "", *, resource: str, coordinator: str | None = None,
                 lease_timeout: float | None = None, confirm_timeout: float = 2.0,
                 configure: Any = None, **kwargs: Any) -> None:
        # Else psycopg_pool called them in its threads: every connect (configure) or
        # checkout (check: Django's OPTIONS["pool"]["check"] = "yes") failed unseen, a
        # bare PoolTimeout after timeout; every return discarded its connection (reset).
        # An async one's coroutine was never awaited: no setup, no check, no reset, and
        # reconnect_failed's alert never ran (a RuntimeWarning only).
        for field, value in (("configure", configure), ("check", kwargs.get("check")),
                             ("reset", kwargs.get("reset")),
                             ("reconnect_failed", kwargs.get("reconnect_failed"))):
            # A falsy one (False, 0, ""): none, as psycopg_pool takes it ("if self._check:").
            if value and not callable(value):
                raise ConfigError(field, f"must be callable, got {value!r}")
            check_sync_callable(field, value)
        if isinstance(kwargs.get("connection_class"), type) and issubclass(kwargs["connection_class"],
                                                                           psycopg.AsyncConnection):
            # Else every connect failed ("'coroutine' object has no attribute"), a PoolTimeout.
            raise ConfigError("connection_class", f"is an asyncio connection class: this pool is a sync "
                                                  f"psycopg_pool.ConnectionPool; {NO_ASYNCIO}")
        # Ready before psycopg_pool's __init__, which may open the pool and
        # start connecting in its workers at once.
        # lends: psycopg_pool holds no connection it hands out; neither does the
        # book, so that one dropped unreturned goes (its backend, its lease).
        self._sp_book = LeaseBook(resource, coordinator, confirm_timeout=confirm_timeout,
                                  idle=self._sp_idle, reclaim=self._sp_reclaim, lends=True)
        self._sp_lease_timeout = check_seconds("lease_timeout", lease_timeout, optional=True, forever=True)
        _check_conninfo(conninfo, kwargs.get("kwargs"))
        _check_kinds(kwargs)
        if "timeout" in kwargs:
            # Without lease_timeout, the lease wait is the pool's timeout: a bad one (-1,
            # nan, "5") failed every connect, seen only as a PoolTimeout. With it too: not
            # inf nor past TIMEOUT_MAX, with which psycopg_pool's own wait raises OverflowError.
            # Passed on as checked: a Fraction was taken, then psycopg_pool's "couldn't get
            # a connection after {:.2f} sec" raised TypeError in place of its PoolTimeout.
            kwargs["timeout"] = check_seconds("timeout", kwargs["timeout"], host_wait=True)
        self._sp_configure = configure
        self._sp_opened_in: int | None = None
        self._sp_local = threading.local()
        self._sp_closing = False
        #: (monotonic time, error) of the last lease attempt that failed, until a lease
        #: is granted: said by a getconn() timeout, since psycopg_pool only logs it
        #: ("error connecting")
        self._sp_lease_failed: tuple[float, BaseException] | None = None
        #: keys of the lease waits under way (AddConnection tasks queued at the cap)
        self._sp_lease_waits: set[object] = set()
        #: connections put back and queued for a worker to return (with reset=)
        self._sp_returning: dict[int, Any] = {}
        # Lease waits run on psycopg_pool's workers, which also return
        # connections (with reset=) and check them: one worker stays free of them.
        workers = kwargs.get("num_workers", 3)
        spare = workers - 1 if isinstance(workers, int) else 2
        self._sp_wait_slots = threading.BoundedSemaphore(max(1, spare))
        super().__init__(conninfo, configure=self._sp_configure_conn if configure else None, **kwargs)
        if not hasattr(self, "_lock"):
            # psycopg_pool 3.2 makes it at open() (it keeps one made before): with
            # open=False, this and get_stats() or close() raised AttributeError.
            self._lock = threading.RLock()  # psycopg_pool's own kind (_acompat.Lock)
        # Replaced before any getconn(): psycopg_pool left a caller whose wait
        # ended on a BaseException queued, and handed it the next connection.
        with self._lock:
            self._waiting = Waiters(self._sp_book, self._sp_local)  # type: ignore[assignment]

    @property
    def lease_book(self) -> LeaseBook:
        return self._sp_book

    def _check_size(self, min_size: int, max_size: int | None) -> tuple[int, int]:
        # At __init__ and resize(): psycopg_pool's own checks say which range,
        # but a string was "'<' not supported between instances of 'str' and 'int'".
        _check_kinds({"min_size": min_size, "max_size": max_size})
        return super()._check_size(min_size, max_size)

    # ------------------------------------------------------------------ stats

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool's stats plus ``leases_held`` (including ``leases_closing``:
        connections closed whose server has not let go yet), ``leases_acquired``,
        ``lease_wait_ms``, ``lease_timeouts``, ``leases_reclaimed``..."""
        stats = super().get_stats()
        stats.update(self._sp_book.stats())
        return stats

    def pop_stats(self) -> dict[str, int]:
        stats = super().pop_stats()
        stats.update(self._sp_book.stats(reset=True))
        return stats

    def _get_measures(self) -> dict[str, int]:
        with self._lock:
            self._sp_prune_waiting()  # requests_waiting: the callers still waiting, not those gone
        return super()._get_measures()

    # ------------------------------------------------------------------ open / use

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        if wait:  # before it opens: a refused open() changes nothing
            timeout = check_seconds("timeout", timeout, host_wait=True)
        super().open(wait, timeout)

    def wait(self, timeout: float = 30.0) -> None:
        # Past TIMEOUT_MAX psycopg_pool's Event.wait raised OverflowError (not its
        # PoolTimeout, which closes the pool).
        timeout = check_seconds("timeout", timeout, host_wait=True)
        super().wait(timeout)

    def _open(self) -> None:
        if self._closed:
            self._sp_opened_in = current_pid()
        super()._open()

    def getconn(self, timeout: float | None = None) -> CT:
        if timeout is not None:  # past TIMEOUT_MAX psycopg_pool's wait raised OverflowError, at the cap
            timeout = check_seconds("timeout", timeout, host_wait=True)
        if self._sp_opened_in not in (None, current_pid()):
            raise psycopg_pool.PoolClosed(
                f"the pool {self.name!r} was opened in process {self._sp_opened_in}, before a fork: "
                "psycopg_pool pools do not survive fork(); make or open() the pool in the child")
        why = self._sp_book.closed_reason()
        if why is not None:
            # No lease is taken any more: refused here. After release_process()
            # psycopg_pool still queued the connections it closed (handed out
            # closed); after end-session getconn() waited out its timeout.
            raise psycopg_pool.PoolClosed(f"pool {self.name!r}: {why}")
        if self._waiting:  # nearly free when nobody waits
            with self._lock:
                self._sp_prune_waiting()
        start = time.monotonic()
        local = self._sp_local
        local.waiter = None  # set by psycopg_pool's queueing us (Waiters.append)
        try:
            conn = super().getconn(timeout)
        except psycopg_pool.PoolTimeout as exc:
            local.waiter = None
            if note := self._sp_timeout_note(start):
                raise psycopg_pool.PoolTimeout(f"{exc}{note}") from None
            raise
        except BaseException as exc:
            waiter, local.waiter = local.waiter, None
            if waiter is not None and not isinstance(exc, Exception):
                # Cut short by a SystemExit, KeyboardInterrupt...: psycopg_pool
                # keeps waiting for us (see _waiters.py).
                lost = waiter.give_up(exc)
                if lost is not None:
                    self._putconn(lost, from_getconn=True)
            raise
        local.waiter = None  # its connection held here no longer (a dropped one is collected)
        self._sp_book.lend(conn)
        return conn

    def _sp_timeout_note(self, since: float) -> str:
        """Why a getconn() that waited since ``since`` got no connection, as far as
        leases tell: psycopg_pool only logs a failed connect ("error connecting"),
        and a short-lived process (Django's manage.py migrate) showed only
        "couldn't get a connection after 30.00 sec"."""
        failed = self._sp_lease_failed
        # Refused at once (an unknown resource...), or refused before and no lease
        # granted since: psycopg_pool's backoff between attempts (1, 2, 4... s) leaves
        # no lease wait under way, and a timeout in it said nothing at a cap held on.
        if failed is not None and (failed[0] >= since or not self._sp_lease_waits):
            return f"; no lease: {failed[1]}"
        # A lease wait as long as getconn()'s, started after it, has not ended yet.
        if note := self._sp_book.unreachable_note():
            return note
        if self._sp_lease_waits:
            # Else only psycopg_pool's words, as if this pool's own max_size were
            # taken: a Django view at the cap said "couldn't get a connection".
            book = self._sp_book
            return (f"; still waiting for a lease of {book.resource!r} from the coordinator at "
                    f"{book.coordinator}: none granted in time (its cap taken, or the resource paused: "
                    "`sharedpool status`)")
        return ""

    def _sp_waiting(self) -> bool:
        """Whether a getconn() still waits (a copy of the queue: no lock taken)."""
        return any(map(_still_waiting, list(self._waiting)))

    def _sp_prune_waiting(self) -> bool:
        """Drop the getconn() calls that gave up (timed out, interrupted); say
        whether any still waits. Called with the pool's lock held. psycopg_pool
        forgets them only when a connection is put back, which a pool starved
        by the global cap may not see for hours: they would pile up, and
        counted as waiting they keep a lease asked for, taken for nobody."""
        waiting = self._waiting
        live = [w for w in waiting if _still_waiting(w)]
        if len(live) != len(waiting):
            waiting.clear()
            waiting.extend(live)
        return bool(live)

    def close(self, timeout: float = 5.0) -> None:
        # Checked before anything closes: psycopg_pool's close() marks the pool
        # closed, then its threading wait raised on "5", inf or 1e300, and the
        # idle connections' leases, given back below, were held for good
        # (a second close() returns at once). Beyond TIMEOUT_MAX: that long.
        timeout = min(check_seconds("timeout", timeout), threading.TIMEOUT_MAX)
        self._sp_closing = True  # ends the workers' lease waits, so they stop in time
        self._sp_book.notify_returned()
        super().close(timeout)
        with self._lock:
            dropped, self._sp_returning = list(self._sp_returning.values()), {}
        for conn in dropped:
            # Put back just before the close: psycopg_pool's workers skip the
            # queued return once the pool is closed, leaving the connection
            # open (and its lease held) with nobody to close it.
            self._close_connection(conn)
        if self._sp_opened_in in (None, current_pid()):
            self._sp_book.sweep(_gone)
            self._sp_book.sweep_until_empty(_gone)  # connections still out: closed by their users
            self._sp_book.shutdown()

    # ------------------------------------------------------------------ connect / close

    def _putconn(self, conn: CT, from_getconn: bool) -> None:
        self._sp_book.lent_back(conn)
        if self._reset:  # returned by a worker task, which a close() may skip
            with self._lock:
                self._sp_returning[id(conn)] = conn
        super()._putconn(conn, from_getconn)

    def _return_connection(self, conn: CT, from_getconn: bool) -> None:
        with self._lock:
            self._sp_returning.pop(id(conn), None)
        super()._return_connection(conn, from_getconn)

    def _sp_timeout(self) -> float:
        return self._sp_lease_timeout if self._sp_lease_timeout is not None else self.timeout

    def _add_connection(self, attempt: Any, growing: bool = False) -> None:
        # A worker task: lease first. The wait ends early if the pool closes,
        # or if the connection is no longer needed (it was to serve clients
        # that a returned connection has served meanwhile).
        book = self._sp_book
        book.sweep(_gone)  # dropped broken connections give their lease back first
        if not self._sp_wait_slots.acquire(blocking=False):
            # Every other worker waits for a lease: try again shortly rather
            # than take the last free one (this task keeps its place in _nconns).
            if self._sp_closing or self._closed:
                self._sp_not_adding(growing)
            else:
                self.schedule_task(AddConnection(self, attempt, growing=growing), WAIT_SLOT_RETRY)
            return
        key = object()
        # Growing on towards min_size with no caller waiting (psycopg_pool keeps
        # a growth going until min_size): a lease only if one is free now, as
        # the local pool's top-up takes one. Queued, it made the process a
        # waiter; the coordinator asks a waiting process for its idle leases,
        # and this pool paid its own growth with its own idle connection, granted
        # back to that growth: a close and a connect per round for as long as it
        # stayed idle (servers hunt: ~120 a second in a celery child).
        quick = growing and not self._sp_waiting()
        if not quick:
            self._sp_lease_waits.add(key)
        try:
            # Looked at first too: a retry (psycopg_pool's backoff, after a lease
            # wait that timed out) may come when the callers it was for are gone,
            # and a grant that comes at once is taken before the wait looks.
            not_needed = self._sp_not_needed() or book.acquire(key, 0 if quick else self._sp_timeout(),
                                                               local=self._sp_not_needed, probe=quick)
        except PoolTimeout as exc:
            if not quick:
                self._sp_local.lease_error = exc
                self._sp_lease_failed = (time.monotonic(), exc)
            else:  # no free slot for a growth nobody waits for: it ends here, quietly
                self._sp_not_adding(growing)
                return
        except Exception as exc:  # noqa: BLE001 - psycopg_pool's retry and backoff handle it
            self._sp_local.lease_error = exc
            self._sp_lease_failed = (time.monotonic(), exc)
        else:
            if not_needed is not None:
                self._sp_not_adding(growing)
                return
            self._sp_lease_failed = None  # granted: an earlier refusal says nothing now
            self._sp_local.lease_key = key
        finally:
            self._sp_lease_waits.discard(key)
            self._sp_wait_slots.release()
        try:
            super()._add_connection(attempt, growing)
        finally:
            self._sp_local.lease_error = None
            if getattr(self._sp_local, "lease_key", None) is key:  # _connect never ran
                # Nothing was opened under it: back unused, not reported as a failed
                # connect (an exception before the connect is none; enough such
                # reports have the coordinator fail every process's waiters fast).
                self._sp_local.lease_key = None
                book.unused(key)

    def _sp_not_adding(self, growing: bool) -> None:
        """An AddConnection task ends without a connection: uncount it."""
        with self._lock:
            self._nconns -= 1
            if growing:
                self._growing = False
            why = self._sp_book.closed_reason()
            if why is not None:
                # release_process() or end-session: no lease is taken any more. A
                # waiting getconn() would grow the pool again, each task ending
                # here at once: a busy loop until its timeout. It fails now instead.
                while self._waiting:
                    self._waiting.popleft().fail(psycopg_pool.PoolClosed(f"pool {self.name!r}: {why}"))
            elif self._sp_prune_waiting() and not self._closed:
                self._maybe_grow_pool()

    def _sp_not_needed(self) -> bool | None:
        if self._sp_closing or self._closed or self._sp_book.closed_reason() is not None:
            return True
        if not self._sp_waiting() and self._nconns > self._min_size:
            return True
        return None

    def _connect(self, timeout: float | None = None) -> CT:
        book = self._sp_book
        error = getattr(self._sp_local, "lease_error", None)
        if error is not None:
            self._sp_local.lease_error = None
            raise error  # no lease: a failed attempt, retried with psycopg_pool's backoff
        connect = super()._connect
        key = getattr(self._sp_local, "lease_key", None)
        if key is None:
            return book.connect(lambda: connect(timeout), self._sp_timeout())
        self._sp_local.lease_key = None
        return book.open_under(key, lambda: connect(timeout))

    def _sp_configure_conn(self, conn: CT) -> None:
        """The user's ``configure``; a connection it fails on (or leaves in a
        transaction) is closed here, since psycopg_pool would only drop it."""
        try:
            self._sp_configure(conn)
            status = conn.pgconn.transaction_status
            if status != TransactionStatus.IDLE:
                raise e.ProgrammingError(
                    f"connection left in status {TransactionStatus(status).name} by configure "
                    f"function {self._sp_configure}: discarded")
        except BaseException:
            self._sp_book.close(conn, lambda: self._sp_close_now(conn))  # not leased yet: confirm only
            raise

    def _close_connection(self, conn: CT) -> None:
        self._sp_book.close(conn, lambda: self._sp_close_now(conn))

    def _sp_close_now(self, conn: CT) -> None:
        conn._pool = None  # type: ignore[attr-defined]  # psycopg_pool's own mark
        conn.close()

    def _add_to_pool(self, conn: CT) -> None:
        if not self._closed and self._sp_book.owes_back(conn):
            # The coordinator wants a lease back: this connection pays, and the
            # pool shrinks by one (it grows again if clients are waiting).
            self._sp_book.count("leases_reclaimed")
            self._close_connection(conn)
            with self._lock:
                self._nconns -= 1
                if self._sp_prune_waiting():
                    self._maybe_grow_pool()
            return
        super()._add_to_pool(conn)
        self._sp_book.notify_returned()  # a lease wait may no longer be needed

    # ------------------------------------------------------------------ reclaim

    def _sp_idle(self) -> Iterable[Any]:
        with self._lock:
            return list(self._pool)

    def _sp_reclaim(self, count: int) -> int:
        if self._closed or self._sp_opened_in != current_pid():
            return 0
        victims: list[CT] = []
        book = self._sp_book
        with self._lock:
            for conn in [c for c in self._pool if book.revoked(c)][:count]:  # revoked ones first
                self._pool.remove(conn)
                victims.append(conn)
                self._nconns -= 1
            for conn in list(self._pool):  # the one idle longest first
                if len(victims) >= count:
                    break
                if book.pays_back(conn):  # claimed: no other pool of the process pays it too
                    self._pool.remove(conn)
                    victims.append(conn)
                    self._nconns -= 1
            self._nconns_min = min(self._nconns_min, len(self._pool))
        for conn in victims:
            # Counted before its lease goes (reclaimed=True): the waiter elsewhere,
            # served then, may read our stats at once.
            book.close(conn, functools.partial(self._sp_close_now, conn), reclaimed=True)
        return len(victims)


def _still_waiting(waiter: Any) -> bool:
    # psycopg_pool's WaitingClient: a connection or an error set means it is over.
    return waiter.conn is None and waiter.error is None


def _gone(conn: Any) -> bool:
    """A psycopg connection whose socket libpq already dropped (broken or closed)."""
    return isinstance(conn, psycopg.Connection) and conn.closed
