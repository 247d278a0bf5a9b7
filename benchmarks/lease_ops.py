"""Lease operations per second with 8 client processes against one coordinator.

Each client process loops ``lease = acquire(); release(lease)`` for a fixed time. One
loop is one acquire (a round trip) plus one release (fire-and-forget): **2 operations**.
The cap (64) is far above the 8 leases that can be held at once, so nobody waits for
capacity: this measures the coordinator's throughput. The peer is the raw msgpack
server of ``_raw`` driven the same way (request/reply + one-way frame = 2 operations),
i.e. the ceiling for this socket, loop and codec on this machine.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from ._common import (
    Settings,
    console,
    fmt_rate,
    fmt_ratio,
    median,
    report_skips,
    sharedpool_missing,
    table,
    verdict,
)
from ._raw import RawClient, RawServer

CLIENTS = 8
OPS_PER_LOOP = 2  # acquire + release
TARGET_OPS = 30_000
BATCH = 50
WARMUP = 200


Ops = tuple[Callable[[], Any], Callable[[Any], None], Callable[[], None]]


def _connect(kind: str, path: str) -> Ops:
    """(acquire, release, close) of one client session of ``kind``."""
    if kind == "raw":
        raw = RawClient(path)
        return (lambda: raw.acquire()["lease"]), raw.release, raw.close
    from sharedpool.client import Client

    client = Client(path)
    return (lambda: client.acquire("bench", timeout=5.0)), client.release, client.close


def _worker(kind: str, path: str, rounds: int, seconds: float, barrier: Any, out: Any) -> None:
    """One client process. Its session lives only for its fleet's rounds, so that idle
    sessions (and their background threads) never run beside the other fleet's window."""
    try:
        barrier.wait(timeout=120.0)  # imported; the parent starts the next fleet only now
        for r in range(rounds):
            barrier.wait(timeout=120.0)  # this fleet's turn: connect
            acquire, release, close = _connect(kind, path)
            for _ in range(WARMUP):
                release(acquire())
            barrier.wait(timeout=120.0)  # all connected and warm: go
            loops = 0
            t0 = perf_counter()
            deadline = t0 + seconds
            while True:
                for _ in range(BATCH):
                    release(acquire())
                loops += BATCH
                now = perf_counter()
                if now >= deadline:
                    break
            close()
            out.put((r, loops, now - t0))
    except BaseException as exc:  # reported by the parent
        out.put((-1, f"{type(exc).__name__}: {exc}", 0.0))
        barrier.abort()


class Fleet:
    """CLIENTS worker processes kept alive across rounds; one :meth:`round` = one window."""

    def __init__(self, kind: str, path: str, rounds: int, seconds: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.seconds = seconds
        self.barrier = ctx.Barrier(CLIENTS + 1)
        self.out = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(kind, path, rounds, seconds, self.barrier, self.out),
                        daemon=True)
            for _ in range(CLIENTS)
        ]
        for p in self.procs:
            p.start()
        try:
            self._start_together()  # returns once every client is connected and warmed up
        except BaseException:
            self.close()
            raise

    def _start_together(self) -> None:
        try:
            self.barrier.wait(timeout=120.0)
        except Exception:
            raise RuntimeError(self._error() or "client processes did not get ready") from None

    def round(self) -> float:
        """Run one window in all clients at once; operations per second, all clients summed."""
        self._start_together()  # connect and warm up
        self._start_together()  # go
        rate = 0.0
        for _ in range(CLIENTS):
            r, loops, elapsed = self.out.get(timeout=self.seconds + 60.0)
            if r < 0:
                raise RuntimeError(f"client process failed: {loops}")
            rate += OPS_PER_LOOP * loops / elapsed
        return rate

    def _error(self) -> str | None:
        try:
            r, msg, _ = self.out.get(timeout=1.0)
        except Exception:
            return None
        return str(msg) if r < 0 else None

    def close(self) -> None:
        self.barrier.abort()
        for p in self.procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)


@dataclass(frozen=True)
class Contender:
    name: str
    setup: Callable[[ExitStack, str, int, float], Fleet]
    sharedpool: bool = False


def _raw(stack: ExitStack, tmp: str, rounds: int, seconds: float) -> Fleet:
    path = f"{tmp}/raw.sock"
    stack.enter_context(RawServer(path))
    fleet = Fleet("raw", path, rounds, seconds)
    stack.callback(fleet.close)
    return fleet


def _sharedpool(stack: ExitStack, tmp: str, rounds: int, seconds: float) -> Fleet:
    from sharedpool import Coordinator, Resource

    path = f"{tmp}/coord.sock"
    coord = Coordinator(path, resources={"bench": Resource(max_size=64)})
    coord.start()
    stack.callback(coord.stop)
    fleet = Fleet("sharedpool", path, rounds, seconds)
    stack.callback(fleet.close)
    return fleet


SP = "sharedpool acquire+release"
RAW = "raw msgpack request+one-way"
CONTENDERS = [Contender(SP, _sharedpool, sharedpool=True), Contender(RAW, _raw)]


def run(settings: Settings) -> dict[str, Any]:
    seconds = settings.pick(0.5, 2.0)
    skipped: dict[str, str] = {}
    missing = sharedpool_missing()
    fleets: dict[str, Fleet] = {}
    per_round: dict[str, list[float]] = {}

    console.rule(f"[bold]Lease operations/s, {CLIENTS} client processes")
    console.print(
        f"{seconds:.1f}s per window, {settings.rounds} rounds; "
        f"one acquire + one release = {OPS_PER_LOOP} operations"
    )
    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        for c in CONTENDERS:
            if c.sharedpool and missing:
                skipped[c.name] = f"sharedpool not importable ({missing})"
                continue
            try:
                fleets[c.name] = c.setup(stack, tmp, settings.rounds, seconds)
            except Exception as exc:
                skipped[c.name] = f"set-up failed: {type(exc).__name__}: {exc}"
        for _ in range(settings.rounds):
            for name in list(fleets):
                try:
                    per_round.setdefault(name, []).append(fleets[name].round())
                except Exception as exc:
                    skipped[name] = f"failed: {type(exc).__name__}: {exc}"
                    fleets.pop(name).close()
                    per_round.pop(name, None)

    t = table(f"Operations/s, {CLIENTS} clients",
              ["contender", "per round", "median", "target", ""])
    checks: list[dict[str, Any]] = []
    for c in CONTENDERS:
        if c.name not in per_round:
            continue
        values = per_round[c.name]
        med = median(values)
        met = med >= TARGET_OPS if c.name == SP else None
        target = f">= {TARGET_OPS:,}" if c.name == SP else "-"
        t.add_row(c.name, " ".join(fmt_rate(v) for v in values), fmt_rate(med), target,
                  verdict(met))
    if SP in per_round and RAW in per_round:
        ratios = [s / r for s, r in zip(per_round[SP], per_round[RAW], strict=True)]
        t.add_row(f"{SP} / {RAW}", " ".join(f"{v:.2f}" for v in ratios), fmt_ratio(median(ratios)),
                  "-", verdict(None))
        checks.append({"check": f"{SP} / {RAW}", "per_round": ratios, "median": median(ratios)})
    if SP in per_round:
        med = median(per_round[SP])
        checks.append({"check": f"{SP} ops/s", "per_round": per_round[SP], "median": med,
                       "target": TARGET_OPS, "met": med >= TARGET_OPS})
    if per_round:
        console.print(t)
    report_skips(skipped)
    return {
        "unit": f"operations per second summed over {CLIENTS} client processes; "
        f"acquire + release = {OPS_PER_LOOP} operations",
        "seconds_per_window": seconds,
        "per_round": per_round,
        "median": {n: median(v) for n, v in per_round.items()},
        "checks": checks,
        "skipped": skipped,
    }
