"""The asyncio shell around the ledger: sockets in, ledger calls, frames out.

Each accepted Unix-socket peer is one session. Bytes go through the pure
:mod:`protocol`; decisions come from the pure :mod:`ledger` as effects; this
module only moves bytes, keeps the timer for the ledger's next deadline, and
runs fence checks. A peer that breaks the protocol loses its session (its
leases are fenced like any dead session's); nobody else notices.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import time
from resource import RLIMIT_NOFILE, getrlimit
from typing import Any

from . import protocol as p
from . import restart
from .config import CoordinatorConfig, Resource
from .effects import AskReclaim, Denied, Effect, Granted, Notify, Problem, StartFence, StillHeld
from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from .ledger import Ledger
from .lograte import OncePer
from .peers import holder_alive, peer_closed, peer_credentials, peer_groups, pid_gone

log = logging.getLogger("sharedpool.coordinator")

#: The filters each kind of inspect takes.
_INSPECT_FILTERS: dict[str, frozenset[str]] = {
    "resources": frozenset({"names"}), "sessions": frozenset(), "leases": frozenset({"resource", "pid"}),
    "fenced": frozenset({"resource", "pid"}), "server": frozenset()}

#: Open files the coordinator keeps besides its sessions (its socket, monitor
#: connections, the marker, logs, metrics).
FD_RESERVE = 64
#: A reclaim is logged at info at most this often per resource (the rest at debug).
RECLAIM_INFO_EVERY = 60.0
#: A refused uid is logged at warning at most once in this many seconds (the
#: rest at debug, counted in its next warning): one line per refusal let a peer
#: the coordinator refuses fill its log by connecting in a loop, and the CLI's
#: probe made every refused command two lines.
REFUSED_LOG_EVERY = 60.0
#: A request refused without ending its session (a release of a lease not
#: held, a reply too large to send) is logged at warning at most once in this
#: many seconds per process and kind (the rest at debug, counted in its next
#: warning): one line per frame let a single peer write 20,000 lines (2.5 MB)
#: to the log in 0.4 s, its session untouched.
REQUEST_LOG_EVERY = 60.0
#: A fence that ran out its fence_timeout is logged this long after (the ledger lifts it first).
FENCE_LOG_AFTER = 0.1
#: Sessions not accepted for want of descriptors (asyncio's loop, no uvloop) are
#: logged at warning at most once in this many seconds, the rest at debug: asyncio
#: logged a traceback per failed accept(), thousands a second, more each second.
ACCEPT_FAILED_LOG_EVERY = 60.0


def _whose(eff: StartFence) -> str:
    """Whose leases a fence holds, for its log lines. Not ``terminate``: handed on
    by a restart, or kept for a live process whose session ended (the
    coordinator ended it, or the process dropped it), and not re-registered;
    the process may be serving on (it closed their connections meanwhile),
    and "dead" sent operators looking for a crashed worker."""
    if eff.ended is not None:
        return f"pid {eff.pid} (its session ended: {eff.ended}; not re-registered)"
    if eff.terminate:
        return f"dead pid {eff.pid}"
    return f"pid {eff.pid} (held before the restart, not re-registered)"


class SessionProtocol(asyncio.Protocol):
    """One client process's session."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn = p.Connection(p.SERVER, server.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.sid: int | None = None
        self.pid = 0
        self.uid: int | None = None
        self.gid: int | None = None
        self.out: list[bytes] = []
        #: bytes in ``out``
        self.out_size = 0
        self._hello_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self.closing = False
        self._lost = False
        #: resource -> leases this session was last asked to give back (for the log)
        self.asked: dict[str, int] = {}
        #: The CLI's: its connecting and ending logged at debug.
        self.quiet = False
        #: The error code this coordinator ended the session with (see :meth:`fail`).
        self.ended: str | None = None
        #: Its process closed the socket outright (no goodbye: dropped to reconnect).
        self.dropped = False

    def __repr__(self) -> str:
        return f"<SessionProtocol session={self.sid} pid={self.pid} uid={self.uid}>"

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        creds = peer_credentials(transport.get_extra_info("socket"))
        if creds is not None:
            self.pid, self.uid, self.gid = creds
        groups = peer_groups(transport.get_extra_info("socket")) if self.server.config.allowed_gids else ()
        if not self.server.peer_allowed(self.uid, self.gid, groups):
            self.server.log_refused(self.pid, self.uid, self.gid)
            self.fail("access_denied", f"uid {self.uid} / gid {self.gid} may not use this coordinator")
            return
        wait = self.server.config.hello_timeout
        self._hello_timer = asyncio.get_running_loop().call_later(
            wait, self._time_out, "hello_timeout", f"no hello within {wait:g}s"
        )

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.conn.receive_data(data)
        server = self.server
        completed = False
        handling = False
        try:
            # Not past a frame that ended the session (a fatal Problem): what
            # came behind it in this read is not carried out for it.
            while not self.closing and (msg := self.conn.next_event()) is not None:
                completed = handling = True
                server.handle(self, msg)
                handling = False
                if self.out_size > server.max_buffer:
                    # Sent only after the whole read, the replies to one read's
                    # frames were all built first: one read of 1,000 `inspect
                    # sessions` (45 KB) took the coordinator from 35 to 204 MB
                    # with 1,000 sessions listed. Out now; a peer that does not
                    # read them is ended here, as at any flush.
                    self.flush()
        except RemoteProtocolError as exc:
            log.warning("session %s pid=%s: bad frame: %s", self.sid, self.pid, exc)
            self.fail("protocol_error", str(exc))
        except MemoryError:
            if handling:  # the ledger may be half-changed: only a restart is safe
                server.fail_hard(f"out of memory handling a frame of session {self.sid}")
            else:  # decoding it: nothing changed yet; its frame goes with the session
                log.error("session %s pid=%s: out of memory decoding a frame; ending the session",
                          self.sid, self.pid)
                self.fail("out_of_memory", "the coordinator ran out of memory reading a frame")
        except Exception as exc:  # noqa: BLE001 - a frame we failed to handle: end this session only
            log.error("session %s pid=%s: frame not handled (%s: %s); ending the session",
                      self.sid, self.pid, type(exc).__name__, p.brief(str(exc), 200))
            self.fail("internal_error", f"the coordinator could not handle a frame: {type(exc).__name__}")
        server.flush()
        if completed and self._frame_timer is not None:
            # The frame the timer was for is complete: time the next one afresh.
            self._frame_timer.cancel()
            self._frame_timer = None
        # A half-sent frame must not hold the session open for ever.
        if self.conn.buffered and not self.closing:
            if self._frame_timer is None:
                wait = server.config.frame_timeout
                self._frame_timer = asyncio.get_running_loop().call_later(
                    wait, self._time_out, "frame_timeout", f"frame not completed within {wait:g}s")
        elif self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def eof_received(self) -> bool | None:
        # Looked at before our end closes: after that the fd is gone.
        if self.transport is not None:
            self.dropped = peer_closed(self.transport.get_extra_info("socket"))
        return None  # our end closes too

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            self.dropped = True  # a reply written to a peer that closed outright (a goodbye still reads)
        for timer in (self._hello_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self.closing = True
        self._lost = True
        self.server.session_ended(self)

    # -- output

    def send(self, msg: p.Message) -> None:
        if self.closing:
            return
        try:
            # Clients read frames of at most DEFAULT_MAX_FRAME (handshake.py): a
            # larger max_frame bounds what we accept, never what we send.
            limit = min(self.conn.max_frame, p.DEFAULT_MAX_FRAME)
            if msg.op == "welcome":
                p.encode(msg, limit)  # raises FrameTooLarge before the state changes
                frame = self.conn.send(msg)
            else:
                frame = p.encode(msg, limit)
        except LocalProtocolError as exc:
            self._unsendable(msg, exc)
            return
        self.out.append(frame)
        self.out_size += len(frame)
        self.server.dirty.add(self)

    def _unsendable(self, msg: p.Message, exc: LocalProtocolError) -> None:
        """A reply that cannot be framed (a listing of many leases, too large)
        fails its request, not the session: the peer asked nothing wrong, and a
        dropped session would only reconnect and ask again."""
        req = getattr(msg, "req", None)
        self.server.log_request(self.pid, "unsendable", "session %s pid=%s: cannot send %s: %s",
                                self.sid, self.pid, msg.op, exc)
        if req is None:  # no request to fail: the session cannot go on without this message
            self.fail("internal_error", f"the coordinator could not send {msg.op}: {exc}")
        elif isinstance(exc, FrameTooLarge):
            self.send(p.Error("reply_too_large", f"the reply is {exc.size} bytes, over the "
                              f"{exc.limit}-byte frame limit; ask for less, e.g. leases of one "
                              "resource or one process (sharedpool leases --resource NAME / --pid PID)",
                              req))
        else:
            self.send(p.Error("reply_unencodable", f"the reply cannot be encoded: {exc}", req))

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.closing:
            self.transport.write(b"".join(self.out))
            if self.transport.get_write_buffer_size() > self.server.max_buffer:
                self.out.clear()
                self.out_size = 0
                log.warning("session %s pid=%s does not read its replies; ending it", self.sid, self.pid)
                self.fail("not_reading", "the client stopped reading replies")
                return
        self.out.clear()
        self.out_size = 0

    def _time_out(self, code: str, message: str) -> None:
        if not self.closing:
            log.warning("session %s pid=%s: %s; ending it", self.sid, self.pid, message)
        self.fail(code, message)

    def fail(self, code: str, message: str) -> None:
        """Send a fatal error and end the session."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.ended = code
        self.server.dirty.discard(self)
        try:
            # What was already decided (a welcome, grants) goes out before the error.
            self.out.append(p.encode(p.Error(code, message, None, True)))
            self.transport.write(b"".join(self.out))
            self.out.clear()
            self.out_size = 0
        except Exception:  # noqa: BLE001 - the peer may be gone already
            pass
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            # close() waits for the unread output to drain, which a peer that
            # does not read never lets happen: the session (its leases, its fd)
            # would live on. Give it a moment to read the error, then cut it.
            asyncio.get_running_loop().call_later(
                1.0, lambda: None if self._lost else transport.abort())

    def hello_done(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None


class Server:
    """Owns the ledger, the sessions and the timer."""

    def __init__(self, config: CoordinatorConfig, hold: float = 0.0) -> None:
        self.config = config
        loop = asyncio.get_event_loop()
        self.loop = loop
        # Lease ids and fencing tokens only grow, across restarts too: start
        # from the wall clock in microseconds.
        self.ledger = Ledger(dict(config.resources), id_base=time.time_ns() // 1000,
                             hold_until=loop.time() + hold if hold > 0 else None)
        self._started = time.time()  # a process started since cannot hold a lease handed on
        #: pid -> when this coordinator ended its session while it ran (wall clock):
        #: a process started after that cannot hold the leases it kept
        self._ended_alive: dict[int, float] = {}
        self.sessions: dict[int, SessionProtocol] = {}
        self.dirty: set[SessionProtocol] = set()
        self.max_buffer = 2 * config.max_frame  # unread replies beyond this: the peer is not reading
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._fences: set[asyncio.Task[Any]] = set()
        self.monitors: Any = None  # fence.MonitorConnections, made by warm_monitors() or a fence
        self._fencing: dict[str, int] = {}  # monitor DSN -> fences checking on it now
        self.own_uid = os.getuid()
        #: a refused uid's warning, once a minute (a peer refused in a loop)
        self._refused = OncePer(REFUSED_LOG_EVERY, loop.time)
        self._accept_failed = OncePer(ACCEPT_FAILED_LOG_EVERY, loop.time)
        #: a refused request's warning, once a minute per process and kind
        self._requests_said = OncePer(REQUEST_LOG_EVERY, loop.time)
        self.started = time.time()
        self.on_change: list[Any] = []  # observers (metrics)
        #: Set once the stop has handed the leases on: sessions we close then are
        #: live processes keeping their connections, not dead ones to fence.
        self.stopping = False
        #: sessions beyond this many come near the open-files limit (said once)
        self.fd_sessions = getrlimit(RLIMIT_NOFILE)[0] - FD_RESERVE
        self._fd_warned = False
        #: Why the coordinator must stop (see :meth:`fail_hard`); the serve loop
        #: stops on it through ``on_fatal`` and exits with an error.
        self.fatal: str | None = None
        self.on_fatal: list[Any] = []
        #: a reclaim at info, once a minute per resource (routine under contention)
        self._reclaims_said = OncePer(RECLAIM_INFO_EVERY, loop.time)
        self._reschedule()  # a restart hold ends on its own timer

    def fail_hard(self, why: str) -> None:
        """Stop the coordinator: out of memory in the middle of a change, the
        ledger may have lost a lease, or granted one nobody was told of, and
        serving on would keep that for good. A restart rebuilds it from what
        the processes re-register (I4)."""
        if self.fatal is None:
            self.fatal = why
            log.critical("%s; stopping: a restarted coordinator rebuilds the ledger from the "
                         "leases the processes re-register", why)
        for stop in self.on_fatal:
            stop()

    # -- access

    def peer_allowed(self, uid: int | None, gid: int | None, groups: tuple[int, ...] = ()) -> bool:
        if uid is None:  # no SO_PEERCRED (not Linux): fall back on file permissions
            return True
        uids = self.config.allowed_uids or (self.own_uid,)
        gids = self.config.allowed_gids
        return uid in uids or (gid is not None and gid in gids) or any(g in gids for g in groups)

    def log_refused(self, pid: int, uid: int | None, gid: int | None) -> None:
        due = self._refused.due(uid)
        if due is None:
            log.debug("refused peer pid=%s uid=%s gid=%s", pid, uid, gid)
            return
        more = f" ({due[0]} more refused since the last such line)" if due[0] else ""
        log.warning("refused peer pid=%s uid=%s gid=%s: not in allowed uids/gids%s",
                    pid, uid, gid, more)

    def accept_failed(self, exc: OSError) -> None:
        """asyncio's accept loop (uvloop's turns the session away unlogged) could
        not accept a session: out of descriptors or memory. It tries again in a
        second; the session waits in the socket's queue meanwhile."""
        due = self._accept_failed.due(exc.errno)
        if due is None:
            log.debug("cannot accept a session: %s", exc)
            return
        more = f" ({due[0]} more since the last such line)" if due[0] else ""
        # The advice fits the cause: the process's limit, the host's file table, or memory.
        if exc.errno == errno.EMFILE:
            soft = getrlimit(RLIMIT_NOFILE)[0]
            advice = f"; raise the open-file limit ({soft}: ulimit -n, systemd LimitNOFILE=)"
        elif exc.errno == errno.ENFILE:
            advice = "; the host's file table is full (sysctl fs.file-max)"
        else:
            advice = ""
        log.warning("cannot accept sessions: %s; they wait, tried again every second%s%s",
                    exc.strerror or exc, advice, more)

    def log_request(self, pid: int | None, kind: str, fmt: str, *args: Any) -> None:
        """Log a request refused without ending its session: at warning once
        per :data:`REQUEST_LOG_EVERY` per ``(pid, kind)``, else at debug."""
        due = self._requests_said.due((pid, kind))
        if due is None:
            log.debug(fmt, *args)
            return
        more = f" ({due[0]} more in the last {due[1]:.0f}s, at debug)" if due[0] else ""
        log.warning(fmt + "%s", *args, more)

    def is_admin(self, uid: int | None) -> bool:
        return uid is None or uid in (self.config.admin_uids or (self.own_uid,))

    # -- dispatch

    def handle(self, session: SessionProtocol, msg: p.Message) -> None:
        now = self.loop.time()
        ledger = self.ledger
        if isinstance(msg, p.Hello):
            session.hello_done()
            new_sid, effects = ledger.open_session(
                session.pid or msg.pid, msg.name, now, uid=session.uid, held=msg.held,
                grace=self.config.restart_grace,
            )
            session.sid = new_sid
            self.sessions[new_sid] = session
            # The name as a short repr: a peer's megabyte of name (or its line
            # breaks) would otherwise go into the log at every reconnect.
            # A `sharedpool status` run every few seconds by a monitor: two lines a
            # run at info filled the log; admin verbs are logged on their own.
            session.quiet = msg.name == p.CLI_NAME and not msg.held
            log.log(logging.DEBUG if session.quiet else logging.INFO,
                    "session %s connected: pid=%s name=%s re-registered=%d",
                    new_sid, session.pid or msg.pid, p.brief(msg.name, 100), len(msg.held))
            if len(self.sessions) >= self.fd_sessions and not self._fd_warned:
                self._fd_warned = True  # past the limit, sessions are dropped unseen: say so now
                log.warning("%d sessions: near the open-files limit (%d); sessions past it are "
                            "closed as they connect; raise it (ulimit -n, systemd LimitNOFILE=)",
                            len(self.sessions), self.fd_sessions + FD_RESERVE)
            # Limits, and whether a drain is on: after a reconnect, a pool learns
            # here that a drain it was told of is over (a restarted coordinator),
            # or that one was ordered while it had no session.
            # Not a removed one: it grants nothing new, and is soon gone.
            state = {name: r.welcome_state() for name, r in ledger.resources.items() if not r.removed}
            # In the hello's version (an older worker's, in a rolling upgrade).
            session.send(p.Welcome(msg.version, new_sid, os.getpid(), state))
            self.apply(effects)
            return
        sid = session.sid
        assert sid is not None  # the protocol admits nothing before hello
        if isinstance(msg, p.Acquire):
            self.apply(ledger.acquire(sid, msg.req, msg.resource, now, msg.timeout, msg.site))
        elif isinstance(msg, p.Release):
            self.apply(ledger.release(sid, msg.lease, now))
        elif isinstance(msg, p.Cancel):
            self.apply(ledger.cancel(sid, msg.req, now))
        elif isinstance(msg, p.Retime):
            self.apply(ledger.retime(sid, msg.req, msg.timeout, now))
        elif isinstance(msg, p.Report):
            self.apply(ledger.report(sid, msg.states, now, msg.failures, msg.ok, msg.costs))
        elif isinstance(msg, p.Inspect):
            try:
                session.send(p.Reply(msg.req, self.inspect(msg.what, msg.filters, now)))
            except ValueError as exc:  # the one answer is the error: no empty reply after it
                session.send(p.Error("bad_request", str(exc), msg.req))
        elif isinstance(msg, p.Admin):
            self.admin(session, msg, now)
        else:  # the protocol only lets client ops through
            session.send(p.Error("unexpected_op", f"op {msg.op!r} is not handled", None))
        self._changed()

    def apply(self, effects: list[Effect]) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        for eff in effects:
            if isinstance(eff, Granted):
                lease = eff.lease
                if debug:
                    log.debug("grant pid=%s resource=%s lease=%s", self._pid(eff.session),
                              lease.resource, lease.id)
                self._send(eff.session, p.Grant(eff.req, lease.id, lease.resource, lease.token))
            elif isinstance(eff, Denied):
                if debug:
                    log.debug("deny pid=%s req=%s: %s (%s)", self._pid(eff.session), eff.req,
                              eff.reason, eff.message)
                self._send(eff.session, p.Deny(eff.req, eff.reason, eff.message))
            elif isinstance(eff, AskReclaim):
                # At info when a session is first asked, at most once a minute per
                # resource: slots moving is routine under contention (gunicorn
                # gthread at the cap: ~30 asks/s). Its count moving while it gives
                # back (2, 1, 2... within milliseconds) and "nothing owed now"
                # after every completed give-back, at debug.
                target = self.sessions.get(eff.session)
                before = 0 if target is None else target.asked.get(eff.resource, 0)
                if target is not None:
                    if eff.count:
                        target.asked[eff.resource] = eff.count
                    else:
                        target.asked.pop(eff.resource, None)
                due = self._reclaims_said.due(eff.resource) if eff.count > 0 and before == 0 else None
                if due is not None or debug:
                    log.log(logging.INFO if due is not None else logging.DEBUG,
                            "reclaim pid=%s resource=%s: give back %d lease(s), quantum %s%s",
                            self._pid(eff.session), eff.resource, eff.count,
                            "unknown" if eff.quantum is None else
                            "none (idle ones only)" if eff.quantum == math.inf else f"{eff.quantum:.3g}s",
                            f" ({due[0]} more in the last {due[1]:.0f}s, at debug)" if due and due[0] else "")
                self._send(eff.session, p.Reclaim(eff.resource, eff.count, eff.quantum))
            elif isinstance(eff, Notify):
                self._send(eff.session, p.Push(eff.verb, eff.resource, eff.args))
            elif isinstance(eff, Problem):
                if eff.fatal:  # as for a malformed frame: the session ends (I5)
                    log.warning("pid=%s: %s: %s; ending the session", self._pid(eff.session),
                                eff.code, eff.message)
                    if (ending := self.sessions.get(eff.session)) is not None:
                        ending.fail(eff.code, eff.message)
                else:
                    pid = self._pid(eff.session)
                    self.log_request(pid, eff.code, "pid=%s: %s: %s", pid, eff.code, eff.message)
                    self._send(eff.session, p.Error(eff.code, eff.message, eff.req))
            elif isinstance(eff, StartFence):
                self._start_fence(eff)
            elif isinstance(eff, StillHeld):
                log.warning("pid %s still runs but has not re-registered its %d lease(s) of %s since "
                            "the restart (stopped? blocked?): they stay counted until it does or exits",
                            eff.pid, eff.count, eff.resource)
        self._reschedule()

    def _pid(self, sid: int) -> int | None:
        session = self.sessions.get(sid)
        return session.pid if session is not None else None

    def _send(self, sid: int, msg: p.Message) -> None:
        session = self.sessions.get(sid)
        if session is not None:
            session.send(msg)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, set()
        for session in dirty:
            session.flush()

    def session_ended(self, session: SessionProtocol) -> None:
        self.dirty.discard(session)
        if session.sid is None or self.sessions.pop(session.sid, None) is None:
            return
        if self.stopping:
            return
        held = len(self.ledger.sessions[session.sid].leases)
        ended = grace = None
        if (held and session.pid > 0 and (session.ended is not None or session.dropped)
                and holder_alive(session.pid, time.time())):
            self._ended_alive[session.pid] = time.time()  # a process made after is another
            if session.ended is not None:
                # Ended by us, not by its process: that still has the connections.
                ended = session.ended
                log.warning("session %s ended (%s) while pid %s still runs: its %d lease(s) stay counted "
                            "until it reconnects and re-registers them, or exits", session.sid, ended,
                            session.pid, held)
            else:
                # Dropped by a process that lives on, no goodbye said: it is
                # reconnecting (a coordinator that did not read for seconds; a
                # hello it stopped waiting for, read only now). Fenced, its
                # backends would be terminated under it, or its slots given
                # to others while it still has their connections (I1).
                ended, grace = restart.DROPPED, self.config.restart_grace
                log.info("session %s %s while pid %s still runs: its %d lease(s) stay counted for up "
                         "to %gs for it to reconnect and re-register them", session.sid, ended,
                         session.pid, held, grace)
        else:
            log.log(logging.DEBUG if session.quiet and not held else logging.INFO,
                    "session %s ended: pid=%s, %d lease(s) returned", session.sid, session.pid, held)
        self.apply(self.ledger.close_session(session.sid, self.loop.time(), ended, grace))
        self.flush()
        self._changed()

    # -- time

    def _reschedule(self) -> None:
        at = self.ledger.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        # Looked at here, not by the ledger (no I/O there): a few /proc reads,
        # only while leases handed on by the previous coordinator are awaited.
        awaited = self.ledger.awaited_pids()
        for pid in self._ended_alive.keys() - awaited:
            del self._ended_alive[pid]
        running = {pid for pid in awaited
                   if holder_alive(pid, max(self._started, self._ended_alive.get(pid, 0.0)))}
        self.apply(self.ledger.tick(self.loop.time(), running))
        self.flush()
        self._changed()

    # -- fences

    def _start_fence(self, eff: StartFence) -> None:
        limits = self.ledger.resources[eff.resource].limits
        log.info("fence: %d lease(s) of %s from %s quarantined (backends %s)",
                 len(eff.leases), eff.resource, _whose(eff), list(eff.backend_pids))
        if limits.monitor_dsn is None:
            return  # the ledger's quarantine delay ends the fence
        self._track(self._fence(eff, limits))

    def warm_monitors(self) -> None:
        """Open the fence's monitor connections now: the first dead worker
        must not also pay for a connect (4-20 ms here, far more at start-up)."""
        self._warm_monitors()

    def monitors_reloaded(self) -> None:
        """After a reload: a changed or dropped ``monitor_dsn``'s connection closed
        (else kept until the stop: a PostgreSQL connection more per change), the new one warmed."""
        self.retire_monitors()
        self._warm_monitors()

    def _warm_monitors(self) -> None:
        from .fence import MonitorConnections, warm_monitor

        if self.monitors is None:
            self.monitors = MonitorConnections()
        monitors = self.monitors

        async def warm(dsn: str) -> None:
            await warm_monitor(monitors, dsn)
            self.retire_monitors()  # a reload may have dropped it meanwhile

        for dsn in self._monitor_dsns():
            self._track(warm(dsn))

    def retire_monitors(self) -> None:
        """Close the monitor connections of DSNs that no resource names now (a
        reload changed or dropped them) and that no running fence still uses."""
        if self.monitors is not None:
            self._track(self.monitors.close_except(lambda: self._monitor_dsns() | set(self._fencing)))

    def _monitor_dsns(self) -> set[str]:
        return {r.limits.monitor_dsn for r in self.ledger.resources.values() if r.limits.monitor_dsn}

    def _track(self, coro: Any) -> None:
        """Run ``coro`` as a task kept until it ends (cancelled at shutdown)."""
        task = self.loop.create_task(coro)
        self._fences.add(task)
        task.add_done_callback(self._fences.discard)

    async def cancel_tasks(self) -> None:
        """At shutdown: end fence checks and monitor warm-ups still running."""
        # Again until none is left: a fence's end, cancelled, starts a retire_monitors().
        while tasks := list(self._fences):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fence(self, eff: StartFence, limits: Resource) -> None:
        dsn = limits.monitor_dsn or ""
        self._fencing[dsn] = self._fencing.get(dsn, 0) + 1
        try:
            await self._check_fence(eff, limits)
        finally:
            self._fencing[dsn] -= 1
            if not self._fencing[dsn]:
                del self._fencing[dsn]
                self.retire_monitors()  # its DSN may be one a reload replaced meanwhile

    async def _check_fence(self, eff: StartFence, limits: Resource) -> None:
        from .fence import MonitorConnections, wait_backends_gone

        if self.monitors is None:
            self.monitors = MonitorConnections()
        started = self.loop.time()
        remaining: set[int] = set(eff.backend_pids)
        if eff.backend_pids:
            try:
                deadline = started + limits.fence_timeout
                gone = eff.terminate or pid_gone(eff.pid)
                while True:
                    # A live but late process keeps its backends; one that dies
                    # meanwhile gets the configured action as soon as it is gone.
                    left = max(deadline - self.loop.time(), 0.001)
                    slice_end = self.loop.time() + (left if gone else min(left, 0.25))
                    remaining = await wait_backends_gone(
                        limits.monitor_dsn or "", remaining,
                        action=limits.fence_action if gone else "wait",
                        timeout=slice_end - self.loop.time(),
                        monitors=self.monitors,
                        started=eff.started,
                    )
                    now = self.loop.time()
                    # Done, out of time, or back early unconfirmed (no monitor: logged).
                    if gone or not remaining or now >= deadline or now < slice_end - 0.05:
                        break
                    gone = pid_gone(eff.pid)
            except Exception as exc:  # noqa: BLE001 - keep the fence; its timeout ends it
                log.warning("fence check for %s failed: %s", eff.resource, exc)
                return
        if remaining:
            # Either seen still there or never checked (the monitor could not
            # connect: fence.py said so above): the slots wait either way.
            log.warning("fence: backends %s of %s not confirmed gone; slots stay fenced "
                        "until fence_timeout (%gs)", sorted(remaining), _whose(eff), limits.fence_timeout)
            # The ledger lifts them then, silently: say so, or the operator told they
            # wait never learns when (nor that those backends were never seen to go).
            await asyncio.sleep(max(0.0, started + limits.fence_timeout - self.loop.time()) + FENCE_LOG_AFTER)
            res = self.ledger.resources.get(eff.resource)
            # Not those its process re-registered meanwhile (live again, never freed).
            if (res is not None and not any(lease in res.fenced for lease in eff.leases)
                    and (freed := [x for x in eff.leases if x not in res.live])):
                log.warning("fence: fence_timeout (%gs) passed for %s: %d slot(s) of %s free "
                            "again; backends %s were never confirmed gone", limits.fence_timeout,
                            _whose(eff), len(freed), eff.resource, sorted(remaining))
            return
        unknown = len(eff.leases) - len(eff.backend_pids)
        if unknown > 0:
            # Some connections never reported a backend pid (still connecting,
            # or opened just before the death): for them, the quarantine delay.
            await asyncio.sleep(max(0.0, started + limits.quarantine_delay - self.loop.time()))
        log.info("fence: %s: backends %s gone, %d lease(s) with no backend pid known "
                 "freed after quarantine_delay; %d slot(s) of %s free",
                 _whose(eff), sorted(eff.backend_pids), max(0, unknown), len(eff.leases), eff.resource)
        self.apply(self.ledger.unfence(eff.resource, eff.leases, self.loop.time(), eff.fence))
        self.flush()
        self._changed()

    # -- inspect and admin

    def inspect(self, what: str, filters: dict[str, Any], now: float) -> Any:
        """The data an inspect asks for; ValueError for what there is none of."""
        ledger = self.ledger
        allowed = _INSPECT_FILTERS.get(what)
        if allowed is not None and (unknown := sorted(map(repr, filters.keys() - allowed))):
            # A misspelt filter (resourse=) answered with everything, as if it
            # had matched; say which names there are.
            takes = ", ".join(sorted(allowed)) or "none"
            raise ValueError(p.wire_text(f"cannot filter {what[:60]!r} by {', '.join(unknown)[:200]}; "
                                         f"filters: {takes}"))
        if what == "resources":
            names = filters.get("names")
            if names is not None and (not isinstance(names, list)
                                      or not all(isinstance(n, str) for n in names)):
                raise ValueError(f"names must be a list of resource names, got {p.brief(names)}")
            # A part of them: all at once may not fit in a reply (some 1,900 resources).
            return {"resources": ledger.snapshot_resources(now, None if names is None else set(names))}
        if what == "sessions":
            return {"sessions": ledger.snapshot_sessions(now)}
        if what in ("leases", "fenced"):
            resource = filters.get("resource")
            if resource is not None and (not isinstance(resource, str) or resource not in ledger.resources):
                # An empty list would read as "none held"; a typo must say so.
                raise ValueError(ledger.no_such_resource(resource))
            pid = filters.get("pid")
            if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
                raise ValueError(f"pid {p.brief(pid)} is not a process id")  # not "none held"
            if what == "fenced":
                return {"fenced": ledger.snapshot_fenced(now, resource, pid)}
            return {"leases": ledger.snapshot_leases(now, resource, pid)}
        if what == "server":
            return {"pid": os.getpid(), "socket": p.wire_text(self.config.socket_path),
                    "uptime_s": round(time.time() - self.started, 3), "sessions": len(self.sessions)}
        raise ValueError(f"cannot inspect {what[:60]!r}; use resources, sessions, leases, fenced or server")

    def admin(self, session: SessionProtocol, msg: p.Admin, now: float) -> None:
        if not self.is_admin(session.uid):
            self.log_request(session.pid, "admin", "refused admin %s from pid=%s uid=%s",
                             p.brief(msg.verb), session.pid, session.uid)
            session.send(p.Error("access_denied", f"uid {session.uid} may not use admin verbs", msg.req))
            return
        from .admin import VERBS, run_admin  # admin verbs live beside the CLI's

        try:
            data, effects = run_admin(self, msg.verb, msg.args, now)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            # Logged as a SIGHUP's failed reload is: else the journal kept no trace of a
            # `sharedpool reload` that met a broken file, only the operator's terminal did.
            why = f"reload failed, limits unchanged: {exc}" if msg.verb == "reload" else str(exc)
            verb = msg.verb if msg.verb in VERBS else p.brief(msg.verb)  # a peer's, maybe huge
            log.log(logging.ERROR if msg.verb == "reload" else logging.WARNING,
                    "admin %s %s by pid=%s refused: %s", verb, p.brief(msg.args, 200), session.pid, why)
            what = why if msg.verb == "reload" else f"{msg.verb}: {exc}"
            # A reload's error names the file, whose path may not be UTF-8.
            session.send(p.Error("bad_request", p.wire_text(what), msg.req))
            return
        log.warning("admin %s %s by pid=%s", msg.verb, p.brief(msg.args, 200), session.pid)
        self.apply(effects)
        session.send(p.Reply(msg.req, data))

    def _changed(self) -> None:
        for observer in self.on_change:
            observer(self)
