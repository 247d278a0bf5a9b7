"""Helpers shared by the integration tests: the coordinator's lease count, and
running a function in forked children (multiprocessing, fork start method)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from sharedpool import Client


def leased(sock: str) -> int:
    c = Client(sock)
    try:
        return int(c.inspect("resources")["resources"][0]["leased"])
    finally:
        c.close()


def wait_leased(sock: str, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := leased(sock)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def run_forked(target: Callable[..., dict[str, Any]], *args: Any, n: int = 1) -> list[dict[str, Any]]:
    """Run ``target(*args)`` in ``n`` forked children; return what each returned."""
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(results, target, *args)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0] * n, out
    return out


def _child(results: Any, target: Callable[..., dict[str, Any]], *args: Any) -> None:
    try:
        results.put(target(*args))
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise


def resource_row(sock: str) -> dict[str, Any]:
    """The coordinator's row for its first resource."""
    c = Client(sock)
    try:
        return dict(c.inspect("resources")["resources"][0])
    finally:
        c.close()


def settled(sock: str) -> dict[str, Any] | None:
    """The resource row once no lease is in use, else None."""
    row = resource_row(sock)
    return row if row["in_use"] == 0 else None
