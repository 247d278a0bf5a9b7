"""Close a connection and wait until the server has really let go of it (I1).

``psycopg``'s ``close()`` sends Terminate and returns at once; the PostgreSQL
backend is still running its exit callbacks and is still counted in
``pg_stat_activity`` (and holds its PGPROC slot). A process that releases its
lease right after ``close()`` lets another process connect while PostgreSQL
sees ``max_size + 1`` connections.

PostgreSQL leaves its socket open on purpose until the backend process dies
(``socket_close()`` in ``pqcomm.c``: "This allows clients to perform a
synchronous close"): the exit order is ``shmem_exit`` (removes the backend
from ``pg_stat_activity``, frees the PGPROC) -> ``on_proc_exit`` callbacks ->
``exit()``, and only then does the kernel close the socket. So EOF on the
client's socket proves the backend is gone. We keep a ``dup()`` of the fd
across ``close()`` and wait for that EOF.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .readable import wait_readable

log = logging.getLogger(__name__)

_READ_CHUNK = 65536


def socket_fd(conn: object) -> int | None:
    """Return the OS socket fd behind ``conn``, or None if it has none (or is closed).

    Looks at ``conn.fileno()`` (psycopg, sockets) and then at ``conn._sock``
    (redis-py's ``Connection`` keeps its socket there, ``None`` when disconnected).
    """
    for obj in (conn, getattr(conn, "_sock", None)):
        fileno = getattr(obj, "fileno", None)
        if obj is None or not callable(fileno):
            continue
        try:
            fd = fileno()
        except Exception:  # psycopg raises OperationalError once the connection is closed
            continue
        if isinstance(fd, int) and fd >= 0:
            return fd
    return None


#: How long a close not confirmed in time is still watched in the background.
LATE_TIMEOUT = 60.0
#: After a busy connection's cancel, how long before it is cancelled once more.
RECANCEL_AFTER = 0.2
#: The least time a busy connection's cancel gets, whatever is left of its close's
#: bound: a reachable server answers it in a round trip or two.
CANCEL_MIN = 1.0
#: How long it is watched in the caller's thread instead when no thread can be started.
NO_THREAD_WAIT = 5.0


class NotClosable(TypeError):
    """The object has neither ``close()`` nor ``disconnect()``: nothing was done."""


def keep_socket(conn: object) -> socket.socket | None:
    """A dup of ``conn``'s socket, taken when the connection is made and handed
    to :func:`close_and_confirm` as ``kept``: a user who closes the connection
    (``conn.close()`` inside the checkout) closes its fd, and without a dup
    nothing would be left to see the server let go by. None when ``conn`` has
    no socket, or no fd is to be had (the close then dups, as without one)."""
    fd = socket_fd(conn)
    if fd is None:
        return None
    try:
        dupfd = os.dup(fd)
    except OSError:
        return None
    try:
        return _socket_on(dupfd)  # owns dupfd
    except OSError:
        os.close(dupfd)  # not a socket
        return None


def _socket_on(fd: int, cls: type[socket.socket] | None = None) -> socket.socket:
    """A ``cls`` object on ``fd`` that leaves O_NONBLOCK as it was: it lives in
    the open file description the connection shares with us, and socket() sets
    it under socket.setdefaulttimeout(), which broke a blocking client's next
    read (EAGAIN: PyMySQL's "Lost connection"). We never call setblocking()."""
    blocking = os.get_blocking(fd)
    sock = (cls or socket.socket)(fileno=fd)  # looked up now: gevent may have patched it since
    if blocking and not os.get_blocking(fd):
        with contextlib.suppress(OSError):  # then as socket() left it: nothing more to do
            os.set_blocking(fd, True)
    return sock


def _same_socket(fd: int, sock: socket.socket) -> bool:
    try:
        a, b = os.fstat(fd), os.fstat(sock.fileno())
    except (OSError, ValueError):  # ValueError: sock already closed
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _watched(conn: object, kept: socket.socket | None) -> socket.socket | None:
    """The socket to see the server's EOF on: ``kept`` if the connection's own
    fd is gone (its user closed it) or is the same socket; else a fresh dup
    (a client that reconnected in place, redis-py's, has a new socket)."""
    if kept is not None:
        # Closed already when it was collected with its connection (the
        # finalizers of a garbage cycle all run: a pool dropped without close).
        if kept.fileno() >= 0:
            fd = socket_fd(conn)
            if fd is None or _same_socket(fd, kept):
                return kept
        kept.close()
    return _dup_socket(conn)


def close_and_confirm(conn: object, timeout: float, *,
                      on_late: Callable[[bool], object] | None = None,
                      kept: socket.socket | None = None, begun: list[bool | None] | None = None) -> bool:
    """Close ``conn``; return True once the server side is confirmed gone.

    Returns True when the server closed its end within ``timeout`` seconds, or
    when there is nothing to confirm (no socket, e.g. ``sqlite3``); False when
    the bound passed first (e.g. the backend is still busy with a query and has
    not read our Terminate yet). An exception from ``close()`` is logged and the
    confirmation still runs. Sync connections only; never call it on a
    connection inherited across ``fork()`` (I7): it shuts the socket down.

    A connection busy with a query is cancelled first (psycopg), so that its
    backend reads our Terminate now rather than when the query ends. With
    ``on_late``, a close not confirmed within ``timeout`` goes on being
    watched in a background thread (up to :data:`LATE_TIMEOUT`), which then
    calls ``on_late(confirmed)``: the caller keeps the lease until then. So
    does an exception that interrupts the close (a signal handler's: celery's
    soft time limit, Ctrl-C): our end is shut for writing, the watcher takes
    over, and the exception goes on. With ``on_late``, anything raised but
    :class:`NotClosable` means ``on_late`` has been or will be called.
    ``kept``: the connection's socket from :func:`keep_socket`; it is ours to
    close from here on, whatever happens. ``begun``: its first item (None
    before) is set to False as this begins, with no call before (from then on
    ``on_late`` is seen to, unless confirmed), then to what it returns: a
    caller cut short (a signal handler's exception) can tell where.
    """
    if begun is not None:
        begun[0] = False
    sock = kept
    handed = False  # to a watcher thread, which calls on_late
    close: Any = None
    close_after = False
    try:
        close = getattr(conn, "close", None)
        # redis-py's Connection has disconnect(), which does shutdown(SHUT_RDWR): after
        # that our dup would read EOF at once whatever the server does. So for it we
        # half-close and wait first, and disconnect afterwards.
        close_after = not callable(close)
        if close_after:
            close = getattr(conn, "disconnect", None)
        if not callable(close):
            close_after = False
            raise NotClosable(f"close_and_confirm: {type(conn).__name__} has no close() method")
        deadline = time.monotonic() + max(timeout, 0.0)
        sock = _watched(conn, kept)
        if isinstance(sock, _Borrowed):
            # No fd to spare for a dup: we watch the connection's own, which
            # must then stay open until the server end is seen closed.
            close_after = True
        again = _cancel_if_busy(conn, deadline)
        if not close_after:
            _call_close(close, conn)
        if sock is None:
            confirmed = True
        else:
            # Send our FIN too: if close() did not get a Terminate out (broken
            # connection, close() raised), the server still sees EOF and exits.
            # A dup shares the socket, so this also covers the original fd.
            with contextlib.suppress(OSError):  # already shut down or reset
                sock.shutdown(socket.SHUT_WR)
            if again is not None:
                # A cancel that reached the backend before it began the query
                # (just sent) cancels nothing: look once more after a moment.
                confirmed = _wait_eof(sock, min(deadline, time.monotonic() + RECANCEL_AFTER))
                if not confirmed and time.monotonic() < deadline:
                    # In a thread: a cancel connects to the server and may block
                    # (a server that does not answer); the wait stays bounded.
                    with contextlib.suppress(RuntimeError):  # no thread to be had: the wait goes on
                        threading.Thread(target=_best_effort, args=(again,), daemon=True,
                                         name="sharedpool-cancel").start()
                    confirmed = _wait_eof(sock, deadline)
            else:
                confirmed = _wait_eof(sock, deadline)
            if not confirmed and on_late is not None:
                # A disconnect() that shuts the socket down would fake the EOF:
                # the watcher calls it after the real one.
                after = (close, conn) if close_after else None
                close_after = False
                watched, sock, handed = sock, None, True  # the watcher owns the dup now
                start_watcher(watched, on_late, after)
        if close_after:
            if sock is not None:
                # Let go of the fd first: a signal's exception inside close(), once it
                # has closed the fd, must not leave us shutting down and watching a
                # number another thread may already have been given (at the fd limit,
                # the very next open gets it). Confirmed by now, or not waited for.
                sock.close()
                sock = None
            _call_close(close, conn)
        if begun is not None:
            begun[0] = confirmed
        if sock is not None:  # closed here, not in the finally: a signal's exception
            done, sock = sock, None  # after it must still see to on_late (below)
            done.close()
        return confirmed
    except NotClosable:
        raise  # nothing was closed: the caller's lease to give back
    except BaseException:
        # Cut short (a signal handler's exception): the lease must neither leak
        # nor go back before the server lets go.
        if on_late is not None and not handed:
            if sock is None or sock.fileno() < 0:  # closed: a kept socket _watched let go of
                on_late(True)  # no socket: nothing to confirm
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                watched, sock = sock, None
                start_watcher(watched, on_late, (close, conn) if close_after else None)
        raise
    finally:
        if sock is not None:
            sock.close()  # the dup must never leak, whatever happened above


def close_in_background(conn: object, kept: socket.socket | None, on_late: Callable[[bool], object],
                        timeout: float) -> None:
    """A close cut short before :func:`close_and_confirm` began (a signal
    handler's exception at its first instruction): closed, confirmed and
    ``on_late`` called in a thread (here, if none is to be had)."""
    from .dropped import in_a_thread  # dropped imports this module

    def run() -> None:
        try:
            if close_and_confirm(conn, timeout, on_late=on_late, kept=kept):
                on_late(True)
        except NotClosable:
            on_late(True)  # nothing to close: the lease must not leak

    in_a_thread("sharedpool-close", run)


def start_watcher(sock: socket.socket, on_late: Callable[[bool], object],
                   after: tuple[Callable[[], object], object] | None) -> None:
    """Watch in the background; with no thread to be had, here, for at most
    :data:`NO_THREAD_WAIT` (on_late must be called either way: the lease)."""
    thread = threading.Thread(target=_watch_late, args=(sock, on_late, after), daemon=True,
                              name="sharedpool-close-confirm")
    try:
        thread.start()
    except RuntimeError:  # "can't start new thread": it never ran
        _watch_late(sock, on_late, after, NO_THREAD_WAIT)


def _watch_late(sock: socket.socket, on_late: Callable[[bool], object],
                after: tuple[Callable[[], object], object] | None,
                limit: float = LATE_TIMEOUT) -> None:
    try:
        confirmed = _wait_eof(sock, time.monotonic() + limit)
    finally:
        sock.close()
        if after is not None:
            _call_close(*after)
    if not confirmed:
        log.warning("a closed connection's server end is still open after %.0fs more; "
                    "giving its lease back", limit)
    on_late(confirmed)


#: libpq's PQtransactionStatus values (psycopg 3 and psycopg2 alike).
ACTIVE, INTRANS, INERROR, UNKNOWN = 1, 2, 3, 4


def transaction_status(conn: object) -> int | None:
    """libpq's transaction status of ``conn`` (``conn.info.transaction_status``
    in psycopg 3 and psycopg2), None for a connection that has none."""
    status = getattr(getattr(conn, "info", None), "transaction_status", None)
    try:
        return None if status is None else int(status)
    except (TypeError, ValueError):
        return None


def _cancel_if_busy(conn: object, deadline: float) -> Callable[[], object] | None:
    """Cancel a query in flight (transaction status ACTIVE), so that its
    backend reads a Terminate sent next now rather than when the query ends.
    Anything else (no ``info``, not busy) is left alone. Returns how to cancel
    again once the connection is closed (psycopg 3's ``PGcancel``), or None.
    psycopg 3's ``cancel_safe`` waits until ``deadline`` (at least
    :data:`CANCEL_MIN`), not its own 30 s: a server that does not answer held
    the close, and a request cut short by a time limit, that long."""
    if transaction_status(conn) != ACTIVE:
        return None
    again = None
    get_cancel = getattr(getattr(conn, "pgconn", None), "get_cancel", None)
    if callable(get_cancel):
        try:
            again = get_cancel().cancel  # works without the connection: taken before the close
        except Exception:  # noqa: BLE001 - then only the one cancel below
            again = None
    safe = getattr(conn, "cancel_safe", None)
    if callable(safe):
        _best_effort(functools.partial(safe, timeout=max(deadline - time.monotonic(), CANCEL_MIN)))
    else:
        cancel = getattr(conn, "cancel", None)
        if callable(cancel):
            _best_effort(cancel)
    return again


def _best_effort(cancel: Callable[[], object]) -> None:
    try:
        cancel()
    except Exception:  # noqa: BLE001 - best effort: the close still follows
        log.debug("cancelling a busy connection before closing it failed", exc_info=True)


class _Borrowed(socket.socket):
    """A socket object on the connection's own fd: closing it lets go of the
    fd (the connection's ``close()`` closes it), never closes it."""

    def close(self) -> None:
        self.detach()

    # Dropped without close() (a signal's exception before a watcher took it):
    # socket's own finalizer would close the connection's fd behind its back.
    __del__ = close


def _dup_socket(conn: object) -> socket.socket | None:
    """A socket object owning a dup of ``conn``'s fd, so it outlives ``close()``;
    at the open-file limit, a :class:`_Borrowed` one on the fd itself."""
    fd = socket_fd(conn)
    if fd is None:
        return None
    try:
        dupfd = os.dup(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return None  # the fd is already invalid: nothing left to watch
        # EMFILE: no fd for a dup. "Nothing to watch" would confirm a close
        # the server has not seen (a busy backend runs on: over the cap).
        try:
            return _socket_on(fd, _Borrowed)
        except OSError:
            return None  # not a socket
    try:
        return _socket_on(dupfd)  # takes ownership of dupfd
    except OSError:
        os.close(dupfd)  # not a socket (e.g. a pipe): no EOF we can rely on
        return None


def _call_close(close: Callable[[], object], conn: object) -> None:
    """Call ``close()``; an error is logged, a coroutine (async connection) is refused."""
    try:
        result = close()
    except Exception:
        # The connection may be half-closed already; the EOF wait still tells
        # us whether the server let go, which is all the caller needs.
        log.debug("close() of %s raised; confirming anyway", type(conn).__name__, exc_info=True)
        return
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: avoid the "never awaited" warning
        raise TypeError("close_and_confirm needs a sync connection; close() returned an awaitable")


#: The longest single wait: poll() takes milliseconds in a C int (24.8 days) and
#: threading's waits stop at TIMEOUT_MAX; longer bounds are waited in slices.
WAIT_SLICE = 3600.0


def _wait_eof(sock: socket.socket, deadline: float) -> bool:
    """Drain ``sock`` until the peer closes it (True) or ``deadline`` passes (False)."""
    fd = sock.fileno()
    while True:
        remaining = deadline - time.monotonic()
        # poll() takes milliseconds in a C int (24.8 days at most): wait in slices.
        if not wait_readable([fd], min(max(remaining, 0.0), WAIT_SLICE)):
            if remaining > WAIT_SLICE:
                continue
            return False
        try:
            data = sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            data = b"\0"  # spurious wake-up: not EOF, poll again
        except ConnectionResetError:
            return True  # RST: the peer's socket is closed just the same
        except OSError as exc:
            # ETIMEDOUT, EHOSTUNREACH...: the path is dead, the server may not be.
            log.debug("close_and_confirm: recv failed (%s); not confirmed", exc)
            return False
        if not data:
            return True  # orderly EOF: the server process closed its end
        if remaining <= 0:
            return False  # bytes still arriving at the deadline
