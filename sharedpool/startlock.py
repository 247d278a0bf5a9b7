"""The lock two coordinators starting on one socket path take while they probe,
unlink and bind: only one of them binds."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator

from .errors import CoordinatorRunning

log = logging.getLogger("sharedpool.coordinator")


#: How long a start waits for another start on the same path. A start holds
#: the lock for milliseconds (a probe of at most 1 s, an unlink, a bind): one
#: held this long is stopped or stuck, and waiting on it for ever hung `serve`
#: with no word.
WAIT = 30.0


@contextlib.contextmanager
def start_lock(socket_path: str, wait: float | None = None) -> Iterator[None]:
    """Held while a start takes ``socket_path`` over.

    A 0600 file of ours beside the socket, removed once the start is done.
    The directory itself was locked before: any user who may read it (a
    member of the socket's group, anyone for a 0755 one) could open it and
    hold that lock, and every start on it hung until they let go. A starter
    that waited on a file the one before it removed locks the new one.
    :class:`CoordinatorRunning` if another start holds it for ``wait``
    seconds (default :data:`WAIT`)."""
    wait = WAIT if wait is None else wait
    path = os.path.join(os.path.dirname(os.path.abspath(socket_path)),
                        f".{os.path.basename(socket_path)}.lock")
    deadline = time.monotonic() + wait
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while not _try_lock(fd):
                if not told:
                    told = True
                    log.warning("waiting for another start on %s (%s)", socket_path, _holder(fd))
                if time.monotonic() >= deadline:
                    raise CoordinatorRunning(
                        f"another coordinator has been starting on {socket_path} for {wait:g}s "
                        f"({_holder(fd)}, lock file {path}); is it stopped or stuck?")
                time.sleep(0.02)
            held = os.fstat(fd)
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        # Who holds it, for a start that finds it taken.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the lock goes: a starter waiting on it then retries
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    """Who holds the lock, as far as the holder wrote it down."""
    try:
        pid = int(os.pread(fd, 16, 0).decode("ascii"))
    except (OSError, ValueError, UnicodeDecodeError):
        return "held by a process that did not say which"
    return f"held by pid {pid}"
