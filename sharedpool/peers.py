"""What the coordinator can tell about a session's peer process from outside
it: who it is (SO_PEERCRED, SO_PEERGROUPS), whether it still runs, and
whether it closed its socket outright or said goodbye."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from typing import Any

import psutil

#: struct ucred: a signed pid_t, then unsigned uid_t and gid_t (a uid of 2**31 or
#: more, as user namespaces hand out, must not read as negative and never match)
_PEERCRED = struct.Struct("iII")


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix-socket peer, from SO_PEERCRED."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


#: Linux's SO_PEERGROUPS (4.13+): the peer's supplementary groups at connect time.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Linux's most supplementary groups a process can have.
_NGROUPS_MAX = 65536


def peer_groups(sock: Any) -> tuple[int, ...]:
    """The supplementary gids of a Unix-socket peer (() where unknown)."""
    try:
        # Python caps the buffer at 1024 bytes: 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            return ()
        # More groups than that: read as () before, a peer allowed by one of
        # them was refused. libc's getsockopt() takes a buffer of any size.
        raw = _peer_groups_unbounded(sock.fileno())
    except AttributeError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _peer_groups_unbounded(fd: int) -> bytes:
    size = ctypes.c_uint32(_NGROUPS_MAX * 4)
    buf = ctypes.create_string_buffer(size.value)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, buf, ctypes.byref(size)) != 0:
        return b""
    return buf.raw[: size.value]


def holder_alive(pid: int, before: float) -> bool:
    """Whether ``pid`` is still the process that held leases: running (stopped
    counts; a zombie or one exiting does not), and made before ``before``
    (wall clock: when they were last known its: this coordinator's start, or
    the end of its session), so not a later process given the same pid."""
    try:
        proc = psutil.Process(pid)
        return (proc.status() != psutil.STATUS_ZOMBIE and not _exiting(pid)
                and proc.create_time() <= before)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # not ours to look at (AccessDenied): it may be the holder
        return not pid_gone(pid)


#: The kernel's task flag set as a process starts to exit (include/linux/sched.h).
_PF_EXITING = 0x4


def _exiting(pid: int) -> bool:
    """Whether ``pid`` is on its way out (SIGKILLed, exiting): its sockets close
    before it becomes a zombie, so at its session's end it still reads as
    running (measured: 2 in 5 SIGKILLs); the kernel's PF_EXITING says so from
    the start of its exit."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return bool(int(data[data.rindex(b")") + 2:].split()[6]) & _PF_EXITING)
    except (OSError, ValueError, IndexError):  # gone, or not Linux's /proc: psutil's answer stands
        return False


def pid_gone(pid: int) -> bool:
    """True only if no process has ``pid`` (a pid in use, or one we may not
    signal, may still be the process: not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def peer_closed(sock: Any) -> bool:
    """Whether the peer of a session that reached its end of file closed its
    socket outright, not shut it for writing. A client's close() says goodbye
    by shutting it for writing (goodbye.py); a session it drops to reconnect
    (the coordinator not reading: outbox.py; a hello not answered within
    connect_timeout: handshake.py), or one an exec or exit closes, is closed
    outright. Linux sets POLLHUP on our end only then (both directions shut)."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd any more: not known
        return False
