"""What a checkout hands out: the connection wrapper, the context managers and
the decorator over a pool."""

from __future__ import annotations

import functools
import inspect
import operator
import time
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .closing import keep_socket
from .errors import ConfigError
from .protocol import wire_text

if TYPE_CHECKING:
    from .client import Lease
    from .pool import ConnectionPool

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class ConnectionWrapper(Generic[T]):
    """One open connection and its bookkeeping. Times are ``time.monotonic()``."""

    __slots__ = (
        "id", "conn", "created_at", "last_used", "in_use", "pool", "lease",
        "backend_pid", "checked_out_at", "site", "health_check_count", "warned", "checked_at",
        "txn", "kept", "checkin_of",
    )

    def __init__(self, conn: T, pool: ConnectionPool[T], lease: Lease | None) -> None:
        now = time.monotonic()
        self.id = uuid.uuid4().hex
        self.conn = conn
        self.created_at = now
        self.last_used = now
        self.in_use = False
        self.pool = pool
        self.lease = lease
        self.backend_pid = _backend_pid(conn)
        self.checked_out_at = 0.0
        self.site: str | None = None
        self.health_check_count = 0
        self.warned = False
        self.checked_at = now  # last validated (or connected): validation recency, not idleness
        #: reads libpq's transaction status at checkin (0: at rest), None for other connections
        self.txn = _txn_probe(conn)
        #: a dup of its socket: a close is confirmed even after its user closed it
        self.kept = keep_socket(conn)
        #: the checkout (its checked_out_at) whose checkin began last: see _Checkout.__del__
        self.checkin_of: float | None = None
        pool._left.track(self)  # closed if the pool is collected before a close takes it

    def __repr__(self) -> str:
        state = "in use" if self.in_use else "idle"
        lease = f" lease={self.lease.id}" if self.lease else ""
        age = time.monotonic() - self.created_at
        return f"<ConnectionWrapper {self.id[:8]} {state}{lease} age={age:.1f}s>"


def _backend_pid(conn: Any) -> int | None:
    info = getattr(conn, "info", None)  # psycopg 3
    pid = getattr(info, "backend_pid", None)
    if isinstance(pid, int):
        return pid
    getter = getattr(conn, "get_backend_pid", None)  # psycopg2
    if callable(getter):
        try:
            value = getter()
            return value if isinstance(value, int) else None
        except Exception:  # noqa: BLE001
            return None
    return None


_TXN_STATUS = operator.attrgetter("transaction_status")


def _txn_probe(conn: Any) -> Callable[[], int] | None:
    """A cheap reader of ``conn``'s transaction status, for every checkin:
    psycopg 3's ``pgconn.transaction_status`` (no ``conn.info`` object made),
    psycopg2's ``get_transaction_status()``; None for other connections."""
    pgconn = getattr(conn, "pgconn", None)
    if pgconn is not None and hasattr(pgconn, "transaction_status"):
        return functools.partial(_TXN_STATUS, pgconn)
    getter = getattr(conn, "get_transaction_status", None)
    return getter if callable(getter) else None


def _call_site() -> str:
    # Only _call_site itself is cut here: the pool's own frames (one or two,
    # by the path the checkout took) go with the filter below.
    stack = traceback.extract_stack(limit=12)[:-1]
    frames = [f for f in stack if "sharedpool" not in f.filename and "contextlib" not in f.filename]
    # Reported to the coordinator: a script path that is not UTF-8 must not make the report unsendable.
    return wire_text("".join(traceback.format_list(frames[-6:] or stack[-3:])))


class _Checkout(Generic[T]):
    # A plain class, not @contextmanager: this is on the checkout fast path.
    __slots__ = ("pool", "timeout", "wrapper", "out")

    def __init__(self, pool: ConnectionPool[T], timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout
        self.wrapper: ConnectionWrapper[T] | None = None

    def __enter__(self) -> T:
        wrapper = self.wrapper = self.pool.acquire(self.timeout)
        self.out = wrapper.checked_out_at
        return wrapper.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.wrapper is not None
        if exc_type is None:
            self.pool.release(self.wrapper)
        else:
            self.pool.release_after_error(self.wrapper)

    def __del__(self) -> None:
        # No checkin of this checkout ever began: a signal handler's exception
        # landed at the first instruction of __exit__ or of the release() it
        # calls, where no guard can be (or __enter__ was called by hand and
        # this dropped). Nobody can check the connection in: the pool's
        # maintenance closes it (it may be mid-query), and its lease goes.
        # A finalizer: one append, no lock taken.
        try:
            wrapper = self.wrapper  # set, then out, with nothing between
        except AttributeError:  # its __init__ cut short (at its first instruction)
            return
        if (wrapper is not None and wrapper.in_use
                and wrapper.checked_out_at == self.out != wrapper.checkin_of):
            self.pool._dropped.append((wrapper, self.out))

    async def __aenter__(self) -> T:  # `async with pool.connection()`: said what to do instead
        from .config import NO_ASYNCIO
        from .errors import PoolMisuse

        raise PoolMisuse(f"pool {self.pool.name!r}: connection() is a sync context manager "
                         f"(`with`, not `async with`): {NO_ASYNCIO}")

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        pass  # never entered


class PooledConnection(Generic[T]):
    """Context manager over a checked-out wrapper: ``with PooledConnection(pool, w) as conn``.
    Attribute access is passed through to the raw connection."""

    def __init__(self, pool: ConnectionPool[T], wrapper: ConnectionWrapper[T]) -> None:
        # Checked where it is written: else an AttributeError from __enter__ or __exit__.
        # ConfigError is imported with the module: an import here cost 4 us a checkout.
        if not callable(getattr(pool, "release", None)):
            raise ConfigError("pool", f"must be a ConnectionPool, got {pool!r}")
        if not isinstance(wrapper, ConnectionWrapper):
            raise ConfigError("wrapper", f"must be the ConnectionWrapper that pool.acquire() returned, "
                                         f"got {wrapper!r}")
        self.pool = pool
        self.wrapper = wrapper

    def __enter__(self) -> T:
        return self.wrapper.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.pool.release(self.wrapper)
        else:
            self.pool.release_after_error(self.wrapper)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapper.conn, name)

    def __repr__(self) -> str:
        return f"<PooledConnection {self.wrapper!r}>"


def pooled(pool: ConnectionPool[Any], timeout: float | None = None) -> Callable[[F], F]:
    """Decorator: call the function with a checked-out connection as its first argument."""
    from .config import NO_ASYNCIO
    from .status import valid_timeout

    # Checked where it is written, not at each call (for a pool, an AttributeError from inside).
    if not callable(getattr(pool, "connection", None)):
        raise ConfigError("pool", f"must be a ConnectionPool, got {pool!r}")
    if timeout is not None and not valid_timeout(timeout):
        raise ConfigError("timeout", f"must be a number of seconds >= 0 or None, got {timeout!r}")

    def decorator(func: F) -> F:
        if not callable(func):  # else a TypeError at each call, after a checkout
            raise ConfigError("func", f"must be a function, got {func!r}")
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            # Its body runs after the wrapper returned: on a connection checked in
            # already, shared with whoever checks it out next.
            raise ConfigError("func", f"{func!r} is async: the connection would be checked in "
                                      f"before its body runs: {NO_ASYNCIO}")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with pool.connection(timeout) as conn:
                return func(conn, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
