"""Fuzz a running coordinator with frames, then check that a normal client still works.

    python tests/fuzz_frames.py SOCKET [--frames 100000] [--seed 1]

Frames are a mix of: well-formed messages with random field values
(acquire / release / cancel / retime / report / inspect / admin with unknown
leases, requests, resources, verbs...), wrong types, unknown ops, truncated and oversized
frames, and raw random bytes. A malformed frame ends its session (I5); the
fuzzer then reconnects and goes on. At the end, a normal client must get a
lease and give it back, and the coordinator must still be the same process.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import sys
import time
from typing import Any

import msgpack

from sharedpool import Client, ResourceUnavailable
from sharedpool import protocol as p

_VALUES: list[Any] = [0, -1, 1, 2**40, 2**63 - 1, -(2**63), 1.5, float("inf"), "", "pg", "x" * 300,
                      None, True, [], {}, [1, "a"], {"k": 1}, b"\x00\xff"]


def _value(rnd: random.Random) -> Any:
    return rnd.choice(_VALUES)


def _wellformed(rnd: random.Random, req: int) -> bytes:
    choice = rnd.randrange(8)
    if choice == 7:  # mostly a req sent before (ignored), now and then one never sent (ends the session)
        msg: p.Message = p.Retime(rnd.randrange(0, req + 2), rnd.choice([0, 0.001, 5.0]))
    elif choice == 0:
        msg = p.Acquire(req, rnd.choice(["r", "nope", ""]), rnd.choice([0, 0.0, 0.001, None]))
    elif choice == 1:
        msg = p.Release(rnd.randrange(-5, 2**40))
    elif choice == 2:
        msg = p.Cancel(rnd.randrange(0, 1000))
    elif choice == 3:
        msg = p.Report([[rnd.randrange(100), rnd.choice(["idle", "busy", "zzz"]), None, None]],
                       {"r": rnd.randrange(3)}, rnd.choice([[], ["r"], ["nope"]]))
    elif choice == 4:
        msg = p.Inspect(req, rnd.choice(["resources", "sessions", "leases", "bogus"]), {})
    elif choice == 5:
        msg = p.Admin(req, rnd.choice(["frobnicate", "resize"]), {"resource": "nope", "max_size": -1})
    else:
        msg = p.Report([], {}, [])
    return p.encode(msg)


def _malformed(rnd: random.Random) -> bytes:
    choice = rnd.randrange(7)
    if choice == 0:  # random bytes
        return bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 64)))
    if choice == 1:  # oversized header
        return struct.pack(">I", p.DEFAULT_MAX_FRAME + rnd.randrange(1, 1000))
    if choice == 2:  # unknown op / wrong role
        body = msgpack.packb({"op": rnd.choice(["grant", "welcome", "zap", 7]), "req": 1})
    elif choice == 3:  # wrong field types
        body = msgpack.packb({"op": "acquire", "req": _value(rnd), "resource": _value(rnd)})
    elif choice == 4:  # not a map
        body = msgpack.packb([_value(rnd) for _ in range(3)])
    elif choice == 5:  # a retime with wrong types or a past / NaN deadline
        body = msgpack.packb({"op": "retime", "req": _value(rnd),
                              "timeout": rnd.choice([-1, -0.5, float("nan"), _value(rnd)])})
    else:  # garbage body with a right length
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 32)))
    return struct.pack(">I", len(body)) + body


def _session(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "fuzz")))
    return s


def _drain(s: socket.socket) -> bool:
    """Read what is there; False once the coordinator closed the session."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(1 << 16)
            if not data:
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def fuzz(path: str, frames: int, seed: int = 1, malformed_every: int = 100) -> dict[str, int]:
    rnd = random.Random(seed)
    sent = sessions = ended = 0
    s = _session(path)
    sessions += 1
    while sent < frames:
        bad = rnd.randrange(malformed_every) == 0
        data = _malformed(rnd) if bad else _wellformed(rnd, sent)
        if not bad and rnd.randrange(10) == 0 and len(data) > 4:  # a frame split in two writes
            cut = rnd.randrange(1, len(data))
            parts = [data[:cut], data[cut:]]
        else:
            parts = [data]
        try:
            for part in parts:
                s.sendall(part)
        except OSError:
            bad = True
        sent += 1
        if bad or sent % 200 == 0:
            alive = _drain(s) if not bad else False
            if bad:  # a malformed frame ends the session: read to its close, then reconnect
                # (random bytes may instead announce a long frame the coordinator
                # waits for; then we hang up ourselves)
                s.settimeout(0.2)
                try:
                    while s.recv(1 << 16):
                        pass
                except OSError:
                    pass
            if not alive:
                s.close()
                ended += 1
                s = _session(path)
                sessions += 1
    s.close()
    _wait_sessions_ended(path)
    return {"frames": sent, "sessions": sessions, "sessions_ended": ended}


def _wait_sessions_ended(path: str, timeout: float = 30.0) -> None:
    """Wait until the coordinator has ended every fuzz session. It reads each
    session in its own time, so right after we hang up the last ones may still
    be open there, a queued acquire of theirs still able to take a slot."""
    client = Client(path)
    try:
        deadline = time.monotonic() + timeout
        while any(s["name"] == "fuzz" for s in client.inspect("sessions")["sessions"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fuzz sessions still open at the coordinator after {timeout:g}s")
            time.sleep(0.05)
    finally:
        client.close()


def check_normal_client(path: str, timeout: float = 10.0) -> None:
    """A normal client gets a lease of "r" and gives it back. The fuzzer's
    well-formed reports of connect failures may have left "r" failing: the
    coordinator then says so (ResourceUnavailable) for a second, and a
    normal client tries again, as a pool would."""
    client = Client(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                lease = client.acquire("r", timeout=5)
                break
            except ResourceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client.release(lease)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    stats = fuzz(args.socket, args.frames, args.seed)
    check_normal_client(args.socket)
    print(f"{stats['frames']} frames over {stats['sessions']} sessions "
          f"({stats['sessions_ended']} ended by the coordinator) in {time.monotonic() - t0:.1f}s; "
          "a normal client still works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
