"""A session's last frames are read by the coordinator before it goes
(sharedpool.goodbye): a lease released just before close() is not fenced."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import pytest
from proc_helpers import resource_row

from sharedpool import Client


def test_a_lease_released_just_before_close_is_not_fenced(
        start_coordinator: Any, sock_path: str, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    # The coordinator read another session's acquire first and wrote a Reclaim
    # to the holder, whose socket was closed by then: EPIPE, and asyncio dropped
    # the session without reading its Release (fenced: "quarantined" in its log).
    # Each RQ work horse exiting as another waited hit this (about 1 run in 4 of
    # tests/test_rq.py). The coordinator is stopped so the frames meet in that order.
    caplog.set_level(logging.INFO, logger="sharedpool")  # the coordinator logs at this level
    coord = start_coordinator({"r": 1})
    assert coord.pid is not None
    holder, waiter = Client(sock_path), Client(sock_path)
    lease = holder.acquire("r", 5)
    waiter.inspect("server")  # its session is up before the coordinator stops
    got: list[Any] = []
    os.kill(coord.pid, signal.SIGSTOP)
    try:
        waiting = threading.Thread(target=lambda: got.append(waiter.acquire("r", 30)))
        waiting.start()
        time.sleep(0.2)  # its acquire is queued at the coordinator ahead of the release
        holder.release(lease)
        closing = threading.Thread(target=holder.close)
        closing.start()
        time.sleep(0.2)  # the holder's close has gone as far as it goes without the coordinator
    finally:
        os.kill(coord.pid, signal.SIGCONT)
    closing.join(10)
    waiting.join(30)
    assert got, "the waiter got no lease"
    assert resource_row(sock_path)["fenced"] == 0
    waiter.release(got[0])
    waiter.close()
    coord.stop()  # its log is ours once it has exited
    assert "quarantined" not in capfd.readouterr().err


def test_close_does_not_wait_for_a_stopped_coordinator_for_long(start_coordinator: Any,
                                                                 sock_path: str) -> None:
    coord = start_coordinator({"r": 1})
    assert coord.pid is not None
    client = Client(sock_path)
    client.inspect("server")
    os.kill(coord.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        client.close()
        took = time.monotonic() - t0
    finally:
        os.kill(coord.pid, signal.SIGCONT)
    assert took < 5, took  # GOODBYE_WAIT (1 s), then closed as before
