"""The wire protocol, with no I/O: bytes in, messages out; messages in, bytes out.

Rules of this module:

* A frame is a 4-byte big-endian length, then that many bytes of one msgpack
  map. The map has an ``"op"`` key naming the message; the other keys are the
  message's fields, checked against :data:`SCHEMAS`. Anything else — a frame
  over ``max_frame``, bytes that are not msgpack, a missing or mistyped field,
  an op the peer may not send, an op before the handshake — raises
  :class:`RemoteProtocolError`, and the connection is dead from then on.
* The first message is the client's ``hello``, answered by ``welcome``.
* Everything that decides what may be sent when lives in this file; the
  server and the client are thin shells that move bytes.
"""

from __future__ import annotations

import re
import reprlib
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

#: 2: ``report`` carries hand-off ``costs``, ``reclaim`` a ``quantum``.
#: 3: ``retime`` moves a queued acquire's deadline, keeping its place in line.
PROTOCOL_VERSION = 3
#: The oldest version still spoken (rolling upgrades): a coordinator serves a
#: worker's older hello in its version, a worker whose hello an older
#: coordinator refuses says hello again in that one. Ops added since are
#: refused on such a session (ADDED_IN), and not sent on it.
OLDEST_VERSION = 2
#: op -> the version that added it (ops of OLDEST_VERSION are not listed)
ADDED_IN = {"retime": 3}


def speaks(version: int) -> bool:
    """Whether this side can hold a session in protocol ``version``."""
    return OLDEST_VERSION <= version <= PROTOCOL_VERSION


def _versions() -> str:
    return (str(PROTOCOL_VERSION) if OLDEST_VERSION == PROTOCOL_VERSION
            else f"{OLDEST_VERSION} to {PROTOCOL_VERSION}")


_SPEAKS = re.compile(r"protocol version \d+ not supported \(this side speaks (\d+)(?: to (\d+))?\)")


def spoken_by_refuser(message: str) -> int | None:
    """The newest version a peer that refused our hello speaks, from its
    refusal (``protocol version N not supported (this side speaks M)``, or
    ``... M to K)``), if this side speaks it too; else None."""
    found = _SPEAKS.search(message)
    if found is None:
        return None
    newest = int(found.group(2) or found.group(1))
    return newest if speaks(newest) else None


DEFAULT_MAX_FRAME = 1 << 20
#: The hello name of the `sharedpool` commands (status, leases, admin verbs...).
CLI_NAME = "sharedpool-cli"
_HEADER = struct.Struct(">I")

CLIENT = "client"
SERVER = "server"

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 80


def wire_text(text: str) -> str:
    """``text`` as msgpack can carry it: a path or argv[0] that is not UTF-8
    (Python keeps its bytes as lone surrogates) has them written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def brief(value: Any, limit: int = 60) -> str:
    """A repr of a peer's value for messages and logs: its 1 MB string must not
    make a frame over the limit, nor its 1000-deep list a RecursionError."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Message:
    """Base of every message; ``op`` is its name on the wire."""

    __slots__ = ()
    op: ClassVar[str]
    sender: ClassVar[str]
    _names: ClassVar[tuple[str, ...]] = ()  # the fields, filled in below each class

    def to_wire(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self._names}
        data["op"] = self.op
        return data


# ----------------------------------------------------------------- client -> server


@dataclass(slots=True)
class Hello(Message):
    """Opens a session. ``held`` re-registers leases after a coordinator restart:
    a list of ``[resource, lease, token, state, backend_pid]``."""

    op = "hello"
    sender = CLIENT
    version: int
    pid: int
    name: str
    held: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class Acquire(Message):
    """Ask for a lease; ``timeout`` None means the resource's default, 0 means don't queue."""

    op = "acquire"
    sender = CLIENT
    req: int
    resource: str
    timeout: float | None = None
    site: str | None = None


@dataclass(slots=True)
class Cancel(Message):
    """Withdraw a queued acquire (the client gave up waiting)."""

    op = "cancel"
    sender = CLIENT
    req: int


@dataclass(slots=True)
class Retime(Message):
    """Give a queued acquire a new deadline, ``timeout`` seconds from now
    (a number >= 0), keeping its place in line: a pool whose waiter was served
    meanwhile carries the request on for its next waiter. No reply; one for a
    request already answered is ignored (the answer crossed it)."""

    op = "retime"
    sender = CLIENT
    req: int
    timeout: float


@dataclass(slots=True)
class Release(Message):
    """Give a lease back; its connection is already closed. No reply."""

    op = "release"
    sender = CLIENT
    lease: int


@dataclass(slots=True)
class Report(Message):
    """Coalesced state, sent without waiting: ``states`` is a list of
    ``[lease, "idle" | "busy", backend_pid | None, site | None, suspected_leak]``
    (the last is optional); ``failures``
    counts connect failures per resource since the last report; ``ok`` lists
    resources that connected fine since; ``costs`` maps a resource to what
    moving one of its slots costs this process (seconds of connect + confirmed
    close, a moving average), from which the coordinator sets the auto
    fairness quantum."""

    op = "report"
    sender = CLIENT
    states: list[Any] = field(default_factory=list)
    failures: dict[str, Any] = field(default_factory=dict)
    ok: list[Any] = field(default_factory=list)
    costs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Inspect(Message):
    """Ask what the coordinator knows: ``what`` is resources, sessions or leases."""

    op = "inspect"
    sender = CLIENT
    req: int
    what: str
    filters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Admin(Message):
    """An admin verb: pause, resume, drain, resize, end_session, reload."""

    op = "admin"
    sender = CLIENT
    req: int
    verb: str
    args: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------- server -> client


@dataclass(slots=True)
class Welcome(Message):
    op = "welcome"
    sender = SERVER
    version: int
    session: int
    server_pid: int
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Grant(Message):
    op = "grant"
    sender = SERVER
    req: int
    lease: int
    resource: str
    token: int


@dataclass(slots=True)
class Deny(Message):
    """An acquire refused: ``reason`` is timeout, unknown_resource,
    too_many_waiters, paused, draining, failing, or cancelled."""

    op = "deny"
    sender = SERVER
    req: int
    reason: str
    message: str


@dataclass(slots=True)
class Reclaim(Message):
    """Give back ``count`` leases of ``resource``: idle ones now, else at checkin
    once the connection is older than ``quantum`` seconds (None: the pool's own
    choice; infinity: idle ones only). ``count`` 0 withdraws an earlier request."""

    op = "reclaim"
    sender = SERVER
    resource: str
    count: int
    quantum: float | None = None


@dataclass(slots=True)
class Push(Message):
    """An admin decision the pools must act on: drain, pause, resume, resize, end_session;
    or limits a reload changed (``limits``: ``{"resources": {name: limits as in a welcome}}``)."""

    op = "push"
    sender = SERVER
    verb: str
    resource: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Reply(Message):
    """The answer to inspect or admin."""

    op = "reply"
    sender = SERVER
    req: int
    data: Any = None


@dataclass(slots=True)
class Error(Message):
    """Something the peer did was wrong; ``req`` ties it to a request if any.
    With ``fatal`` the server closes the session after sending it."""

    op = "error"
    sender = SERVER
    code: str
    message: str
    req: int | None = None
    fatal: bool = False


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.op: cls
    for cls in (
        Hello, Acquire, Cancel, Retime, Release, Report, Inspect, Admin,
        Welcome, Grant, Deny, Reclaim, Push, Reply, Error,
    )
}

#: Field name -> accepted Python types, per op. Fields with defaults may be absent.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"version": (int,), "pid": (int,), "name": (str,), "held": (list,)},
    "acquire": {"req": (int,), "resource": (str,), "timeout": _OPT_NUM, "site": _OPT_STR},
    "cancel": {"req": (int,)},
    "retime": {"req": (int,), "timeout": _NUM},
    "release": {"lease": (int,)},
    "report": {"states": (list,), "failures": (dict,), "ok": (list,), "costs": (dict,)},
    "inspect": {"req": (int,), "what": (str,), "filters": (dict,)},
    "admin": {"req": (int,), "verb": (str,), "args": (dict,)},
    "welcome": {"version": (int,), "session": (int,), "server_pid": (int,), "resources": (dict,)},
    "grant": {"req": (int,), "lease": (int,), "resource": (str,), "token": (int,)},
    "deny": {"req": (int,), "reason": (str,), "message": (str,)},
    "reclaim": {"resource": (str,), "count": (int,), "quantum": _OPT_NUM},
    "push": {"verb": (str,), "resource": _OPT_STR, "args": (dict,)},
    "reply": {"req": (int,), "data": (object,)},
    "error": {"code": (str,), "message": (str,), "req": _OPT_INT, "fatal": (bool,)},
}
for _cls in MESSAGE_TYPES.values():
    _cls._names = tuple(f.name for f in fields(_cls))  # type: ignore[arg-type]

#: The same, as exact types: msgpack yields only exact builtins, so
#: ``type(v) in kinds`` is both faster and stricter (a bool is not an int).
_EXACT: dict[str, dict[str, frozenset[type] | None]] = {
    op: {k: (None if object in kinds else frozenset(kinds)) for k, kinds in schema.items()}
    for op, schema in SCHEMAS.items()
}

_REQUIRED: dict[str, frozenset[str]] = {
    op: frozenset(
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.default is f.default_factory  # both MISSING: no default
    )
    for op, cls in MESSAGE_TYPES.items()
}


def _check_fields(op: str, data: dict[str, Any]) -> None:
    exact = _EXACT[op]
    for key, value in data.items():
        if key not in exact:
            raise RemoteProtocolError(f"{op}: unknown field {brief(key)}")
        kinds = exact[key]
        if kinds is not None and type(value) not in kinds:
            _type_error(op, key, value)
    missing = _REQUIRED[op] - data.keys()
    if missing:
        raise RemoteProtocolError(f"{op}: missing field {sorted(missing)[0]!r}")


def _type_error(op: str, key: str, value: Any) -> None:
    kinds = SCHEMAS[op][key]
    if isinstance(value, bool):
        raise RemoteProtocolError(f"{op}: field {key!r} must not be a boolean")
    raise RemoteProtocolError(
        f"{op}: field {key!r} has type {type(value).__name__}, "
        f"expected {' or '.join(k.__name__ for k in kinds)}"
    )


def decode_body(body: bytes, sender: str) -> Message:
    """Turn one frame body into a message the ``sender`` role may send."""
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except MemoryError:  # ours to report, not the peer's: its frame may be fine
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"frame must be a map, got {type(data).__name__}")
    op = data.pop("op", None)
    if not isinstance(op, str):
        raise RemoteProtocolError("frame has no 'op' string")
    cls = MESSAGE_TYPES.get(op)
    if cls is None:
        raise RemoteProtocolError(f"unknown op {op[:40]!r}")
    if cls.sender != sender:
        raise RemoteProtocolError(f"op {op!r} may not be sent by the {sender}")
    _check_fields(op, data)
    if op == "retime" and not data["timeout"] >= 0:  # NaN too: it would never expire
        raise RemoteProtocolError(f"retime: timeout must be a number >= 0, got {brief(data['timeout'])}")
    return cls(**data)


def encode(message: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Frame one message; raises LocalProtocolError if it would not fit."""
    try:
        body = msgpack.packb(message.to_wire(), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # an object msgpack cannot hold
        raise LocalProtocolError(f"{message.op} cannot be encoded: {exc}") from None
    if len(body) > max_frame:
        raise FrameTooLarge(message.op, len(body), max_frame)
    return _HEADER.pack(len(body)) + body


def held_that_fits(hello: Hello, limit: int = DEFAULT_MAX_FRAME) -> int:
    """How many of ``hello.held``, first to last, fit in one frame: all of
    them unless a process holds many thousands of leases (some 37,000 of a
    short resource name, 4,500 of a 200-character one)."""
    try:
        encode(hello, limit)
        return len(hello.held)
    except FrameTooLarge:
        pass
    room = limit - len(encode(Hello(hello.version, hello.pid, hello.name), limit)) - 5  # array32 header
    for count, entry in enumerate(hello.held):
        room -= len(msgpack.packb(entry, use_bin_type=True))
        if room < 0:
            return count
    return len(hello.held)


#: A report goes out in frames of at most this size (the default limit is 1 MiB).
REPORT_FRAME = 64 * 1024


def encode_report(report: Report, limit: int = REPORT_FRAME) -> bytes:
    """Frame ``report``, split across as many reports as it takes to keep each
    frame within ``limit``: a pool of thousands of leases (each row with its
    call site, under leak detection) made one frame over the limit that could
    never be sent, and the coordinator never heard of those leases' states or
    backend pids. The coordinator takes every entry of every field on its own,
    so costs, successes and failures are split too (a process using a few
    thousand resources has that many costs, all in every report): each entry
    goes in exactly one frame, and a resource's success never in a later one
    than its failures (it would clear the streak they add to). A row too
    large alone goes without its site."""
    try:
        return encode(report, limit)
    except FrameTooLarge:
        pass
    # Each of the four fields' headers may grow to 5 bytes (array32/map32).
    room = limit - len(encode(Report(), limit)) - 4 * 4
    items: list[tuple[str, Any, Any]] = [
        *(("costs", name, cost) for name, cost in report.costs.items()),
        *(("ok", name, None) for name in report.ok),
        *(("failures", name, count) for name, count in report.failures.items()),
        *(("states", row, None) for row in report.states),
    ]
    parts = [Report()]
    left = room
    for kind, key, value in items:
        size = len(msgpack.packb(key, use_bin_type=True))
        if kind == "states" and size > room and isinstance(key, list) and len(key) > 3:
            key = [*key[:3], None, *key[4:]]
            size = len(msgpack.packb(key, use_bin_type=True))
        elif kind in ("costs", "failures"):
            size += len(msgpack.packb(value, use_bin_type=True))
        part = parts[-1]
        if size > left and (part.states or part.ok or part.failures or part.costs):
            part = Report()
            parts.append(part)
            left = room
        if kind == "states":
            part.states.append(key)
        elif kind == "ok":
            part.ok.append(key)
        else:
            getattr(part, kind)[key] = value
        left -= size
    return b"".join(encode(part, limit) for part in parts)


class Connection:
    """One end of a session's byte stream.

    Feed received bytes to :meth:`receive_data`, pull messages with
    :meth:`next_event` (``None`` means more bytes are needed), and turn
    outgoing messages into bytes with :meth:`send`. After a
    RemoteProtocolError the connection refuses to go on.
    """

    def __init__(self, role: str, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be {CLIENT!r} or {SERVER!r}, got {role!r}")
        self.role = role
        self.peer = SERVER if role == CLIENT else CLIENT
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        self.handshaken = False
        self.broken: str | None = None
        #: the session's protocol version: the one of the hello (None: no hello yet)
        self.version: int | None = None

    def __repr__(self) -> str:
        state = "broken" if self.broken else ("ready" if self.handshaken else "handshake")
        return f"<protocol.Connection {self.role} {state} buffered={self.buffered}>"

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> Message | None:
        if self.broken:
            raise RemoteProtocolError(f"connection already broken: {self.broken}")
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self.broken = str(exc)
            raise

    def _next_event(self) -> Message | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (size,) = _HEADER.unpack_from(buf, pos)
        if size > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {size} bytes exceeds the limit of {self.max_frame}"
            )
        end = pos + 4 + size
        if len(buf) < end:
            return None
        body = bytes(buf[pos + 4 : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
            if end > 65536:  # compact now and then, not on every frame
                del buf[:end]
                self._pos = 0
        msg = decode_body(body, self.peer)
        if not self.handshaken:
            expected = "hello" if self.role == SERVER else "welcome"
            if msg.op != expected and msg.op != "error":
                raise RemoteProtocolError(f"expected {expected!r} first, got {msg.op!r}")
            if isinstance(msg, Hello):
                if not speaks(msg.version):
                    raise RemoteProtocolError(f"protocol version {msg.version} not supported "
                                              f"(this side speaks {_versions()})")
                self.version = msg.version
            elif isinstance(msg, Welcome) and msg.version != (self.version or PROTOCOL_VERSION):
                # Only the version of our hello: the session's, from here on.
                raise RemoteProtocolError(f"protocol version {msg.version} not supported "
                                          f"(this side speaks {self.version or PROTOCOL_VERSION})")
            self.handshaken = msg.op != "error"
        elif isinstance(msg, (Hello, Welcome)):
            raise RemoteProtocolError(f"{msg.op!r} sent twice")
        elif ADDED_IN.get(msg.op, 0) > (self.version or PROTOCOL_VERSION):
            raise RemoteProtocolError(f"op {msg.op!r} is not in protocol {self.version} (this session's)")
        return msg

    def events(self) -> list[Message]:
        """Every complete message buffered so far."""
        out = []
        while (msg := self.next_event()) is not None:
            out.append(msg)
        return out

    def send(self, message: Message) -> bytes:
        """Frame ``message``, refusing (LocalProtocolError) anything the peer's
        :meth:`next_event` would reject: a wrong role, an op before the
        handshake, a mistyped field. The checks cost a decode; the shells use
        :func:`encode` directly for the hot ops once the handshake is done."""
        if message.sender != self.role:
            raise LocalProtocolError(f"a {self.role} may not send {message.op!r}")
        first = "hello" if self.role == CLIENT else "welcome"
        if not self._sent_first and message.op not in (first, "error"):
            raise LocalProtocolError(f"{first!r} must be sent first, not {message.op!r}")
        if message.op == first and self._sent_first:
            raise LocalProtocolError(f"{first!r} already sent")
        if self.version is not None and ADDED_IN.get(message.op, 0) > self.version:
            raise LocalProtocolError(f"{message.op!r} is not in protocol {self.version} (this session's)")
        data = encode(message, self.max_frame)
        try:
            decode_body(data[_HEADER.size :], self.role)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"the peer would refuse this frame: {exc}") from None
        if message.op == first:
            self._sent_first = True
            assert isinstance(message, (Hello, Welcome))
            self.version = message.version
        return data

    _sent_first = False
