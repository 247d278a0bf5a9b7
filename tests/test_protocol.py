"""The sans-IO protocol: round trips, every error path, and random bytes.

Like h11's tests: no sockets, only ``Connection`` objects passing bytes.
"""

from __future__ import annotations

import struct
from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharedpool import protocol as p
from sharedpool.errors import (
    LocalProtocolError,
    PoolClosed,
    ProtocolError,
    RemoteProtocolError,
    ResourceDraining,
    SharedPoolError,
    UnknownResource,
    denial_error,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HELLO = p.Hello(p.PROTOCOL_VERSION, 4242, "worker-1", [["pg", 7, 7, "idle", 1234]])
WELCOME = p.Welcome(p.PROTOCOL_VERSION, 3, 99, {"pg": {"max_size": 4, "max_waiting": None}})

#: One instance of every message, with every field set away from its default.
SAMPLES: dict[str, p.Message] = {
    "hello": HELLO,
    "acquire": p.Acquire(1, "pg", 2.5, "app.py:10"),
    "cancel": p.Cancel(1),
    "retime": p.Retime(1, 4.5),
    "release": p.Release(17),
    "report": p.Report([[17, "idle", 1234, None], [18, "busy", None, "x.py:3"]], {"pg": 2}, ["api"],
                       {"pg": 0.0123}),
    "inspect": p.Inspect(2, "leases", {"resource": "pg", "pid": 12}),
    "admin": p.Admin(3, "resize", {"resource": "pg", "max_size": 8}),
    "welcome": WELCOME,
    "grant": p.Grant(1, 17, "pg", 17),
    "deny": p.Deny(1, "timeout", "all 4 leases of 'pg' are held"),
    "reclaim": p.Reclaim("pg", 2, 0.5),
    "push": p.Push("resize", "pg", {"max_size": 8}),
    "reply": p.Reply(2, {"leases": [{"id": 1, "site": None, "age_s": 0.5}], "ok": True}),
    "error": p.Error("bad_request", "cannot inspect 'x'", 2, True),
}
FROM_CLIENT = [op for op, cls in p.MESSAGE_TYPES.items() if cls.sender == p.CLIENT]
FROM_SERVER = [op for op, cls in p.MESSAGE_TYPES.items() if cls.sender == p.SERVER]


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def handshaken() -> tuple[p.Connection, p.Connection]:
    """A client and a server connection that have exchanged hello/welcome."""
    client, server = p.Connection(p.CLIENT), p.Connection(p.SERVER)
    server.receive_data(client.send(HELLO))
    assert server.next_event() == HELLO
    client.receive_data(server.send(WELCOME))
    assert client.next_event() == WELCOME
    assert client.handshaken and server.handshaken
    return client, server


def server_ready() -> p.Connection:
    return handshaken()[1]


def client_ready() -> p.Connection:
    return handshaken()[0]


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, p.Message):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))  # type: ignore[arg-type]
    return bool(a == b)


def expect_remote_error(conn: p.Connection, data: bytes, match: str) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        conn.events()
    assert conn.broken
    return info.value


# ------------------------------------------------------------------- tables


def test_tables_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(p.MESSAGE_TYPES) == set(p.SCHEMAS)
    for op, cls in p.MESSAGE_TYPES.items():
        assert cls.op == op
        assert cls.sender in (p.CLIENT, p.SERVER)
        assert {f.name for f in fields(cls)} == set(p.SCHEMAS[op])  # type: ignore[arg-type]
        assert isinstance(SAMPLES[op], cls)


def test_error_hierarchy() -> None:
    for cls in (LocalProtocolError, RemoteProtocolError):
        assert issubclass(cls, ProtocolError) and issubclass(cls, SharedPoolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)



def test_a_denial_names_its_reason_once() -> None:
    # A drain refusal read "resource 'pg' is draining (draining)".
    drain = denial_error("draining", "resource 'pg' is draining")
    assert isinstance(drain, ResourceDraining) and isinstance(drain, PoolClosed)
    assert str(drain) == "resource 'pg' is draining" and drain.reason == "draining"
    unknown = denial_error("unknown_resource", "no resource 'pgg' (known: pg)")
    assert isinstance(unknown, UnknownResource)
    assert str(unknown) == "no resource 'pgg' (known: pg) (unknown_resource)"  # the code is news there
    assert repr(type(drain)(*drain.__reduce__()[1])) == repr(drain)  # still pickles as it was made

# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize("op", sorted(p.MESSAGE_TYPES))
def test_round_trip(op: str) -> None:
    msg = SAMPLES[op]
    if op == "hello":
        server = p.Connection(p.SERVER)
        server.receive_data(p.Connection(p.CLIENT).send(msg))
        got = server.next_event()
    elif op == "welcome":
        client = p.Connection(p.CLIENT)
        client.send(HELLO)
        client.receive_data(p.Connection(p.SERVER).send(msg))
        got = client.next_event()
    else:
        client, server = handshaken()
        sender, receiver = (client, server) if msg.sender == p.CLIENT else (server, client)
        data = sender.send(msg)
        assert data == p.encode(msg)  # the shells' fast path frames the same bytes
        receiver.receive_data(data)
        got = receiver.next_event()
        assert receiver.next_event() is None
    assert got is not None and same(got, msg)


def test_defaults_may_be_left_out_on_the_wire() -> None:
    server = server_ready()
    server.receive_data(frame({"op": "acquire", "req": 1, "resource": "pg"}))
    server.receive_data(frame({"op": "report"}))
    assert server.events() == [p.Acquire(1, "pg", None, None), p.Report([], {}, [])]


def test_int_is_accepted_where_a_float_is_expected() -> None:
    server = server_ready()
    server.receive_data(frame({"op": "acquire", "req": 1, "resource": "pg", "timeout": 3}))
    msg = server.next_event()
    assert isinstance(msg, p.Acquire) and msg.timeout == 3


def test_byte_at_a_time() -> None:
    client, server = p.Connection(p.CLIENT), p.Connection(p.SERVER)
    outgoing = [HELLO] + [SAMPLES[op] for op in FROM_CLIENT if op != "hello"]
    data = b"".join(client.send(m) if m is HELLO else p.encode(m) for m in outgoing)
    got = []
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        msg = server.next_event()
        if msg is not None:
            got.append(msg)
        assert server.next_event() is None
    assert got == outgoing


def test_several_frames_in_one_chunk() -> None:
    client = p.Connection(p.CLIENT)
    client.send(HELLO)
    incoming = [WELCOME] + [SAMPLES[op] for op in FROM_SERVER if op != "welcome"]
    client.receive_data(b"".join(p.encode(m) for m in incoming))
    assert client.events() == incoming
    assert client.events() == []


def test_frames_split_anywhere() -> None:
    server = server_ready()
    msgs = [p.Release(i) for i in range(50)]
    data = b"".join(p.encode(m) for m in msgs)
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    got = []
    for chunk in chunks:
        server.receive_data(chunk)
        got += server.events()
    assert got == msgs


def test_long_buffer_is_compacted_without_losing_frames() -> None:
    """More than 64 KiB of frames in one chunk, ending in half a frame."""
    server = server_ready()
    msgs = [p.Acquire(i, "pg-" + "x" * 100, 1.0) for i in range(1000)]
    data = b"".join(p.encode(m) for m in msgs)
    assert len(data) > 2 * 65536
    tail = p.encode(p.Release(5))
    server.receive_data(data + tail[:3])
    assert server.events() == msgs
    assert "buffered=3" in repr(server)
    server.receive_data(tail[3:])
    assert server.events() == [p.Release(5)]
    assert "buffered=0" in repr(server)


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    client, server = p.Connection(p.CLIENT), p.Connection(p.SERVER, max_frame=200)
    server.receive_data(client.send(HELLO))
    server.next_event()
    body = msgpack.packb(p.Acquire(1, "").to_wire(), use_bin_type=True)
    name = "x" * (200 - len(body) - 1)  # str8's header is one byte longer than fixstr's
    msg = p.Acquire(1, name)
    data = p.encode(msg, 200)
    assert len(data) == 4 + 200
    server.receive_data(data)
    assert server.next_event() == msg


def test_repr_tells_the_state() -> None:
    client, server = p.Connection(p.CLIENT), p.Connection(p.SERVER)
    assert "handshake" in repr(server) and "server" in repr(server)
    server.receive_data(client.send(HELLO))
    server.next_event()
    assert "ready" in repr(server)
    server.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert "broken" in repr(server)


# ------------------------------------------------------------------- remote errors


def test_oversized_frame_header_fails_before_the_body_arrives() -> None:
    server = p.Connection(p.SERVER, max_frame=1024)
    err = expect_remote_error(server, struct.pack(">I", 1025), "exceeds the limit of 1024")
    assert "1025" in str(err)


def test_oversized_frame_after_hello() -> None:
    expect_remote_error(server_ready(), b"\xff\xff\xff\xff", "exceeds")


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty frame
        b"\xc1",  # a byte msgpack never uses
        b"\x82\xa2op",  # truncated map
        msgpack.packb({"op": "release", "lease": 1}) + b"\x00",  # trailing bytes
        b"\x91" * 5000 + b"\xc0",  # nested deeper than msgpack allows
        b"\xd6\xff\x00\x00\x00\x01\x00",  # a timestamp extension that is not a timestamp
    ],
    ids=["empty", "never-used-byte", "truncated", "trailing", "too-deep", "bad-ext"],
)
def test_body_not_msgpack(body: bytes) -> None:
    expect_remote_error(server_ready(), raw(body), "not valid msgpack")


@pytest.mark.parametrize("obj", [[1, 2], 5, "release", None, b"op", 1.5, True])
def test_body_not_a_map(obj: Any) -> None:
    expect_remote_error(server_ready(), frame(obj), "must be a map")


def test_map_with_non_string_keys() -> None:
    expect_remote_error(server_ready(), frame({"op": "release", 1: 2}), "not valid msgpack")


@pytest.mark.parametrize(
    "obj",
    [{"lease": 1}, {"op": 5, "lease": 1}, {"op": None}, {b"op": "release", "lease": 1}],
    ids=["missing", "int", "nil", "bytes-key"],
)
def test_missing_op(obj: dict[Any, Any]) -> None:
    expect_remote_error(server_ready(), frame(obj), "no 'op' string")


def test_unknown_op_is_named_but_cut_short() -> None:
    err = expect_remote_error(server_ready(), frame({"op": "frobnicate" + "z" * 10_000}), "unknown op")
    assert "frobnicate" in str(err) and len(str(err)) < 200


@pytest.mark.parametrize("op", FROM_SERVER)
def test_server_refuses_server_ops(op: str) -> None:
    data = frame(SAMPLES[op].to_wire())
    expect_remote_error(server_ready(), data, "may not be sent by the client")


@pytest.mark.parametrize("op", FROM_CLIENT)
def test_client_refuses_client_ops(op: str) -> None:
    data = frame(SAMPLES[op].to_wire())
    expect_remote_error(client_ready(), data, "may not be sent by the server")


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"op": "release"}, "missing field 'lease'"),
        ({"op": "release", "lease": 1, "extra": 2}, "unknown field 'extra'"),
        ({"op": "release", "lease": "1"}, "has type str, expected int"),
        ({"op": "release", "lease": 1.0}, "has type float, expected int"),
        ({"op": "release", "lease": None}, "has type NoneType"),
        ({"op": "release", "lease": True}, "must not be a boolean"),
        ({"op": "cancel", "req": False}, "must not be a boolean"),
        ({"op": "acquire", "req": 1, "resource": "pg", "timeout": True}, "must not be a boolean"),
        ({"op": "acquire", "req": 1, "resource": "pg", "timeout": "1"}, "expected int or float"),
        ({"op": "acquire", "req": 1, "resource": b"pg"}, "has type bytes, expected str"),
        ({"op": "acquire", "req": 1, "resource": "pg", "site": 5}, "expected str or NoneType"),
        ({"op": "report", "states": {}}, "has type dict, expected list"),
        ({"op": "report", "failures": []}, "has type list, expected dict"),
        ({"op": "report", "costs": [0.1]}, "has type list, expected dict"),
        ({"op": "inspect", "req": 1}, "missing field 'what'"),
        ({"op": "retime", "req": 1}, "missing field 'timeout'"),
        ({"op": "retime", "req": 1, "timeout": None}, "has type NoneType, expected int or float"),
        ({"op": "retime", "req": "1", "timeout": 1}, "has type str, expected int"),
        ({"op": "retime", "req": 1, "timeout": True}, "must not be a boolean"),
        ({"op": "retime", "req": 1, "timeout": -0.5}, "timeout must be a number >= 0, got -0.5"),
        ({"op": "retime", "req": 1, "timeout": -1}, "timeout must be a number >= 0, got -1"),
        ({"op": "retime", "req": 1, "timeout": float("nan")}, "timeout must be a number >= 0, got nan"),
        ({"op": "admin", "req": 1, "verb": "pause", "args": None}, "expected dict"),
    ],
)
def test_bad_fields_from_the_client(obj: dict[str, Any], match: str) -> None:
    expect_remote_error(server_ready(), frame(obj), match)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"op": "error", "code": "x", "message": "m", "fatal": 1}, "expected bool"),
        ({"op": "error", "code": "x", "message": "m", "req": True}, "must not be a boolean"),
        ({"op": "reclaim", "resource": "pg", "count": 1.5}, "expected int"),
        ({"op": "reclaim", "resource": "pg", "count": 1, "quantum": "1"}, "expected int or float or None"),
        ({"op": "deny", "req": 1, "reason": "timeout"}, "missing field 'message'"),
        ({"op": "grant", "req": 1, "lease": 1, "resource": "pg"}, "missing field 'token'"),
        ({"op": "push", "verb": "drain", "resource": 5}, "expected str or NoneType"),
    ],
)
def test_bad_fields_from_the_server(obj: dict[str, Any], match: str) -> None:
    expect_remote_error(client_ready(), frame(obj), match)


def test_bool_is_fine_where_the_schema_says_bool_or_anything() -> None:
    client = client_ready()
    client.receive_data(frame({"op": "error", "code": "x", "message": "m", "fatal": False}))
    client.receive_data(frame({"op": "reply", "req": 1, "data": True}))
    assert client.events() == [p.Error("x", "m", None, False), p.Reply(1, True)]


def test_huge_unknown_field_name_makes_a_short_error() -> None:
    err = expect_remote_error(server_ready(), frame({"op": "cancel", "req": 1, "k" * 500_000: 1}),
                              "unknown field")
    assert len(str(err)) < 200


@pytest.mark.parametrize("op", [op for op in FROM_CLIENT if op != "hello"])
def test_server_refuses_ops_before_hello(op: str) -> None:
    expect_remote_error(p.Connection(p.SERVER), p.encode(SAMPLES[op]), "expected 'hello' first")


@pytest.mark.parametrize("op", [op for op in FROM_SERVER if op not in ("welcome", "error")])
def test_client_refuses_ops_before_welcome(op: str) -> None:
    client = p.Connection(p.CLIENT)
    client.send(HELLO)
    expect_remote_error(client, p.encode(SAMPLES[op]), "expected 'welcome' first")


def test_client_accepts_an_error_before_welcome() -> None:
    client = p.Connection(p.CLIENT)
    client.send(HELLO)
    refusal = p.Error("access_denied", "uid 65534 may not use this coordinator", None, True)
    client.receive_data(p.encode(refusal))
    assert client.events() == [refusal]
    assert not client.handshaken
    client.receive_data(p.encode(WELCOME))
    assert client.events() == [WELCOME] and client.handshaken


def test_hello_twice() -> None:
    expect_remote_error(server_ready(), p.encode(HELLO), "'hello' sent twice")


def test_welcome_twice() -> None:
    expect_remote_error(client_ready(), p.encode(WELCOME), "'welcome' sent twice")


def test_wrong_protocol_version_in_hello() -> None:
    hello = p.Hello(p.PROTOCOL_VERSION + 1, 1, "x")
    err = expect_remote_error(p.Connection(p.SERVER), p.encode(hello), "not supported")
    assert str(p.PROTOCOL_VERSION + 1) in str(err)


def test_wrong_protocol_version_in_welcome() -> None:
    client = p.Connection(p.CLIENT)
    client.send(HELLO)
    welcome = p.Welcome(p.PROTOCOL_VERSION + 1, 1, 1, {})
    expect_remote_error(client, p.encode(welcome), "not supported")


def test_broken_connection_stays_broken() -> None:
    server = server_ready()
    expect_remote_error(server, frame([]), "must be a map")
    reason = server.broken
    server.receive_data(p.encode(p.Release(1)))  # a good frame changes nothing now
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="already broken"):
            server.next_event()
    assert server.broken == reason
    with pytest.raises(RemoteProtocolError, match="already broken"):
        server.events()


def test_frames_before_the_bad_one_are_delivered() -> None:
    server = server_ready()
    server.receive_data(p.encode(p.Release(1)) + p.encode(p.Cancel(2)) + frame({"op": "x"}))
    assert server.next_event() == p.Release(1)
    assert server.next_event() == p.Cancel(2)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


# ------------------------------------------------------------------- local errors


def test_bad_role_for_a_connection() -> None:
    with pytest.raises(ValueError, match="role"):
        p.Connection("peer")


@pytest.mark.parametrize("op", FROM_SERVER)
def test_client_may_not_send_server_ops(op: str) -> None:
    with pytest.raises(LocalProtocolError, match="may not send"):
        client_ready().send(SAMPLES[op])


@pytest.mark.parametrize("op", FROM_CLIENT)
def test_server_may_not_send_client_ops(op: str) -> None:
    with pytest.raises(LocalProtocolError, match="may not send"):
        server_ready().send(SAMPLES[op])


@pytest.mark.parametrize("op", [op for op in FROM_CLIENT if op != "hello"])
def test_client_sends_hello_first(op: str) -> None:
    with pytest.raises(LocalProtocolError, match="'hello' must be sent first"):
        p.Connection(p.CLIENT).send(SAMPLES[op])


@pytest.mark.parametrize("op", [op for op in FROM_SERVER if op not in ("welcome", "error")])
def test_server_sends_welcome_first(op: str) -> None:
    with pytest.raises(LocalProtocolError, match="'welcome' must be sent first"):
        p.Connection(p.SERVER).send(SAMPLES[op])


def test_server_may_refuse_before_welcome() -> None:
    server = p.Connection(p.SERVER)
    data = server.send(p.Error("access_denied", "no", None, True))
    assert data == p.encode(p.Error("access_denied", "no", None, True))
    server.send(WELCOME)


def test_hello_and_welcome_only_once() -> None:
    client, server = handshaken()
    with pytest.raises(LocalProtocolError, match="'hello' already sent"):
        client.send(HELLO)
    with pytest.raises(LocalProtocolError, match="'welcome' already sent"):
        server.send(WELCOME)


@pytest.mark.parametrize(
    "msg",
    [
        p.Acquire("1", "pg"),  # type: ignore[arg-type]
        p.Acquire(True, "pg"),  # type: ignore[arg-type]
        p.Acquire(1, "pg", "soon"),  # type: ignore[arg-type]
        p.Release(None),  # type: ignore[arg-type]
        p.Inspect(1, "leases", {1: "x"}),  # type: ignore[dict-item]  # the peer refuses int keys
    ],
    ids=["str-req", "bool-req", "str-timeout", "none-lease", "int-key"],
)
def test_send_refuses_what_the_peer_would_refuse(msg: p.Message) -> None:
    with pytest.raises(LocalProtocolError, match="peer would refuse"):
        client_ready().send(msg)


@pytest.mark.parametrize(
    "msg",
    [p.Reply(1, object()), p.Reply(1, {"x": {1, 2}}), p.Grant(1, 2**64, "pg", 1), p.Cancel(-(2**63) - 1)],
    ids=["object", "set", "too-big", "too-small"],
)
def test_unencodable_messages_are_local_errors(msg: p.Message) -> None:
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        p.encode(msg)
    conn = client_ready() if msg.sender == p.CLIENT else server_ready()
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        conn.send(msg)


def test_send_refuses_a_frame_over_max_frame() -> None:
    client = p.Connection(p.CLIENT, max_frame=1024)
    with pytest.raises(LocalProtocolError, match="exceeds 1024"):
        client.send(p.Hello(p.PROTOCOL_VERSION, 1, "x" * 2000))
    client.send(HELLO)  # the failed hello did not count
    with pytest.raises(LocalProtocolError, match="exceeds 4"):
        p.encode(p.Release(1), max_frame=4)


def test_a_failed_send_does_not_spend_the_handshake() -> None:
    server = p.Connection(p.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(p.Welcome(p.PROTOCOL_VERSION, 1, 1, {1: {}}))  # type: ignore[dict-item]
    server.send(WELCOME)


# ------------------------------------------------------------------- hypothesis: valid messages

_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
#: Any value the peer accepts in an untyped slot: maps only with string keys.
VALUES = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FOR_TYPE: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
    float: st.floats(allow_nan=False),
    str: st.text(max_size=30),
    bool: st.booleans(),
    type(None): st.none(),
    list: st.lists(VALUES, max_size=5),
    dict: st.dictionaries(st.text(max_size=10), VALUES, max_size=5),
    object: VALUES,
}


def _field_strategy(kinds: tuple[type, ...]) -> st.SearchStrategy[Any]:
    return st.one_of(*(_FOR_TYPE[k] for k in kinds))


@st.composite
def messages(draw: st.DrawFn, ops: list[str] | None = None) -> p.Message:
    """A valid message of any op, built from :data:`protocol.SCHEMAS`; fields
    that have defaults are sometimes left out."""
    op = draw(st.sampled_from(ops or sorted(p.MESSAGE_TYPES)))
    cls = p.MESSAGE_TYPES[op]
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        required = f.name in p._REQUIRED[op]
        if required or draw(st.booleans()):
            kwargs[f.name] = draw(_field_strategy(p.SCHEMAS[op][f.name]))
    if op in ("hello", "welcome"):
        kwargs["version"] = p.PROTOCOL_VERSION
    if op == "retime":  # a value rule on top of the type: a deadline is never in the past
        kwargs["timeout"] = abs(kwargs["timeout"])
    return cls(**kwargs)


@FUZZ
@given(messages())
def test_valid_messages_round_trip_exactly(msg: p.Message) -> None:
    assert same(p.decode_body(p.encode(msg)[4:], msg.sender), msg)


@FUZZ
@given(st.lists(messages(FROM_CLIENT + FROM_SERVER), max_size=8), st.data())
def test_valid_message_streams_round_trip_through_connections(
    msgs: list[p.Message], data: st.DataObject
) -> None:
    client, server = handshaken()
    to_server = [m for m in msgs if m.sender == p.CLIENT and m.op != "hello"]
    to_client = [m for m in msgs if m.sender == p.SERVER and m.op != "welcome"]
    for sender, receiver, batch in ((client, server, to_server), (server, client, to_client)):
        stream = b"".join(sender.send(m) for m in batch)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        got = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            receiver.receive_data(stream[a:b])
            got += receiver.events()
        assert len(got) == len(batch) and all(map(same, got, batch))


# ------------------------------------------------------------------- hypothesis: fuzz

#: Frames that get past the length prefix: random bodies, random msgpack, and
#: real ops with random fields, so the fuzz reaches every check, not only the header.
_FIELD_NAMES = sorted({name for schema in p.SCHEMAS.values() for name in schema})
_MAPS = st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=5), VALUES, max_size=5)
_OP_MAPS = st.builds(
    lambda op, rest: {"op": op, **rest},
    st.sampled_from(sorted(p.MESSAGE_TYPES)) | st.text(max_size=5),
    _MAPS,
)
_FRAMES = st.one_of(
    st.binary(max_size=64).map(raw),
    VALUES.map(frame),
    _OP_MAPS.map(frame),
    messages().map(lambda m: frame(m.to_wire())),
)
JUNK = st.one_of(
    st.binary(max_size=200),
    st.lists(_FRAMES | st.binary(max_size=8), max_size=6).map(b"".join),
)


def _feed_until_broken(conn: p.Connection, data: bytes, chunks: list[int]) -> None:
    """Feed ``data`` in the given chunk sizes, pulling events after each one;
    only RemoteProtocolError may come out, and then the connection stays broken."""
    pos = 0
    sizes = [*chunks, len(data)]
    try:
        for size in sizes:
            conn.receive_data(data[pos : pos + size])
            pos += size
            conn.events()
            if pos >= len(data):
                break
    except RemoteProtocolError:
        assert conn.broken
        with pytest.raises(RemoteProtocolError):
            conn.next_event()


@FUZZ
@given(JUNK, st.lists(st.integers(1, 16), max_size=20))
def test_fuzz_server_after_hello(data: bytes, chunks: list[int]) -> None:
    _feed_until_broken(server_ready(), data, chunks)


@FUZZ
@given(JUNK)
def test_fuzz_server_one_byte_at_a_time(data: bytes) -> None:
    _feed_until_broken(server_ready(), data, [1] * len(data))


@FUZZ
@given(JUNK, st.lists(st.integers(1, 16), max_size=20))
def test_fuzz_server_before_hello(data: bytes, chunks: list[int]) -> None:
    _feed_until_broken(p.Connection(p.SERVER), data, chunks)


@FUZZ
@given(JUNK, st.lists(st.integers(1, 16), max_size=20))
def test_fuzz_client_after_welcome(data: bytes, chunks: list[int]) -> None:
    _feed_until_broken(client_ready(), data, chunks)


def test_out_of_memory_decoding_is_not_a_bad_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    # A coordinator short of memory said "frame is not valid msgpack: " of a
    # good frame, and blamed the peer for it in its log.
    frame = p.encode(p.Report([[7, "idle", None, None]], {}, [], {}))

    def unpackb(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(p.msgpack, "unpackb", unpackb)
    with pytest.raises(MemoryError):
        p.decode_body(frame[4:], p.CLIENT)


def _frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        out.append(data[4:4 + size])
        data = data[4 + size:]
    return out


@FUZZ
@given(names=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=300),
       limit=st.integers(200, 2000))
def test_a_split_report_keeps_every_frame_within_the_limit_and_fills_them(
        names: list[str], limit: int) -> None:
    """However the entries fall (the four fields' headers growing from 1 to 3
    bytes past 15 entries included), no frame is over the limit; and the frames are
    filled, not one per entry once the first is full."""
    states = [[i, "idle", None, None] for i in range(len(names))]
    report = p.Report(states, {n: 1 for n in names}, names, {n: 0.5 for n in names})
    frames = _frames(p.encode_report(report, limit))
    assert all(len(body) <= limit for body in frames)
    got = [msgpack.unpackb(body) for body in frames]
    assert [n for f in got for n in f["ok"]] == names
    assert [row for f in got for row in f["states"]] == states
    assert {n: c for f in got for n, c in f["costs"].items()} == report.costs
    assert {n: c for f in got for n, c in f["failures"].items()} == report.failures
    # An entry is at most ~130 bytes here, so each full frame holds more than half the limit.
    total = sum(len(body) for body in frames)
    assert len(frames) <= 1 + 2 * total // limit


@FUZZ
@given(held=st.lists(st.tuples(st.text(max_size=30), st.integers(1, 2**40)), max_size=200),
       limit=st.integers(100, 3000))
def test_the_held_leases_that_fit_make_a_hello_within_the_limit(
        held: list[tuple[str, int]], limit: int) -> None:
    rows = [[name, lid, lid, "idle", None] for name, lid in held]
    hello = p.Hello(p.PROTOCOL_VERSION, 4242, "worker-1", rows)
    fits = p.held_that_fits(hello, limit)
    assert 0 <= fits <= len(rows)
    p.encode(p.Hello(hello.version, hello.pid, hello.name, rows[:fits]), limit)  # does not raise
    if fits < len(rows):  # and one more would not fit beside the headers' allowance
        more = p.encode(p.Hello(hello.version, hello.pid, hello.name, rows[:fits + 1]), 1 << 30)
        assert len(more) - 4 > limit - 10


def test_brief_keeps_to_its_limit() -> None:
    for value in ("x" * 1000, {f"key{i}": "v" * 70 for i in range(10)}, [[["deep"] * 9] * 9] * 9):
        assert len(p.brief(value)) <= 60
        assert len(p.brief(value, limit=20)) <= 20 and p.brief(value, limit=20).endswith("...")


def test_a_split_report_of_many_small_entries_is_never_over_the_limit() -> None:
    """Frames full of small entries, every field past 15 of them: each header
    is 3 bytes, not 1, and the room left for them must allow for it."""
    for n in (16, 40):
        names = [f"r{i}" for i in range(n)]
        states = [[i, "idle", None, None] for i in range(n)]
        report = p.Report(states, dict.fromkeys(names, 1), names, dict.fromkeys(names, 0.5))
        for limit in range(300, 700):
            frames = _frames(p.encode_report(report, limit))
            assert all(len(body) <= limit for body in frames), (n, limit)
