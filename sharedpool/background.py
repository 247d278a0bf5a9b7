"""The client's background thread: what it sleeps on, what it does when woken,
and the coalesced reports it sends.

One thread per :class:`~sharedpool.client.Client`. It sleeps in ``poll()`` on
the session socket and the client's wake-up pair, never in a polling loop: it
picks up what arrives unasked (reclaims, admin pushes, a dead coordinator)
while no caller is reading, runs timers and handler jobs, sends reports, and
reconnects with backoff. The thread holds the client weakly: a client dropped
without ``close()`` is collected, its finalizer closes its sockets (the
session ends), and its thread, woken by the wake pair's close, ends.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import handshake, outbox, receiving
from . import protocol as p
from .readable import wait_readable

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("sharedpool.client")

#: The background thread wakes at least this often (a safety net; it is woken
#: by data, timers and the wake-up pipe, never by polling).
IDLE_WAKE = 1.0
#: While a caller reads the socket the background thread leaves it alone and
#: looks again after this long, doubling while the read goes on. A leader
#: that finishes wakes it only after such a long read: waking it after every
#: lease round trip would cost each round trip two context switches.
PARK_RECHECK = 0.005
#: Reports are coalesced and sent at most this often.
REPORT_INTERVAL = 0.2
#: Reconnect backoff bounds.
BACKOFF_MIN, BACKOFF_MAX = 0.02, 1.0


def run(ref: weakref.ref[Client]) -> None:
    client = ref()
    if client is None:
        return
    # The wake pair is this thread's to close on its way out, also when the
    # client is collected before it looks again (dropped right after a close()
    # from another thread); one never closed has it closed by its finalizer too.
    pair = (client._wake_r, client._wake_w)
    while True:
        client = ref()
        if client is None:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.close()
            return
        if client._pid != os.getpid():
            return
        if client._closed:
            client._close_wake()
            return
        wake = client._wake_r
        sock, timeout = plan_sleep(client)
        # Frames the coordinator did not take at once: sent when it can take them
        # (also while a leader reads: its reply may wait on one of them).
        out = outbox.waiting(client)
        del client  # the client may be collected while we sleep
        # By fd number, taken now: a socket another thread closes during the
        # wait is then a dead number, not fileno() -1 looked up again.
        watched = [wake.fileno()] if sock is None else [wake.fileno(), sock.fileno()]
        writable = [] if out is None else [out.fileno()]
        del out
        if timeout > 0:
            with contextlib.suppress(OSError, ValueError):  # a socket closed under us: look again
                wait_readable(watched, timeout, writable)
        client = ref()
        if client is None:
            continue  # the wake pair closed at the top
        try:
            tick(client)
        except Exception:  # noqa: BLE001
            log.exception("sharedpool client background tick failed")
        del client


def plan_sleep(client: Client) -> tuple[socket.socket | None, float]:
    """What the background thread waits on next: the session socket unless
    a leader reads it (the leader dispatches what arrives), and for how long."""
    now = time.monotonic()
    due = now + IDLE_WAKE
    with client._cond:
        if client._jobs:
            return None, 0.0
        while client._timers and client._timers[0][2].cancelled:  # no wake-up for a cancelled one
            heapq.heappop(client._timers)
        if client._timers:
            due = min(due, client._timers[0][0])
        sock = client._sock
        if sock is None:
            if client._wants_session():
                due = min(due, max(client._next_attempt, now + BACKOFF_MIN / 2))
        elif (client._state_providers or client._failures or client._successes
              or client._costs != client._sent_costs):
            due = min(due, client._reported_at + REPORT_INTERVAL)
        if sock is not None and client._read_lock.locked():
            # A leader reads and dispatches what arrives: leave the socket
            # to it, and look again later (or when _done_reading wakes us).
            if client._parked:
                client._park_wait = min(client._park_wait * 2, IDLE_WAKE)
            else:
                client._parked, client._parked_since, client._park_wait = True, now, PARK_RECHECK
            due, sock = min(due, now + client._park_wait), None
        else:
            client._parked = False
    out_due = outbox.deadline(client, handshake.SEND_TIMEOUT)
    if out_due is not None:
        due = min(due, out_due)
    return sock, max(0.0, due - now)


def tick(client: Client) -> None:
    with contextlib.suppress(OSError):  # drained (BlockingIOError) or closed
        while client._wake_r.recv(4096):
            pass
    # Cleared only after the drain: cleared before it, a _notify() in
    # between had its byte drained here yet left _woken set, and every
    # later _notify() was swallowed until the next IDLE_WAKE.
    client._woken = False
    if client._handler_changes:  # a collected pool's handlers must not keep the session wanted
        client._change_handlers()
    sock = client._sock
    if sock is None:
        if client._wants_session():
            handshake.try_connect(client, None)
    else:
        outbox.flush(client, handshake.SEND_TIMEOUT)
    sock = client._sock
    if sock is not None and client._read_lock.acquire(blocking=False):
        try:
            receiving.read_available(client, sock, block=False)
        finally:
            client._read_lock.release()
            client._done_reading()
    now = time.monotonic()
    with client._cond:
        jobs, client._jobs = client._jobs, []
        while client._timers and client._timers[0][0] <= now:
            jobs.append(heapq.heappop(client._timers)[2])
    for job in jobs:
        try:
            job()
        except Exception:  # noqa: BLE001 - a handler's bug must not kill the thread
            log.exception("sharedpool background job failed")
    send_report(client)

def send_report(client: Client) -> None:
    # One at a time: report_now() runs on a pool's thread, and a report
    # built earlier but sent later would undo a newer one's backend pids.
    with client._report_lock:
        _report_locked(client)

def _report_locked(client: Client) -> None:
    now = time.monotonic()
    if client._sock is None or now - client._reported_at < REPORT_INTERVAL:
        return
    client._reported_at = now
    states: list[list[Any]] = []
    for provider in list(client._state_providers):
        try:
            states.extend(provider())
        except Exception:  # noqa: BLE001
            log.exception("state provider failed")
    with client._cond:
        failures, client._failures = client._failures, {}
        ok, client._successes = sorted(client._successes), set()
    costs = dict(client._costs)
    if not failures and not ok and states == client._last_report and costs == client._sent_costs:
        return  # nothing new: reports are coalesced, not periodic
    client._last_report, client._sent_costs = states, costs
    report = p.Report(states, failures, ok, costs)
    client._send_quiet(report, data=p.encode_report(report))
