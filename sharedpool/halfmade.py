"""Connections a connect cut short left half made.

A signal handler's exception (celery's soft time limit, Ctrl-C) that lands in
a driver's connect once its socket exists leaves that socket, and the server
session behind it, open until the garbage collector frees the frames that hold
it. Nobody will use it, but it counts on the server: its lease must go back
only once the server has let go (I1), as after a close.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import closing
from .closing import socket_fd, start_watcher


def open_fds() -> frozenset[tuple[int, int, int]] | None:
    """What is open in this process now: (fd, device, inode) of each fd (None
    where fds cannot be listed). Inodes too: a number another thread frees
    meanwhile may be reused by a new socket."""
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            listed = [int(name) for name in os.listdir(where)]
        except (OSError, ValueError):
            continue
        # The listing's own fd is listed too, and closed by now.
        return frozenset(ident for fd in listed if (ident := _identity(fd)) is not None)
    return None


def _identity(fd: int) -> tuple[int, int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return fd, st.st_dev, st.st_ino


def half_made_sockets(exc: BaseException,
                      before: frozenset[tuple[int, int, int]] | None) -> list[int]:
    """The sockets a connect cut short by ``exc`` left open: held by the frames
    it unwound (or by generators they drove: psycopg's PGconn), and opened since
    ``before``. A signal handler's exception (celery's soft time limit, Ctrl-C)
    in the driver's connect leaves such a socket, and its server session, alive
    until the garbage collector frees it. Only those frames and generators are
    looked into: a socket a peer thread opened meanwhile is none of ours."""
    if before is None:  # no way to tell new sockets from old ones: touch none
        return []
    found: set[int] = set()
    seen: set[int] = set()

    def look(values: Iterable[Any], depth: int) -> None:
        for value in values:
            if id(value) in seen:
                continue
            seen.add(id(value))
            # One that raises when looked at (a proxy outside its context) is skipped:
            # an error here would replace the connect's own, and keep its lease.
            with contextlib.suppress(Exception):
                look_at(value, depth)

    def look_at(value: Any, depth: int) -> None:
        if _generator_like(value):
            if depth < 4:
                look(_generator_values(value), depth + 1)
            return
        if type(value) in (tuple, list) and depth < 4:  # a call's *args (logging's)
            look(list(value), depth + 1)
            return
        fd = socket_fd(value)
        if fd is None and _is_pgconn(value):
            fd = value.socket  # raises once the PGconn is closed: skipped by look()
        if isinstance(fd, int) and fd >= 0 and _identity(fd) not in before:
            found.add(fd)

    # And the exceptions it interrupted: a connect's result travels in a
    # StopIteration (psycopg's wait_conn) while a `with` block exits.
    chain: BaseException | None = exc
    for _ in range(5):
        if chain is None:
            break
        if isinstance(chain, StopIteration):
            look([chain.value], 0)
        tb = chain.__traceback__
        while tb is not None:
            look(list(tb.tb_frame.f_locals.values()), 0)
            tb = tb.tb_next
        chain = chain.__context__
    return sorted(found)


def _is_pgconn(value: object) -> bool:
    # libpq's PGconn (psycopg.pq, psycopg_binary, psycopg_c): its socket is an
    # int attribute. Only there is .socket read: a property of anything else
    # found in a frame is none of ours to call.
    kind = type(value)
    return kind.__name__ == "PGconn" and kind.__module__.split(".")[0].startswith("psycopg")


def _generator_like(value: object) -> bool:
    # Asked of the type: an object's own __getattr__ (a Mock says yes to
    # anything, a context-bound proxy raises) is not consulted.
    kind = type(value)
    return (hasattr(kind, "gi_frame") or hasattr(kind, "cr_frame")) and hasattr(kind, "send")


def _generator_values(gen: Any) -> list[Any]:
    """What a suspended generator holds: its locals, what it delegates to."""
    out: list[Any] = []
    frame = getattr(gen, "gi_frame", None) or getattr(gen, "cr_frame", None)
    if frame is not None:
        out.extend(frame.f_locals.values())
    inner = getattr(gen, "gi_yieldfrom", None) or getattr(gen, "cr_await", None)
    if inner is not None:
        out.append(inner)
    # A Cython generator (psycopg_binary's connect) keeps its locals in a scope
    # object its frame does not show; the garbage collector sees them.
    for ref in gc.get_referents(gen):
        if type(ref).__name__.startswith("__pyx_scope_struct"):
            out.extend(gc.get_referents(ref))
    return out


def let_go_of(fds: list[int], on_done: Callable[[bool], object]) -> None:
    """Half-made connections nobody will use: send our FIN on each socket
    (a dup: the owner's fd stays valid until it is collected), so that the
    server ends its session now, and call ``on_done(confirmed)`` once every
    server end is closed (from watcher threads; here if there is nothing to watch).
    At the open-file limit (no dup), a socket is watched on its own fd for
    :data:`FIN_WAIT` only, then counted closed after :data:`~sharedpool.closing.LATE_TIMEOUT`."""
    socks = []
    unwatched = 0
    for fd in fds:
        try:
            dup = os.dup(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF and _fin_only(fd) is False:  # at the open-file limit
                unwatched += 1
            continue
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)  # not a socket (a selector's epoll fd)
            continue
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        socks.append(sock)
    if not socks and not unwatched:
        on_done(True)
        return
    lock = threading.Lock()
    left, all_confirmed = len(socks) + unwatched, True

    def one(confirmed: bool) -> None:
        nonlocal left, all_confirmed
        with lock:
            left -= 1
            all_confirmed = all_confirmed and confirmed
            last = left == 0
        if last:
            on_done(all_confirmed)

    for sock in socks:
        start_watcher(sock, one, None)
    if unwatched:
        # Not seen closed within FIN_WAIT, and not to be watched on the number
        # itself (its owner's collection may free it any moment): given back
        # only as a watcher that timed out would.
        def give_up() -> None:
            for _ in range(unwatched):
                one(False)

        timer = threading.Timer(closing.LATE_TIMEOUT, give_up)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread to be had: as start_watcher, wait here
            time.sleep(closing.NO_THREAD_WAIT)
            give_up()


#: How long a half-made socket with no fd to spare for a dup is watched on its
#: own fd, which stays open only while the caller holds the connect's exception.
FIN_WAIT = 0.5


def _fin_only(fd: int) -> bool | None:
    """Our FIN on ``fd`` itself, and whether the server end is seen closed
    within :data:`FIN_WAIT` (None: not a socket)."""
    try:
        sock = closing._Borrowed(fileno=fd)
    except OSError:
        return None  # not a socket (a selector's epoll fd)
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        return closing._wait_eof(sock, time.monotonic() + FIN_WAIT)
    finally:
        sock.close()  # lets go of the fd, never closes it
