"""Lease round trip latency: ``Client.acquire`` against a raw msgpack ping-pong.

One sample is one blocking request/reply, timed from before the send to after the
decoded reply: for sharedpool ``client.acquire("bench")`` (the lease round trip),
for the peer ``sendall`` + ``recv`` of one acquire-sized map. Each sample is followed,
untimed, by the release (sharedpool: fire-and-forget; the peer sends a one-way frame
too), so both servers see the same traffic.

Each client runs in its own process; the servers (coordinator, raw ping-pong) are
children of this one. The contenders alternate in blocks of ``BLOCK`` samples within
each round (each block after a few untimed warm-up trips), and the p50 ratio is taken
per round, then the median. sharedpool's idle client keeps its background thread (it
wakes every few ms) during the raw blocks: a small tax on the peer, not on sharedpool.

Two regimes: client and servers pinned to **one CPU**, where a round trip is two
context switches plus the software on both ends (stable; what our code costs), and
**unpinned**, where the scheduler may put client and server on different CPUs and a
cross-CPU wake-up (on a VM, tens of µs) joins the figure (what a user sees, noisier).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from time import perf_counter, perf_counter_ns
from typing import Any

from ._common import (
    Isolated,
    Settings,
    Setup,
    child_pids,
    console,
    fmt_ratio,
    median,
    percentile,
    pin,
    report_skips,
    sharedpool_missing,
    table,
    verdict,
)
from ._raw import RawClient, RawServer, loop_name

P50_RATIO_TARGET = 1.4
P99_TARGET_US = 150.0
BLOCK = 100
BLOCK_WARMUP = 5


@dataclass(frozen=True)
class Contender:
    name: str
    serve: Callable[[ExitStack, str], str]  # here: start the server, return its socket path
    client: Setup  # in the contender's own process: (stack, path) -> sample(n)
    sharedpool: bool = False


def _sampler(once: Callable[[], int]) -> Callable[[int], list[float]]:
    def sample(n: int) -> list[float]:
        for _ in range(BLOCK_WARMUP):
            once()
        return [once() / 1000.0 for _ in range(n)]

    for _ in range(200):  # connect, start any background thread, warm the caches
        once()
    return sample


def _raw_serve(stack: ExitStack, tmp: str) -> str:
    path = f"{tmp}/raw.sock"
    stack.enter_context(RawServer(path))
    return path


def _raw_client(stack: ExitStack, path: str) -> Callable[[int], list[float]]:
    client = RawClient(path)
    stack.callback(client.close)

    def once() -> int:
        t0 = perf_counter_ns()
        reply = client.acquire()
        t1 = perf_counter_ns()
        client.release(reply["lease"])
        return t1 - t0

    return _sampler(once)


def _sp_serve(stack: ExitStack, tmp: str) -> str:
    from sharedpool import Coordinator, Resource

    path = f"{tmp}/coord.sock"
    coord = Coordinator(path, resources={"bench": Resource(max_size=64)})
    coord.start()
    stack.callback(coord.stop)
    return path


def _sp_client(stack: ExitStack, path: str) -> Callable[[int], list[float]]:
    from sharedpool.client import Client

    client = Client(path)
    stack.callback(client.close)

    def once() -> int:
        t0 = perf_counter_ns()
        lease = client.acquire("bench", timeout=5.0)
        t1 = perf_counter_ns()
        client.release(lease)
        return t1 - t0

    return _sampler(once)


RAW = "raw msgpack ping-pong"
SP = "sharedpool Client.acquire"
CONTENDERS = [
    Contender(SP, _sp_serve, _sp_client, sharedpool=True),
    Contender(RAW, _raw_serve, _raw_client),
]


def _one_round(clients: dict[str, Isolated], count: int, seconds: float) -> dict[str, list[float]]:
    """Blocks of BLOCK samples per contender, alternating, until ``count`` each or timeout."""
    us: dict[str, list[float]] = {name: [] for name in clients}
    deadline = perf_counter() + seconds
    while perf_counter() < deadline and min(len(v) for v in us.values()) < count:
        for name, client in clients.items():
            us[name].extend(client.call(BLOCK, timeout=60.0))
    for v in us.values():
        v.sort()
    return us


def _targets(label: str, rounds: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    ratios = [s["p50"] / r["p50"] for s, r in zip(rounds[SP], rounds[RAW], strict=True)]
    p99s = [r["p99"] for r in rounds[SP]]
    return [
        {"regime": label, "check": "p50 sharedpool / raw", "per_round": ratios,
         "median": median(ratios), "target": f"<= {P50_RATIO_TARGET}x",
         "met": median(ratios) <= P50_RATIO_TARGET},
        {"regime": label, "check": "p99 sharedpool (µs)", "per_round": p99s,
         "median": median(p99s), "target": f"<= {P99_TARGET_US:.0f} µs",
         "met": median(p99s) <= P99_TARGET_US},
    ]


def run(settings: Settings) -> dict[str, Any]:
    count = int(settings.pick(1_000, 5_000))
    seconds = settings.pick(3.0, 10.0)
    skipped: dict[str, str] = {}
    missing = sharedpool_missing()
    home = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    regimes: dict[str, set[int] | None] = {"unpinned": None}
    if home:
        regimes = {f"one CPU (cpu {min(home)})": {min(home)}, **regimes}
    results: dict[str, dict[str, list[dict[str, float]]]] = {r: {} for r in regimes}

    console.rule("[bold]Lease round trip latency")
    console.print(
        f"{count} samples per contender per round (max {seconds:.0f}s), blocks of {BLOCK} "
        f"alternating, {settings.rounds} rounds per regime, each client in its own process, "
        f"raw server on {loop_name()}"
    )
    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        clients: dict[str, Isolated] = {}
        pids: list[int] = []
        for c in CONTENDERS:
            if c.sharedpool and missing:
                skipped[c.name] = f"sharedpool not importable ({missing})"
                continue
            before = child_pids()
            try:
                path = c.serve(stack, tmp)
            except Exception as exc:
                skipped[c.name] = f"server did not start: {type(exc).__name__}: {exc}"
                continue
            pids += child_pids() - before
            clients[c.name] = w = Isolated(c.client, path)
            stack.callback(w.close)
        for name, w in list(clients.items()):
            try:
                w.ready()
                pids.append(w.pid)
            except Exception as exc:
                skipped[name] = f"set-up failed: {exc}"
                del clients[name]
        try:
            for regime, cpus in regimes.items():
                if clients and not pin(pids, cpus or home):
                    skipped[regime] = "could not set CPU affinity"
                    continue
                for _ in range(settings.rounds if clients else 0):
                    try:
                        us = _one_round(clients, count, seconds)
                    except Exception as exc:
                        skipped["round trip"] = f"failed: {type(exc).__name__}: {exc}"
                        break
                    for name, v in us.items():
                        results[regime].setdefault(name, []).append(
                            {"n": len(v), "p50": percentile(v, 0.50), "p99": percentile(v, 0.99)}
                        )
        finally:
            pin(pids, home)

    t = table(
        f"Round trip, µs: median over {settings.rounds} rounds of each round's percentile",
        ["regime", "contender", "p50", "p99", "samples/round"],
    )
    checks: list[dict[str, Any]] = []
    for regime, rounds in results.items():
        for c in CONTENDERS:
            if c.name in rounds:
                rs = rounds[c.name]
                t.add_row(regime, c.name, f"{median([r['p50'] for r in rs]):.1f}",
                          f"{median([r['p99'] for r in rs]):.1f}", f"{min(r['n'] for r in rs):.0f}")
        if SP in rounds and RAW in rounds:
            checks += _targets(regime, rounds)
    if any(results.values()):
        console.print(t)
    if checks:
        ct = table("Targets", ["regime", "check", "per round", "median", "target", ""])
        for ch in checks:
            ratio = ch["check"].startswith("p50")
            ct.add_row(ch["regime"], ch["check"],
                       " ".join(f"{v:.2f}" if ratio else f"{v:.0f}" for v in ch["per_round"]),
                       fmt_ratio(ch["median"]) if ratio else f"{ch['median']:.1f}",
                       ch["target"], verdict(ch["met"]))
        console.print(ct)
    report_skips(skipped)
    return {
        "unit": "microseconds per acquire round trip",
        "raw_server_loop": loop_name(),
        "per_round": results,
        "checks": checks,
        "skipped": skipped,
    }
