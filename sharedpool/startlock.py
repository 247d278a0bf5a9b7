"""The lock two coordinators starting on one socket path take while they probe,
unlink and bind: only one of them binds."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def start_lock(socket_path: str) -> Iterator[None]:
    """Held while a start takes ``socket_path`` over.

    A 0600 file of ours beside the socket, removed once the start is done.
    The directory itself was locked before: any user who may read it (a
    member of the socket's group, anyone for a 0755 one) could open it and
    hold that lock, and every start on it hung until they let go. A starter
    that waited on a file the one before it removed locks the new one."""
    path = os.path.join(os.path.dirname(os.path.abspath(socket_path)),
                        f".{os.path.basename(socket_path)}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
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
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the lock goes: a starter waiting on it then retries
        os.close(fd)
