"""Local checkout cycles/s: sharedpool's fast path against psycopg_pool, SQLAlchemy and a floor.

Every pool hands out the same :class:`DummyConnection`, is already warm (8 connections
open; for sharedpool their leases are already held), and is measured with 1 and with 8
threads. Each contender lives in its own process (no one's threads or garbage tax
another). A round is ``slices`` short windows per contender, alternating A B C D, A B C
D, ...; a contender's figure for the round is its cycles over its time in all of them.
Each sharedpool figure is divided by its peers' figures of the same round; the headline
is the median of those per-round ratios.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any, cast

from psycopg.pq import TransactionStatus

from ._common import (
    Isolated,
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

POOL_SIZE = 8
THREADS = (1, 8)
BATCH = 200  # cycles between two looks at the clock

Loop = Callable[[int], None]


class _PgConn:
    """What psycopg_pool reads of ``conn.pgconn``: only the transaction status."""

    __slots__ = ("transaction_status",)

    def __init__(self) -> None:
        self.transaction_status = TransactionStatus.IDLE


_PGCONN = _PgConn()


class DummyConnection:
    """The connection every pool here hands out: no I/O, nothing but what pools touch.

    ``close``/``closed``/``broken`` for everybody, ``rollback`` for SQLAlchemy's
    reset-on-return, and ``pgconn``/``_pool``/``_created_at``/``_expire_at`` plus a
    no-op ``with`` block for psycopg_pool (read from its getconn/putconn/connection()).
    """

    __slots__ = ("closed", "broken", "pgconn", "_pool", "_created_at", "_expire_at")

    def __init__(self) -> None:
        self.closed = False
        self.broken = False
        self.pgconn = _PGCONN
        self._pool: Any = None
        self._created_at = 0.0
        self._expire_at = 0.0

    def close(self) -> None:
        self.closed = True

    def rollback(self) -> None:
        pass

    def __enter__(self) -> DummyConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def make_dummy() -> DummyConnection:
    return DummyConnection()


class FloorPool:
    """The floor: a deque and a Condition; acquire pops, release appends and notifies."""

    def __init__(self, size: int) -> None:
        self._idle = deque(make_dummy() for _ in range(size))
        self._cond = threading.Condition()

    def acquire(self, timeout: float = 10.0) -> DummyConnection:
        with self._cond:
            if not self._idle:
                deadline = monotonic() + timeout
                while not self._idle:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        raise TimeoutError("floor pool: no connection in time")
                    self._cond.wait(remaining)
            return self._idle.pop()

    def release(self, conn: DummyConnection) -> None:
        with self._cond:
            self._idle.append(conn)
            self._cond.notify()


# --------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    name: str
    api: str
    setup: Callable[[ExitStack, str | None], Loop]  # runs in the contender's own process
    sharedpool: bool = False


def _cm_loop(connection: Callable[[], Any]) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            with connection():
                pass

    return loop


def _pair_loop(get: Callable[[], Any], put: Callable[[Any], None]) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            put(get())

    return loop


def _psycopg_pool(stack: ExitStack) -> Any:
    import psycopg_pool

    class DummyPsycopgPool(psycopg_pool.ConnectionPool):  # type: ignore[type-arg]
        """psycopg_pool's own code, with ``_connect`` handing out a DummyConnection."""

        def _connect(self, timeout: float | None = None) -> Any:
            conn = make_dummy()
            conn._pool = self
            self._set_connection_expiry_date(conn)  # type: ignore[arg-type]
            return conn

    pool = DummyPsycopgPool(
        min_size=POOL_SIZE, max_size=POOL_SIZE, open=False, check=None, reset=None, timeout=10.0
    )
    pool.open(wait=True, timeout=10.0)
    stack.callback(pool.close)
    return pool


def _sharedpool_pool(stack: ExitStack, path: str | None) -> Any:
    from sharedpool import ConnectionPool, PoolConfig
    from sharedpool.client import Client

    assert path is not None
    stack.callback(lambda: Client.for_path(path).close())  # the process's session, last
    config = PoolConfig(min_size=0, max_size=POOL_SIZE, test_on_acquire=False)
    pool = ConnectionPool(make_dummy, config, resource="bench", coordinator=path)
    stack.callback(pool.close)
    # Open all 8 connections (8 lease round trips) so every checkout measured hits a
    # connection whose lease is already held.
    warm = [pool.acquire(timeout=10.0) for _ in range(POOL_SIZE)]
    for w in warm:
        pool.release(w)
    return pool


def _sp_with(stack: ExitStack, path: str | None) -> Loop:
    return _cm_loop(_sharedpool_pool(stack, path).connection)


def _sp_pair(stack: ExitStack, path: str | None) -> Loop:
    pool = _sharedpool_pool(stack, path)
    return _pair_loop(pool.acquire, pool.release)


def _pg_with(stack: ExitStack, path: str | None) -> Loop:
    return _cm_loop(_psycopg_pool(stack).connection)


def _pg_pair(stack: ExitStack, path: str | None) -> Loop:
    pool = _psycopg_pool(stack)
    return _pair_loop(pool.getconn, pool.putconn)


def _sa_pair(stack: ExitStack, path: str | None) -> Loop:
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(cast(Any, make_dummy), pool_size=POOL_SIZE, max_overflow=0, timeout=10.0)
    stack.callback(pool.dispose)
    warm = [pool.connect() for _ in range(POOL_SIZE)]
    for c in warm:
        c.close()
    connect = pool.connect

    def loop(n: int) -> None:
        for _ in range(n):
            connect().close()

    return loop


def _floor_pair(stack: ExitStack, path: str | None) -> Loop:
    pool = FloorPool(POOL_SIZE)
    return _pair_loop(pool.acquire, pool.release)


SP_WITH = "sharedpool connection()"
SP_PAIR = "sharedpool acquire/release"
PG_WITH = "psycopg_pool connection()"
PG_PAIR = "psycopg_pool getconn/putconn"
SA_PAIR = "SQLAlchemy QueuePool"
FLOOR = "floor deque+Condition"

CONTENDERS = [
    Contender(SP_WITH, "with pool.connection()", _sp_with, sharedpool=True),
    Contender(SP_PAIR, "w = acquire(); release(w)", _sp_pair, sharedpool=True),
    Contender(PG_WITH, "with pool.connection()", _pg_with),
    Contender(PG_PAIR, "getconn(); putconn(c)", _pg_pair),
    Contender(SA_PAIR, "pool.connect().close()", _sa_pair),
    Contender(FLOOR, "acquire(); release(c)", _floor_pair),
]
_BY_NAME = {c.name: c for c in CONTENDERS}

# (numerator, denominator, target: the numerator must be >= target x the denominator)
RATIOS: list[tuple[str, str, float | None]] = [
    (SP_WITH, PG_WITH, 2.0),
    (SP_PAIR, PG_PAIR, 1.5),
    (SP_PAIR, FLOOR, 0.6),
    (SP_WITH, SA_PAIR, None),
    (SP_PAIR, SA_PAIR, None),
    (PG_WITH, FLOOR, None),
    (PG_PAIR, FLOOR, None),
    (SA_PAIR, FLOOR, None),
]


# ----------------------------------------------------------------------- measuring


def measure(loop: Loop, seconds: float, threads: int) -> tuple[int, float]:
    """(cycles, elapsed seconds) of ``loop`` run by ``threads`` threads for ``seconds``."""
    gc.collect()
    loop(BATCH)
    if threads == 1:
        count = 0
        t0 = perf_counter()
        deadline = t0 + seconds
        while True:
            loop(BATCH)
            count += BATCH
            now = perf_counter()
            if now >= deadline:
                return count, now - t0

    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1, timeout=30.0)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            start = perf_counter()
            n = 0
            while perf_counter() - start < seconds:
                loop(BATCH)
                n += BATCH
            counts[i] = n
        except BaseException as exc:  # reported by the calling thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = perf_counter()
    for t in pool:
        t.join(timeout=seconds + 30.0)
    elapsed = perf_counter() - t0
    if any(t.is_alive() for t in pool):
        raise RuntimeError(f"a thread did not finish within {seconds + 30.0:.0f}s (deadlock?)")
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def _isolated_setup(stack: ExitStack, arg: tuple[str, str | None]) -> Callable[..., Any]:
    name, path = arg
    loop = _BY_NAME[name].setup(stack, path)
    return lambda seconds, threads: measure(loop, seconds, threads)


def _coordinator(stack: ExitStack) -> str:
    from sharedpool import Coordinator, Resource

    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    stack.callback(shutil.rmtree, tmp, True)
    path = f"{tmp}/coord.sock"
    coord = Coordinator(path, resources={"bench": Resource(max_size=64)})
    coord.start()
    stack.callback(coord.stop)
    return path


PerRound = dict[str, dict[int, list[float]]]


def _ratios(per_round: PerRound, num: str, den: str, threads: int) -> list[float]:
    a, b = per_round.get(num, {}).get(threads, []), per_round.get(den, {}).get(threads, [])
    return [x / y for x, y in zip(a, b, strict=True)] if a and len(a) == len(b) else []


def _measure_rounds(settings: Settings, skipped: dict[str, str]) -> PerRound:
    slices = int(settings.pick(3, 6))
    slice_s = settings.pick(0.05, 0.1)
    per_round: PerRound = {}
    missing = sharedpool_missing()
    with ExitStack() as stack:
        path: str | None = None
        if not missing:
            try:
                path = _coordinator(stack)
            except Exception as exc:
                missing = f"coordinator did not start: {type(exc).__name__}: {exc}"
        workers: dict[str, Isolated] = {}
        for c in CONTENDERS:
            if c.sharedpool and missing:
                skipped[c.name] = f"sharedpool not usable ({missing})"
                continue
            workers[c.name] = w = Isolated(_isolated_setup, (c.name, path))
            stack.callback(w.close)
        for name, w in list(workers.items()):
            try:
                w.ready()
            except Exception as exc:
                skipped[name] = f"set-up failed: {exc}"
                del workers[name]
        for _ in range(settings.rounds):
            totals: dict[tuple[str, int], list[float]] = {}
            for _ in range(slices):
                for threads in THREADS:
                    for name in list(workers):
                        try:
                            n, secs = workers[name].call(slice_s, threads, timeout=60.0)
                        except Exception as exc:
                            skipped[name] = f"failed: {exc}"
                            del workers[name]
                            per_round.pop(name, None)
                            continue
                        acc = totals.setdefault((name, threads), [0.0, 0.0])
                        acc[0] += n
                        acc[1] += secs
            for (name, threads), (n, secs) in totals.items():
                if name in workers:
                    per_round.setdefault(name, {}).setdefault(threads, []).append(n / secs)
    return per_round


def run(settings: Settings) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    console.rule("[bold]Local checkout cycles/s")
    console.print(
        f"pool size {POOL_SIZE}, threads {THREADS}, {settings.rounds} rounds of "
        f"{int(settings.pick(3, 6))} alternating windows of {settings.pick(0.05, 0.1):.2f}s "
        "per contender; each contender in its own process"
    )
    per_round = _measure_rounds(settings, skipped)

    rates = table(
        f"Checkout cycles/s, median of {settings.rounds} rounds",
        ["contender", "API", *(f"{t} thread{'s' if t > 1 else ''}" for t in THREADS)],
    )
    for c in CONTENDERS:
        if c.name in per_round:
            figs = [fmt_rate(median(per_round[c.name].get(t, []))) for t in THREADS]
            rates.add_row(c.name, c.api, *figs)
    if per_round:
        console.print(rates)

    ratio_rows: list[dict[str, Any]] = []
    rt = table(
        "Ratios, computed within each round",
        ["ratio", "threads", "per round", "median", "target", ""],
    )
    for num, den, target in RATIOS:
        for threads in THREADS:
            values = _ratios(per_round, num, den, threads)
            if not values:
                continue
            med = median(values)
            met = None if target is None else med >= target
            ratio_rows.append(
                {"ratio": f"{num} / {den}", "threads": threads, "per_round": values,
                 "median": med, "target": target, "met": met}
            )
            rt.add_row(
                f"{num} / {den}", str(threads), " ".join(f"{v:.2f}" for v in values),
                fmt_ratio(med), "-" if target is None else f">= {target}x", verdict(met),
            )
    if ratio_rows:
        console.print(rt)
    report_skips(skipped)
    return {
        "unit": "checkout cycles per second (checkout + checkin = 1 cycle)",
        "pool_size": POOL_SIZE,
        "per_round": {n: {str(t): v for t, v in by_t.items()} for n, by_t in per_round.items()},
        "median": {
            n: {str(t): median(v) for t, v in by_t.items()} for n, by_t in per_round.items()
        },
        "ratios": ratio_rows,
        "skipped": skipped,
    }
