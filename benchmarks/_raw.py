"""The raw peer: a length-prefixed msgpack ping-pong over a Unix socket, nothing else.

Same framing as sharedpool's protocol (4-byte big-endian length + one msgpack map),
same loop (asyncio.Protocol, uvloop when installed), messages the size of an
acquire/grant, but no handshake, no ledger and no bookkeeping: what a lease round
trip would cost if the coordinator did no work at all. A frame whose ``op`` is
``release`` gets no answer, like sharedpool's fire-and-forget release.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")


def frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class _PingPong(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.next_lease = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, out = 0, []
        while len(buf) - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            end = pos + 4 + size
            if len(buf) < end:
                break
            msg = msgpack.unpackb(buf[pos + 4 : end], raw=False)
            pos = end
            if msg.get("op") == "release":
                continue
            self.next_lease += 1
            out.append(frame({"op": "grant", "req": msg.get("req"), "lease": self.next_lease,
                              "resource": msg.get("resource"), "token": self.next_lease}))
        del buf[:pos]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _serve(path: str, ready: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(_PingPong, path)
        ready.set()
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main())


class RawServer:
    """The ping-pong server in a child process; a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        ctx = multiprocessing.get_context("spawn")
        self._ready = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(path, self._ready), daemon=True)

    def __enter__(self) -> RawServer:
        self._proc.start()
        if not self._ready.wait(timeout=30.0):
            self.stop()
            raise RuntimeError("raw ping-pong server did not start within 30s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5.0)
        if os.path.exists(self.path):
            os.unlink(self.path)


class RawClient:
    """A blocking client: sendall one small map, recv until the whole reply is in."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = bytearray()
        self.req = 0

    def acquire(self) -> dict[str, Any]:
        self.req += 1
        msg = {"op": "acquire", "req": self.req, "resource": "bench", "timeout": 5.0, "site": None}
        self.sock.sendall(frame(msg))
        return self._read()

    def release(self, lease: int) -> None:
        self.sock.sendall(frame({"op": "release", "lease": lease}))

    def _read(self) -> dict[str, Any]:
        buf = self.buf
        while True:
            if len(buf) >= 4:
                (size,) = HEADER.unpack_from(buf, 0)
                if len(buf) >= 4 + size:
                    msg: dict[str, Any] = msgpack.unpackb(buf[4 : 4 + size], raw=False)
                    del buf[: 4 + size]
                    return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("raw server closed the socket")
            buf += chunk

    def close(self) -> None:
        self.sock.close()
