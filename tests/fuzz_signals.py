"""Fuzz sharedpool's integrations with asynchronous exceptions (a SIGALRM
handler that raises, as celery's soft time limit or gunicorn's SIGTERM do),
then check that nothing leaked.

    python tests/fuzz_signals.py {core,psycopg,sqlalchemy,redis} [--threads 2] [--seconds 20] [--seed 1]

The main thread runs checkout/query/checkin loops with a one-shot
``ITIMER_REAL`` of a random small interval armed each time; the handler raises
``Interrupted`` wherever the main thread happens to be, the loop counts where
it landed (the innermost sharedpool frame) and goes on. Other threads run the
same loop uninterrupted. The coordinator's cap is below the threads, and
connections expire fast, so waits, opens and closes are all on the way.
At the end (exit status 1 on failure): the pool checks out again within a
bound; nothing is in use; the pool's leases, the coordinator's leases of
this process and the server's backends (by this run's application/client
name) agree; ``release_process()`` leaves no lease and no backend.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from sharedpool import Client, Coordinator, Resource, release_process

PG = os.environ.get("SHAREDPOOL_TEST_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
REDIS = ("127.0.0.1", 6379)
LIB = os.path.dirname(os.path.abspath(__import__("sharedpool").__file__))


class Interrupted(Exception):
    """Raised by the SIGALRM handler wherever the main thread is."""


#: More shots this iteration: each handler call arms the next one (a second
#: signal lands in the cleanup of the first: Ctrl-C twice, a resent SIGTERM).
_SHOTS = [0, 3000]


def _arm(shots: int) -> None:
    _SHOTS[0] = shots - 1
    signal.setitimer(signal.ITIMER_REAL, random.randint(1, _SHOTS[1]) / 1e6)


def _on_alarm(signum: int, frame: Any) -> None:
    if _SHOTS[0] > 0:
        _arm(_SHOTS[0])
    raise Interrupted


def landing(exc: BaseException) -> str:
    """Where the exception landed: the innermost sharedpool frame (or the innermost one)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(LIB)]
    f = (ours or frames)[-1]
    return f"{os.path.relpath(f.filename, LIB)}:{f.lineno} {f.name}"


class Target:
    """One integration: a checkout/query/checkin and the pool's own counts."""

    run: Callable[[], object]
    in_use: Callable[[], int]
    held: Callable[[], int]  # leases the pool counts as held
    close: Callable[[], None]
    recover: Callable[[], None] | None = None  # check in what an interrupt stranded (alone only)
    closing: Callable[[], int] = staticmethod(lambda: 0)  # type: ignore[assignment]  # closes not yet done


def make_target(kind: str, sock: str, app: str, threads: int) -> Target:
    t = Target()
    if kind == "core":
        from sharedpool import ConnectionPool, PoolConfig
        dsn = f"{PG} application_name={app}"
        core = ConnectionPool(lambda: psycopg.connect(dsn, autocommit=True),
                              PoolConfig(min_size=0, max_size=threads, acquire_timeout=10, max_lifetime=0.05,
                                         validation_bypass=0.0),
                              resource="pg", coordinator=sock)

        def run_core() -> None:
            with core.connection() as conn:
                conn.execute("SELECT 1")
        t.run, t.in_use, t.close = run_core, core.get_in_use, core.close
        t.held = lambda: core.get_stats()["leases_held"]

        def recover() -> None:
            for w in list(core._all.values()):
                if w.in_use:
                    core.release_after_error(w)
        t.recover = recover
        t.closing = lambda: core.get_stats()["leases_closing"] + core._closing
    elif kind == "psycopg":
        from sharedpool.contrib.psycopg import ConnectionPool as PsycoPool
        pp: Any = PsycoPool(PG, resource="pg", coordinator=sock, min_size=0, max_size=threads, timeout=10,
                            max_lifetime=0.05, kwargs={"application_name": app, "autocommit": True},
                            open=True)

        def run_pp() -> None:
            with pp.connection() as conn:
                conn.execute("SELECT 1")
        t.run, t.close = run_pp, pp.close
        t.in_use = lambda: pp.get_stats()["pool_size"] - pp.get_stats()["pool_available"]
        t.held = lambda: pp.lease_book.stats()["leases_held"]
    elif kind == "sqlalchemy":
        from sqlalchemy import text

        from sharedpool.contrib.sqlalchemy import create_engine
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        engine = create_engine(url, resource="pg", coordinator=sock, pool_size=threads, max_overflow=0,
                               pool_timeout=10, pool_recycle=1, connect_args={"application_name": app})

        def run_sa() -> None:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                if random.random() < 0.05:
                    conn.invalidate()  # a close and a reopen on the way
        t.run, t.close = run_sa, engine.dispose
        t.in_use = lambda: engine.pool.checkedout()  # type: ignore[attr-defined]
        t.held = lambda: engine.pool.lease_stats()["leases_held"]  # type: ignore[attr-defined]
    elif kind == "redis":
        from sharedpool.contrib.redis import BlockingConnectionPool
        rp = BlockingConnectionPool(host=REDIS[0], port=REDIS[1], client_name=app, resource="redis",
                                    coordinator=sock, max_connections=threads, timeout=10)
        r = redis.Redis(connection_pool=rp)

        def run_redis() -> None:
            r.ping()
            if random.random() < 0.05:
                with _redis_dropped(rp):
                    pass
        t.run, t.close = run_redis, rp.disconnect
        # redis-py's BlockingConnectionPool: the idle ones are the queue's non-None items.
        t.in_use = lambda: len(rp._connections) - sum(1 for c in list(rp.pool.queue) if c is not None)
        t.held = lambda: rp.lease_stats()["leases_held"]
    else:
        raise SystemExit(f"unknown integration {kind!r}")
    return t


class _redis_dropped:  # noqa: N801 - a context manager used as a statement
    """Check out a connection and disconnect it before the checkin (a close, then a reopen)."""

    def __init__(self, rp: Any) -> None:
        self.rp = rp

    def __enter__(self) -> None:
        self.conn = self.rp.get_connection()
        self.conn.disconnect()

    def __exit__(self, *exc: object) -> None:
        self.rp.release(self.conn)


def backends(kind: str, app: str) -> int:
    if kind == "redis":
        r = redis.Redis(host=REDIS[0], port=REDIS[1])
        try:
            return sum(1 for c in r.client_list() if c.get("name") == app)
        finally:
            r.close()
    with psycopg.connect(PG, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (app,)).fetchone()
        return int(row[0]) if row else -1


def coordinator_leases(sock: str) -> int:
    c = Client(sock, name="fuzz-watch")
    try:
        return len([x for x in c.inspect("leases")["leases"] if x["pid"] == os.getpid()])
    finally:
        c.close()


def counts(target: Target, sock: str, kind: str, app: str) -> tuple[int, int, int]:
    """Leases the pool holds, the coordinator's leases of this process, the server's backends."""
    return target.held(), coordinator_leases(sock), backends(kind, app)


def settle(read: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not ok(value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-us", type=int, default=3000, help="longest timer interval, microseconds")
    ap.add_argument("--check-each", action="store_true", help="alone: counts checked after each interrupt")
    ap.add_argument("--shots", type=int, default=1, help="interrupts per iteration at most")
    args = ap.parse_args()
    random.seed(args.seed)
    _SHOTS[1] = args.max_us
    faulthandler.dump_traceback_later(args.seconds + 90, exit=True)  # a hang: where every thread is
    tmp = tempfile.mkdtemp(prefix="sigfuzz-")
    sock = os.path.join(tmp, "sp.sock")
    app = f"sp-sigfuzz-{uuid.uuid4().hex[:8]}"
    res = "redis" if args.kind == "redis" else "pg"
    coord = Coordinator(sock, {res: Resource(max_size=max(1, args.threads - 1), acquire_timeout=10)}).start()
    failures: list[str] = []
    landed: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    stranded: collections.Counter[str] = collections.Counter()
    try:
        target = make_target(args.kind, sock, app, args.threads)
        stop = threading.Event()

        def now_counts() -> tuple[int, int, int]:
            return counts(target, sock, args.kind, app)

        def agree(c: tuple[int, int, int]) -> bool:
            return c[0] == c[1] == c[2]

        def worker() -> None:
            while not stop.is_set():
                try:
                    target.run()
                except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
                    errors[f"worker {type(exc).__name__}: {exc}"[:160]] += 1

        others = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads - 1)]
        for th in others:
            th.start()
        old = signal.signal(signal.SIGALRM, _on_alarm)
        interrupts = 0
        end = time.monotonic() + args.seconds
        last = last_tb = ""
        try:
            while time.monotonic() < end:
                try:
                    try:
                        _arm(args.shots)
                        target.run()
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    except Interrupted as exc:
                        interrupts += 1
                        last = landing(exc)
                        last_tb = "".join(traceback.format_exception(exc)[-8:])
                        landed[last] += 1
                    except Exception as exc:  # noqa: BLE001 - counted with where it came from
                        signal.setitimer(signal.ITIMER_REAL, 0)
                        errors[f"main {type(exc).__name__}: {str(exc)[:100]} at {landing(exc)}"] += 1
                    _SHOTS[0] = 0
                    signal.setitimer(signal.ITIMER_REAL, 0)  # a signal pending is handled as this returns
                except Interrupted:  # landed after the disarm's call returned, or a later shot
                    _SHOTS[0] = 0
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    landed["<in the fuzz loop itself>"] += 1
                if args.threads == 1 and target.in_use():
                    # Alone: nothing should be in use now. Said with the spot.
                    if settle(target.in_use, lambda n: n == 0, 2.0):
                        stranded[last] += 1
                        if target.recover is None or stranded[last] == 1:
                            print(f"in use after an interrupt at {last}:\n{last_tb}", flush=True)
                        if target.recover is None:
                            failures.append(f"in use after an interrupt at {last}")
                            break
                        target.recover()
                    if args.check_each and last:
                        c = settle(now_counts, agree, 4.0)
                        if not c[0] == c[1] == c[2]:
                            print(f"counts {c} (pool, coordinator, backends) after an interrupt at {last}:\n"
                                  f"{last_tb}", flush=True)
                            failures.append(f"counts differ after an interrupt at {last}")
                            break
                        last = ""
                    if settle(target.closing, lambda n: n == 0, 4.0):
                        stranded[f"close never done: {last}"] += 1
                        print(f"a close never done after an interrupt at {last}:\n{last_tb}", flush=True)
                        failures.append("close never done")
                        break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            stop.set()
            for th in others:
                th.join(30)
            stuck = [th for th in others if th.is_alive()]
            if stuck:
                failures.append(f"{len(stuck)} worker threads stuck (deadlock?)")
        print(f"{args.kind}: {interrupts} interrupts in {args.seconds}s, {args.threads} threads", flush=True)
        done = threading.Event()

        def again() -> None:
            try:
                target.run()
            except BaseException as exc:  # noqa: BLE001 - reported
                failures.append(f"checkout after the fuzz failed: {exc!r}")
            done.set()

        threading.Thread(target=again, daemon=True).start()
        if not done.wait(20):
            failures.append("checkout after the fuzz hangs (deadlock?)")
        in_use = settle(target.in_use, lambda n: n == 0)
        if in_use:
            failures.append(f"in use at rest: {in_use}")
        held, leases, servers = settle(now_counts, agree)
        print(f"at rest: pool holds {held} leases, coordinator {leases}, server backends {servers}")
        if not held == leases == servers:
            failures.append(f"counts differ: pool {held}, coordinator {leases}, backends {servers}")
        release_process(5.0)
        leases, servers = settle(lambda: now_counts()[1:], lambda c: c == (0, 0))
        if (leases, servers) != (0, 0):
            failures.append(f"after release_process: {leases} leases, {servers} backends")
        target.close()
    finally:
        coord.stop()
    for where, n in landed.most_common(25):
        print(f"  {n:6d}  {where}")
    print(f"  ({len(landed)} distinct spots)")
    for what, n in errors.most_common(10):
        print(f"  error x{n}: {what}")
    for where, n in stranded.items():
        print(f"STRANDED x{n} by an interrupt at {where}")
        failures.append(f"stranded at {where}")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
