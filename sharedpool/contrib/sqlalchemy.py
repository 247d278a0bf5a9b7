"""SQLAlchemy: an Engine whose QueuePool leases every DBAPI connection.

    from sharedpool.contrib.sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://app@db/app", resource="pg",
                           pool_size=5, max_overflow=5, pool_pre_ping=True)

The engine is a plain SQLAlchemy :class:`~sqlalchemy.engine.Engine`; its pool
is a :class:`LeasedQueuePool`, a :class:`~sqlalchemy.pool.QueuePool` that
takes a lease before each DBAPI connect (so ``do_connect`` / ``connect``
events, ``pool_recycle``, ``pool_pre_ping`` reconnects all ride on one) and
gives it back once that DBAPI connection is closed and the server confirmed
it (after the pool's ``close`` event, which fires before the real close).
Everything else — ``pool_size``, ``max_overflow``, ``pool_timeout``,
``pool_use_lifo``, events, ``engine.dispose()`` — is QueuePool's own.

Fork: ``engine.dispose(close=False)`` in a child, as SQLAlchemy recommends,
leaves the parent's connections and leases alone and the child opens its own.
The pool also notices a fork by itself: a child never gets the parent's
connections from it (I7), even without the dispose.

When the coordinator asks for leases back (another process waits at the cap),
idle connections are closed, and so are connections checked in while leases
are owed; the pool slot stays and reconnects (under a new lease) when needed.
A thread that waits for a lease is handed the next connection a peer thread
checks in (and its queued acquire is withdrawn), so threads of one process
share its connections before asking the coordinator for more.

A connection ``detach()``ed is its user's: closed, its lease comes back at
once; dropped unclosed, it is closed once garbage-collected and its lease
comes back after the server let go (the pool no longer keeps it alive).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    import sqlalchemy
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool, QueuePool
    from sqlalchemy.util import queue as sqla_queue
except ImportError as missing:
    raise ImportError(f"sharedpool.contrib.sqlalchemy needs SQLAlchemy ({missing}); "
                      "pip install 'sharedpool[sqlalchemy]'") from missing

from ..client import current_pid
from ..config import NO_ASYNCIO, blocked_loop_note, check_host_number, check_seconds, check_sync_callable
from ..errors import ConfigError, PoolClosed, PoolTimeout, ResourceUnavailable, TooManyWaiters
from ..process import FORK_LOCK
from ._leases import LeaseBook
from ._orphans import collecting, put_off, start_collector

if TYPE_CHECKING:
    from sqlalchemy.pool.base import ConnectionPoolEntry

__all__ = ["LeaseRefused", "LeaseTimeout", "LeasedQueuePool", "attach", "create_engine"]

if not hasattr(sqlalchemy.pool, "ConnectionPoolEntry"):  # pragma: no cover
    raise ImportError(f"sharedpool.contrib.sqlalchemy needs SQLAlchemy >= 2.0 (this is SQLAlchemy "
                      f"{sqlalchemy.__version__}); upgrade SQLAlchemy")

log = logging.getLogger("sharedpool.contrib.sqlalchemy")


class LeaseTimeout(exc.TimeoutError, PoolTimeout):
    """No lease within the pool's timeout: the global cap is reached.

    Both SQLAlchemy's pool ``TimeoutError`` (what an exhausted QueuePool
    raises) and sharedpool's :class:`~sharedpool.PoolTimeout`."""


class LeaseRefused(exc.TimeoutError, TooManyWaiters):
    """The coordinator would not queue another wait (the resource's
    ``max_waiting``): refused at once, as SQLAlchemy's pool ``TimeoutError``
    and sharedpool's :class:`~sharedpool.TooManyWaiters`."""


class LeasedQueuePool(QueuePool):
    """A QueuePool whose DBAPI connections each hold a lease of ``resource``.

    Takes QueuePool's arguments plus ``resource``, ``coordinator`` (socket
    path; None: ``$SHAREDPOOL_SOCKET``), ``lease_timeout`` (None: the pool's
    ``timeout``) and ``confirm_timeout`` (how long a close waits for the
    server to drop the socket). Most users want :func:`create_engine`.
    """

    def __init__(self, creator: Any, *, resource: str | None = None, coordinator: str | None = None,
                 lease_timeout: float | None = None, confirm_timeout: float = 2.0,
                 book: LeaseBook | None = None, **kw: Any) -> None:
        if book is None and resource is not None:
            book = LeaseBook(resource, coordinator, confirm_timeout=confirm_timeout)
        # Set before QueuePool.__init__, which wraps the creator.
        self._sp_book: LeaseBook | None = book
        self._sp_lease_timeout = check_seconds("lease_timeout", lease_timeout, optional=True, forever=True)
        self._sp_pid = current_pid()
        self._sp_retired = False
        self._sp_local = threading.local()
        super().__init__(creator, **kw)
        if book is not None:
            # Without lease_timeout, the lease wait is pool_timeout's: named as the user gave
            # it; None (QueuePool: no limit) is the resource's acquire_timeout. With it too:
            # not inf nor past TIMEOUT_MAX, with which QueuePool's own wait raises OverflowError.
            # Kept as checked: a Fraction was taken, then the lease wait's "within {:g}s"
            # raised TypeError in place of the LeaseTimeout.
            self._timeout = check_seconds("pool_timeout", self._timeout, optional=True, host_wait=True)
            book.bind(self._sp_idle, self._sp_reclaim)

    @property
    def lease_book(self) -> LeaseBook:
        """The leases of this pool (shared with the pools ``recreate()`` makes)."""
        if self._sp_book is None:
            raise ConfigError("resource", "this LeasedQueuePool was made without a resource")
        return self._sp_book

    def lease_stats(self) -> dict[str, int]:
        """Lease counters: ``leases_held``, ``leases_acquired``, ``lease_wait_ms``..."""
        return self.lease_book.stats()

    def status(self) -> str:
        held = self._sp_book.stats()["leases_held"] if self._sp_book is not None else 0
        return f"{super().status()} Leases held: {held}"

    # ------------------------------------------------------------------ connect

    def _sp_timeout(self) -> float:
        return self._sp_lease_timeout if self._sp_lease_timeout is not None else self._timeout

    def _should_wrap_creator(self, creator: Any) -> Any:
        invoke = super()._should_wrap_creator(creator)

        def leased_creator(record: ConnectionPoolEntry) -> Any:
            book = self._sp_book
            if book is None:
                raise ConfigError("resource", "this LeasedQueuePool was made without a resource")
            making = getattr(self._sp_local, "making", False)

            def took(conn: Any) -> None:
                # Before open_under returns: a signal handler's exception from its
                # return to SQLAlchemy's store (here, or in its __connect) left the
                # connection to the book alone, open and leased until the exit.
                if making:
                    # For _sp_new_record, which closes it if anything after fails (the
                    # connect events too). Not kept otherwise (a reconnect of an
                    # empty slot): this thread's reference would keep a detach()ed
                    # connection dropped unclosed from the collector, its backend
                    # and lease with it.
                    self._sp_local.made = conn
                # Where SQLAlchemy stores it as the creator returns: a reconnect
                # whose checkout fails from here invalidates the record, closing it.
                record.dbapi_connection = conn  # type: ignore[misc]  # _ConnectionRecord has it

            key = getattr(self._sp_local, "lease_key", None)
            if key is None:  # a reconnect (recycle, invalidation): lease here and now
                with _lease_timeout(book, self._sp_timeout()):
                    return book.connect(lambda: invoke(record), self._sp_timeout(), took)
            # Taken by _create_connection or _do_get just before.
            self._sp_local.lease_key = self._sp_local.lease_record = None
            try:
                return book.open_under(key, lambda: invoke(record), took)
            except BaseException:
                # Cut short as open_under starts (a signal handler's exception),
                # before its try: nothing else refers to the lease now. Else a
                # no-op: open_under gave it back, or took() stored the connection.
                book.unused(key)
                raise

        return leased_creator

    def _sp_leased(self) -> bool:
        return self._sp_book is not None and self._sp_book.coordinator is not None

    def _sp_lease_first(self, record: ConnectionPoolEntry | None = None,
                        live: list[Any] | None = None) -> ConnectionPoolEntry | None:
        """Take a lease for the connection the caller is about to open, and
        leave it for the creator. If a peer thread checks a live connection in
        meanwhile, return that record instead (the local queue must not sit
        idle while we wait at the global cap). ``record``: the empty slot it
        is for (see _do_return_conn). ``live``: a one-item list the live record
        is put in as it is taken, for the caller to put back if cut short."""
        book = self._sp_book
        assert book is not None
        key = object()
        try:
            # Always watched, even when no peer seems to hold a connection: one may
            # be opening right now, and a wait nothing local can end keeps this
            # process queued at the coordinator, where it is not asked to give back.
            with _lease_timeout(book, self._sp_timeout()):
                returned = book.acquire(key, self._sp_timeout(), local=lambda: self._sp_take_live(live),
                                        owner=self, taken=live)
            if returned is None:
                self._sp_local.lease_key, self._sp_local.lease_record = key, record
        except BaseException:
            # A signal handler's exception as the lease came (gunicorn's SIGQUIT
            # when the master stops every worker: one's exit frees the slot
            # another waits for), before the creator could find it: it held the
            # lease for the life of the process.
            book.unused(key)
            raise
        return returned  # type: ignore[no-any-return]

    def _sp_unused_lease(self) -> None:
        """The checkout ended before its connect took the lease left for it (a
        signal handler's exception in SQLAlchemy's code before the creator):
        back, unused. Not a failed connect: the creator never ran."""
        key = getattr(self._sp_local, "lease_key", None)
        self._sp_local.lease_key = self._sp_local.lease_record = None
        if key is not None and self._sp_book is not None:
            self._sp_book.unused(key)

    def _create_connection(self) -> ConnectionPoolEntry:
        # QueuePool._do_get counted us as one more connection.
        start_collector()  # before a collection checks one in (_do_return_conn)
        if self._sp_leased():
            taken: list[Any] = [None]
            try:
                live = self._sp_lease_first(None, taken)
            except BaseException:
                # A live one taken as this was cut short: back to the queue (QueuePool
                # uncounts this connection itself), or it was lost, open and leased.
                try:
                    self._sp_put_back_empty(None, taken)
                except BaseException:
                    self._sp_put_back_empty(None, taken)  # cut short in turn
                    raise
                raise
            if live is not None:
                self._dec_overflow()  # we did not grow after all
                return live
            try:
                record = self._sp_new_record()
            finally:
                self._sp_unused_lease()
        else:
            record = self._sp_new_record()
        record._sp_pid = current_pid()  # type: ignore[attr-defined]
        record._sp_book = self._sp_book  # type: ignore[attr-defined]  # for _sp_detached
        return record

    def _sp_new_record(self) -> ConnectionPoolEntry:
        """A new record, connected. SQLAlchemy < 2.0.53 leaves a connection whose
        ``connect`` / ``first_connect`` event raised to the garbage collector,
        which the book's reference keeps from it: its backend and lease would
        stay for good. Close it here (SQLAlchemy's own close, if it made one,
        already took it out of the book)."""
        self._sp_local.made, self._sp_local.making = None, True
        try:
            return super()._create_connection()
        except BaseException:
            made = getattr(self._sp_local, "made", None)
            if made is not None and self._sp_book is not None and self._sp_book.owns(made):
                self._close_connection(made, terminate=True)
            raise
        finally:
            self._sp_local.made, self._sp_local.making = None, False

    def _sp_take_live(self, live: list[Any] | None = None) -> ConnectionPoolEntry | None:
        """Take a record with an open connection from the queue, if there is one
        (put in ``live`` first, with no call before it leaves the queue)."""
        queue: Any = self._pool
        with queue.mutex:
            for record in reversed(queue.queue) if queue.use_lifo else queue.queue:
                if record.dbapi_connection is not None:
                    if live is not None:
                        live[0] = record
                    queue.queue.remove(record)
                    queue.not_full.notify()
                    return record  # type: ignore[no-any-return]
        return None

    def _sp_put_back_empty(self, record: ConnectionPoolEntry | None, back: list[Any] | None = None) -> None:
        """Park a record whose connection was closed (its slot stays, as after an
        invalidation) where it is handed out last: live ones go first.

        ``back`` (in place of ``record``): the records of a checkout given up,
        live ones put back where they are handed out first; each is taken off
        the list in the step that parks it (no call between), so that a second
        call after one cut short (a signal handler's exception) parks none twice."""
        queue: Any = self._pool
        if back is None:
            back = [record]
        dropped: list[Any] = []
        with queue.mutex:
            for i in range(len(back)):
                rec = back[i]
                if rec is None:
                    continue
                # Where it goes, decided first: a signal handler's exception runs
                # after a call (len()), and one between the take-off and the park
                # lost the record (its slot; a live one's connection, leased).
                if queue.maxsize > 0 and len(queue.queue) >= queue.maxsize:
                    park = dropped.append  # the slot goes, as QueuePool's checkin of one too many
                elif (rec.dbapi_connection is None) == queue.use_lifo:
                    park = queue.queue.appendleft
                else:
                    park = queue.queue.append
                back[i] = None
                park(rec)
                queue.not_empty.notify()
        for rec in dropped:
            try:
                if rec.dbapi_connection is not None:
                    self._sp_close(rec)
            finally:
                self._dec_overflow()

    # ------------------------------------------------------------------ close

    def _sp_close(self, record: ConnectionPoolEntry) -> None:
        """``record.close()``, its connection closed even if a close listener
        raised first (SQLAlchemy then skips the close): given back, its lease
        is claimed as on its way (owed, or for a sibling pool's acquire), and
        open in its slot it would stay claimed, the process giving back one
        less until that connection happens to be checked out and in again."""
        try:
            record.close()
        except BaseException:
            conn = record.dbapi_connection
            if conn is not None:
                record.dbapi_connection = None  # type: ignore[misc]  # _ConnectionRecord has it
                self._close_connection(conn)
            raise

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        book = self._sp_book
        close = super()._close_connection
        if book is None:
            close(connection, terminate=terminate)
        elif book.inherited(connection):
            log.debug("not closing a connection inherited across fork: the parent's (I7)")
        elif not book.owns(connection):
            close(connection, terminate=terminate)  # opened before attach(): no lease
        elif collecting():  # a reset that failed in a collection's checkin: see _do_return_conn
            put_off(functools.partial(self._close_connection, connection, terminate=terminate), "close")
        else:
            book.close(connection, lambda: close(connection, terminate=terminate))

    # ------------------------------------------------------------------ checkout / checkin

    def _do_get(self) -> ConnectionPoolEntry:
        if self._sp_pid != current_pid():
            self._sp_after_fork()
        why = None if self._sp_book is None else self._sp_book.closed_reason()
        if why is not None:
            # release_process() or end-session closed the pooled connections but
            # QueuePool keeps their records: without pool_pre_ping one was handed out closed.
            raise PoolClosed(why)
        record = super()._do_get()
        # Out of the queue, and nobody else's: whatever cuts this checkout short
        # (a failed lease wait, a signal handler's exception anywhere, also at the
        # entry of the put-back itself) puts it back, and the live one taken in its
        # place; else its slot was lost for good (pool_size 1: every later checkout
        # timed out; a live one's connection open, leased, until the exit).
        back: list[Any] = [record]
        live: list[Any] = [None]  # the live one taken in its place, put there as it is taken
        try:
            if record.dbapi_connection is None and self._sp_leased():
                # An empty slot (its connection was given back): it reconnects in
                # get_connection() right after this, under a lease taken here, or
                # gives way to a live connection a peer checks in meanwhile.
                got = self._sp_lease_first(record, live)
                if got is not None:
                    self._sp_put_back_empty(record, back)
                    return got
            return record
        except BaseException:
            back += live  # no call: cut short here too, both still go back
            try:
                self._sp_put_back_empty(record, back)
            except BaseException:
                self._sp_put_back_empty(record, back)  # cut short in turn: what did not go back
                raise
            raise

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if collecting():
            # A connection dropped unclosed, checked in by a collection (a cycle:
            # its autobegun transaction) in whatever thread it interrupted: one
            # holding the book's condition in a lease wait, whose offer() this
            # checkin waited on for good, or its lock (the client's thread).
            put_off(functools.partial(self._do_return_conn, record), "checkin")
            return
        pid = current_pid()
        if self._sp_pid != pid:
            self._sp_after_fork()
        if getattr(record, "_sp_pid", pid) != pid:
            return  # the parent's, checked in by the child: neither pooled nor closed (I7)
        if record is getattr(self._sp_local, "lease_record", None):
            # Its checkout failed before the connect took the lease _do_get left
            # for it (a signal handler's exception in SQLAlchemy's checkout, which
            # checks the record in): nothing opens under it now.
            self._sp_unused_lease()
        conn = record.dbapi_connection
        book = self._sp_book
        if book is None:
            super()._do_return_conn(record)
        elif self._sp_retired:
            # 'close' event, then close, confirm, release. The slot stays, empty: a
            # thread waiting on this replaced pool's queue (it was exhausted at
            # engine.dispose()) takes it and reconnects, as QueuePool would hand
            # it this connection, rather than wait out its pool_timeout.
            try:
                self._sp_close(record)
            finally:
                self._sp_put_back_empty(record)
        elif conn is not None and book.owes_back(conn):
            # The coordinator wants a lease back: this connection pays; its
            # slot stays, empty, and reconnects (under a new lease) when needed.
            book.count("leases_reclaimed")
            try:
                self._sp_close(record)
            finally:
                self._sp_put_back_empty(record)
        elif conn is None or not book.offer(record, owner=self,  # to a thread waiting for a lease first
                                            back=lambda: self._do_return_conn(record)):
            super()._do_return_conn(record)
            book.notify_returned()

    # ------------------------------------------------------------------ dispose / recreate / fork

    def dispose(self) -> None:
        if self._sp_pid != current_pid():
            self._sp_after_fork()  # only the child's own connections are closed
        super().dispose()

    def recreate(self) -> LeasedQueuePool:
        new = super().recreate()
        assert isinstance(new, LeasedQueuePool)
        new._sp_book = self._sp_book
        new._sp_lease_timeout = self._sp_lease_timeout
        if self._sp_book is not None:
            self._sp_book.bind(new._sp_idle, new._sp_reclaim)
        self._sp_retire()
        return new

    def _sp_retire(self) -> None:
        """This pool is being replaced (``engine.dispose()``). In its own
        process, close what is idle now and what is checked in later (nobody
        else would, and their leases would never come back). After a fork,
        touch nothing: it all belongs to the parent."""
        self._sp_retired = True
        if self._sp_pid != current_pid():
            return
        while True:
            try:
                record = self._pool.get(False)
            except sqla_queue.Empty:
                return
            record.close()

    def _sp_after_fork(self) -> None:
        # Start empty, like a new pool: the inherited records and their DBAPI
        # connections are the parent's, never handed out here nor closed.
        # Serialized: a second thread of the child that noticed the fork too
        # must not reset away the checkouts of the first.
        with FORK_LOCK[0]:
            if self._sp_pid == current_pid():
                return
            self._pool = self._queue_class(self._pool.maxsize, use_lifo=self._pool.use_lifo)
            self._overflow = 0 - self._pool.maxsize
            self._overflow_lock = threading.Lock()
            self._sp_pid = current_pid()

    # ------------------------------------------------------------------ reclaim

    def _sp_idle(self) -> Iterable[Any]:
        if self._sp_pid != current_pid():
            return []
        queue = self._pool
        with queue.mutex:  # type: ignore[attr-defined]
            return [r.dbapi_connection for r in queue.queue  # type: ignore[attr-defined]
                    if r.dbapi_connection is not None]

    def _sp_reclaim(self, count: int) -> int:
        """Close up to ``count`` idle connections, the coldest first; their
        slots stay, empty, handed out after the live ones."""
        book = self._sp_book
        if book is None or self._sp_retired or self._sp_pid != current_pid():
            return 0
        queue: Any = self._pool
        picked: list[ConnectionPoolEntry] = []
        with queue.mutex:
            # LIFO hands out from the right: the left is coldest. FIFO from the left.
            order = list(queue.queue) if queue.use_lifo else list(reversed(queue.queue))
            order.sort(key=lambda r: not book.revoked(r.dbapi_connection))  # revoked ones first
            for record in order:
                if len(picked) >= count:
                    break
                # pays_back claims an owed lease: no other pool of the process pays it too
                if record.dbapi_connection is not None and book.pays_back(record.dbapi_connection):
                    picked.append(record)
            for record in picked:
                queue.queue.remove(record)
        for record in picked:
            # One close that raises (a user's close event listener) must not
            # leave the rest picked and never closed: their leases claimed as
            # given back, the process would give back less from then on.
            try:
                # Counted before the close releases the lease: the waiter elsewhere,
                # served then, may read our stats at once.
                book.count("leases_reclaimed")
                self._sp_close(record)
            except Exception:  # noqa: BLE001 - logged; the others still go
                log.exception("sharedpool: closing an idle connection given back on reclaim failed")
            finally:
                self._sp_put_back_empty(record)
        return len(picked)


@event.listens_for(LeasedQueuePool, "detach")
def _sp_detached(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """``detach()``: the DBAPI connection is its user's now, to close (its lease
    back then), or to drop: the book stops keeping it alive, so that it is
    collected as in plain SQLAlchemy, and its lease comes back then."""
    book = getattr(record, "_sp_book", None)
    if book is not None:
        book.detached(dbapi_connection)


@contextmanager
def _lease_timeout(book: LeaseBook, timeout: float) -> Iterator[None]:
    """sharedpool's PoolTimeout for a lease, raised as SQLAlchemy's pool TimeoutError too."""
    try:
        yield
    except PoolTimeout as e:
        if isinstance(e, LeaseTimeout):
            raise
        within = "the resource's acquire_timeout" if timeout is None else f"{timeout:g}s"
        raise LeaseTimeout(f"no {book.resource!r} lease within {within}: {e}{blocked_loop_note()}") from e
    except TooManyWaiters as e:  # an exhausted pool to whoever catches SQLAlchemy's error
        if isinstance(e, LeaseRefused):
            raise
        raise LeaseRefused(e.reason, f"no {book.resource!r} lease: {e.detail}") from e
    except ResourceUnavailable as e:
        # Failing (connects fail everywhere), draining: what SQLAlchemy raises for
        # a database that is down is an OperationalError, with the cause as .orig.
        raise exc.OperationalError(None, None, e) from e


def attach(engine: Engine, resource: str, coordinator: str | None = None, *,
           lease_timeout: float | None = None, confirm_timeout: float = 2.0) -> Engine:
    """Make an existing engine's QueuePool lease its connections, in place.

    Replaces ``engine.pool`` with a :class:`LeasedQueuePool` of the same
    settings and events (as ``engine.dispose()`` does); the idle connections
    the old pool had (unleased) are closed. Attach before the engine is used:
    it refuses while connections are checked out. Returns ``engine``."""
    if not isinstance(getattr(engine, "pool", None), Pool):  # an AsyncEngine is refused below
        raise ConfigError("engine", f"must be a SQLAlchemy Engine, got {engine!r}")
    pool = engine.pool
    if isinstance(pool, LeasedQueuePool):
        raise ConfigError("engine", "already leases its connections (attach() was called before)")
    if getattr(pool, "_is_asyncio", False):  # an AsyncAdaptedQueuePool, or an AsyncEngine's
        raise ConfigError("engine", "is an asyncio engine (create_async_engine, an async driver): "
                                    "only engines with a synchronous driver (postgresql+psycopg://) "
                                    f"lease their connections; {NO_ASYNCIO}")
    if type(pool) is not QueuePool:
        raise ConfigError("engine", f"needs a QueuePool (the default for server databases), "
                                    f"has {type(pool).__name__}")
    if pool.checkedout():
        raise ConfigError("engine", f"has {pool.checkedout()} connection(s) checked out; attach "
                                    "before the engine is used")
    book = LeaseBook(resource, coordinator, confirm_timeout=confirm_timeout)
    # The same arguments QueuePool.recreate() passes.
    engine.pool = LeasedQueuePool(
        pool._creator,
        pool_size=pool._pool.maxsize,
        max_overflow=pool._max_overflow,
        pre_ping=pool._pre_ping,
        use_lifo=pool._pool.use_lifo,
        timeout=pool._timeout,
        recycle=pool._recycle,
        echo=pool.echo,
        logging_name=pool._orig_logging_name,
        reset_on_return=pool._reset_on_return,
        _dispatch=pool.dispatch,
        dialect=pool._dialect,
        book=book,
        lease_timeout=lease_timeout,
    )
    pool.dispose()
    return engine


def create_engine(url: Any, *, resource: str, coordinator: str | None = None,
                  lease_timeout: float | None = None, confirm_timeout: float = 2.0,
                  **kwargs: Any) -> Engine:
    """:func:`sqlalchemy.create_engine`, whose pool leases every connection of ``resource``.

    ``coordinator``: the coordinator's socket path (None: ``$SHAREDPOOL_SOCKET``;
    with neither, nothing is leased). ``lease_timeout``: how long a connect
    waits for a lease (None: ``pool_timeout``); past it, :class:`LeaseTimeout`.
    Every other argument is SQLAlchemy's (``pool_size``, ``max_overflow``,
    ``pool_pre_ping``, ``pool_recycle``, ``pool_timeout``, ``pool_use_lifo``...)."""
    poolclass = kwargs.get("poolclass")
    if poolclass is not None and poolclass is not QueuePool:
        raise ConfigError("poolclass", f"only QueuePool can be leased, got {poolclass!r}")
    if "pool" in kwargs:
        raise ConfigError("pool", "pass a URL and pool arguments, or use attach() on your engine")
    check_sync_callable("creator", kwargs.get("creator"))  # else an AttributeError from the dialect
    # By kind only (0 and -1 mean "no limit" / "never" to QueuePool, which takes a float
    # too): a string passed create_engine() and failed each connect with a TypeError from inside QueuePool.
    for name in ("pool_size", "max_overflow", "pool_recycle"):
        if name in kwargs:
            check_host_number(name, kwargs[name])
    return attach(sqlalchemy.create_engine(url, **kwargs), resource, coordinator,
                  lease_timeout=lease_timeout, confirm_timeout=confirm_timeout)
