"""Fleets of worker processes running query loops against PostgreSQL for a bounded window.

Shared by ``fairness``, ``pgbouncer`` and ``skew``. A fleet is a list of :class:`Proc`
specs; each becomes one forked process (forked while this process has no thread and
no connection open) with ``threads`` threads looping ``checkout -> query -> checkin
[-> think]``. All processes set up (direct connections are opened here), report
ready, then run the same window: ``warmup`` seconds not counted, ``seconds`` counted.
A sampler thread counts the run's backends in ``pg_stat_activity`` meanwhile.
Every process is joined, and killed by pid if it does not end in time.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
SETUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Proc:
    """One worker process. ``mode``: "direct" (one psycopg connection per thread),
    "pool" (sharedpool ConnectionPool; coordinated when the fleet has a socket,
    standalone otherwise), "psycopg_pool" (a fixed psycopg_pool of ``max_size``)
    or "turns" (one thread; ``groups`` groups of processes take turns of ``turn``
    seconds by the clock, this one in group ``group``, a new connection per turn)."""

    mode: str
    threads: int = 1
    max_size: int = 1
    think: float = 0.0  # seconds between two queries of a thread, outside the connection
    jitter: bool = False  # think uniformly in [0.5, 1.5] x think
    query: str = "SELECT 1"
    dsn: str = DSN
    role: str = "worker"
    turn: float = 1.0
    group: int = 0
    groups: int = 1


@dataclass
class FleetResult:
    seconds: float
    procs: list[dict[str, Any]]
    pg_peak: int = 0
    samples: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    load: float = 0.0  # 1-minute load average at the end of the window (others' work included)
    busy_before: float = 0.0  # other runnable tasks just before the run (see wait_quiet)
    #: the coordinator's resource row, probed mid-window (sharedpool fleets), e.g. fairness_quantum_s
    resource: dict[str, Any] = field(default_factory=dict)

    def rate(self, role: str | None = None) -> float:
        return sum(p["count"] for p in self.procs if role in (None, p["role"])) / self.seconds

    def spread(self, role: str | None = None) -> float:
        """Slowest process's queries over the fastest's (1.0 is perfectly even)."""
        counts = [p["count"] for p in self.procs if role in (None, p["role"])]
        return min(counts) / max(counts) if counts and max(counts) else 0.0

    def max_gap(self) -> float:
        return max((p["max_gap"] for p in self.procs), default=0.0)

    def connects(self) -> int:
        return sum(p["connects"] for p in self.procs)


def new_app(kind: str) -> str:
    """A unique ``application_name`` for one run."""
    return f"sp-bench-{kind}-{uuid.uuid4().hex[:8]}"


def pg_missing(dsn: str = DSN) -> str | None:
    """None if PostgreSQL answers at ``dsn``; else why not."""
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure means: skip, and say why
        return f"{type(exc).__name__}: {exc}".strip()
    return None


@contextlib.contextmanager
def coordinator(cap: int, **limits: Any) -> Iterator[str]:
    """A coordinator with one resource ``"pg"`` of ``cap``; yields its socket path."""
    from sharedpool import Coordinator, Resource

    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    path = os.path.join(tmp, "coord.sock")
    coord = Coordinator(path, {"pg": Resource(max_size=cap, **limits)}).start()
    try:
        yield path
    finally:
        coord.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def resource_row(sock: str, name: str = "pg") -> dict[str, Any]:
    """The coordinator's row for resource ``name`` ({} if it cannot be had)."""
    from sharedpool import Client
    from sharedpool.errors import SharedPoolError

    client = Client(sock)
    try:
        rows = client.inspect("resources")["resources"]
    except (OSError, SharedPoolError):  # a figure less, not a failed run
        return {}
    finally:
        client.close()
    return next((r for r in rows if r.get("name") == name), {})


class _Turns:
    """Turn-taking with no coordinator at all: the clock says whose turn it is,
    and each turn opens a new connection. What moving slots by reconnecting
    costs by itself: no messages, no waiting, no confirmed close (so at a turn's
    end PostgreSQL may briefly count one backend more than the cap: the old one
    is still exiting)."""

    def __init__(self, connect: Callable[[], Any], spec: Proc, window: Any) -> None:
        self.connect, self.spec, self.window = connect, spec, window
        self.conn: Any = None
        self.turn_end = 0.0
        self.connects = 0

    def checkout(self, i: int) -> Any:
        now = time.monotonic()
        if self.conn is not None and now >= self.turn_end:
            self.conn.close()
            self.conn = None
        if self.conn is None:
            turn, groups = self.spec.turn, self.spec.groups
            k = math.floor((now - self.window[0]) / turn)
            wait = (self.spec.group - k) % groups  # turns until ours
            if wait:
                time.sleep(max(0.0, self.window[0] + (k + wait) * turn - now))
                k += wait
            self.turn_end = self.window[0] + (k + 1) * turn
            self.conn = self.connect()
            self.connects += 1
        return contextlib.nullcontext(self.conn)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _setup(spec: Proc, sock: str | None, app: str, window: Any) -> tuple[
        Callable[[int], Any], Callable[[], int], Callable[[], None]]:
    """(checkout(thread index) -> context manager, connects so far, close)."""
    import psycopg

    kwargs: dict[str, Any] = {"autocommit": True, "application_name": app, "prepare_threshold": None}

    def connect() -> Any:
        return psycopg.connect(spec.dsn, connect_timeout=10, **kwargs)

    if spec.mode == "direct":
        conns = [connect() for _ in range(spec.threads)]

        def close_all() -> None:
            for c in conns:
                c.close()

        return (lambda i: contextlib.nullcontext(conns[i])), (lambda: len(conns)), close_all
    if spec.mode == "turns":
        turns = _Turns(connect, spec, window)
        return turns.checkout, (lambda: turns.connects), turns.close
    if spec.mode == "pool":
        from sharedpool import ConnectionPool, PoolConfig

        if sock is None:
            os.environ.pop("SHAREDPOOL_SOCKET", None)  # standalone: really no coordinator
        pool = ConnectionPool(connect, PoolConfig(min_size=0, max_size=spec.max_size),
                              resource="pg", coordinator=sock)
        return (lambda i: pool.connection()), (lambda: pool.get_stats()["connections_num"]), pool.close
    if spec.mode == "psycopg_pool":
        import psycopg_pool

        ppool = psycopg_pool.ConnectionPool(spec.dsn, min_size=spec.max_size, max_size=spec.max_size,
                                            kwargs=kwargs, open=True)
        ppool.wait(timeout=30)
        return (lambda i: ppool.connection()), (lambda: ppool.get_stats()["connections_num"]), ppool.close
    raise ValueError(f"unknown mode {spec.mode!r}")


def _worker(idx: int, spec: Proc, sock: str | None, app: str, window: Any, go: Any, out: Any) -> None:
    try:
        checkout, connects, close = _setup(spec, sock, app, window)
    except BaseException as exc:  # reported to the parent
        out.put(("error", idx, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("ready", idx, os.getpid()))
    if not go.wait(SETUP_TIMEOUT * 2):
        close()
        return
    start, end = window[0], window[1]
    counts, gaps = [0] * spec.threads, [0.0] * spec.threads
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def loop(i: int) -> None:
        rnd = random.Random(os.getpid() * 1000 + i)
        n, gap, last = 0, 0.0, start
        while (now := time.monotonic()) < end:
            try:
                with checkout(i) as conn:
                    conn.execute(spec.query)
            except Exception as exc:  # counted by reason
                with lock:
                    errors[type(exc).__name__] += 1
                time.sleep(0.01)
                continue
            now = time.monotonic()
            if start <= now < end:
                n += 1
                gap, last = max(gap, now - last), now
            if spec.think:
                time.sleep(spec.think * (rnd.uniform(0.5, 1.5) if spec.jitter else 1.0))
        counts[i], gaps[i] = n, max(gap, end - last)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(spec.threads)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start - time.monotonic()))
    c0 = connects()
    time.sleep(max(0.0, end - time.monotonic()))
    c1 = connects()
    for t in threads:
        t.join(timeout=30.0)
    out.put(("done", idx, {"role": spec.role, "count": sum(counts), "max_gap": max(gaps),
                           "connects": c1 - c0, "errors": dict(errors)}))
    close()


class Sampler(threading.Thread):
    """Counts the backends of ``app`` in pg_stat_activity every ``interval`` seconds."""

    def __init__(self, app: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.app, self.interval = app, interval
        self.peak = self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg

        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        try:
            with psycopg.connect(DSN, autocommit=True, application_name=f"{self.app}-sampler") as conn:
                while not self.stop.wait(self.interval):
                    row = conn.execute(sql, (self.app,)).fetchone()
                    self.peak = max(self.peak, int(row[0]) if row else 0)
                    self.samples += 1
        except Exception:  # no sample is better than a failed benchmark: samples stays low
            return


def run_fleet(specs: Sequence[Proc], seconds: float, *, app: str, sock: str | None = None,
              warmup: float = 0.5, probe: Callable[[], dict[str, Any]] | None = None) -> FleetResult:
    """Run ``specs`` for ``warmup + seconds``; figures cover the last ``seconds`` only.
    ``probe()``, if given, is called once in the middle of the window; what it returns
    becomes the result's ``resource``."""
    ctx = multiprocessing.get_context("fork")  # no thread, no connection open here now
    go, out = ctx.Event(), ctx.Queue()
    window = ctx.Array("d", 2, lock=False)
    procs = [ctx.Process(target=_worker, args=(i, s, sock, app, window, go, out), daemon=True)
             for i, s in enumerate(specs)]
    sampler: Sampler | None = None
    results: dict[int, dict[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        ready = 0
        while ready < len(procs):
            kind, idx, detail = out.get(timeout=SETUP_TIMEOUT)
            if kind == "error":
                raise RuntimeError(f"worker {idx} failed to set up: {detail}")
            ready += 1
        sampler = Sampler(app)
        sampler.start()
        window[0] = time.monotonic() + warmup
        window[1] = window[0] + seconds
        go.set()
        probed: dict[str, Any] = {}
        if probe is not None:
            time.sleep(max(0.0, window[0] + seconds / 2 - time.monotonic()))
            probed = probe()
        while len(results) < len(procs):
            kind, idx, detail = out.get(timeout=warmup + seconds + 60.0)
            results[idx] = detail
        load = os.getloadavg()[0]
    except queue.Empty:
        raise RuntimeError("a worker gave no answer in time") from None
    finally:
        go.set()
        if sampler is not None:
            sampler.stop.set()
            sampler.join(timeout=5.0)
        for p in procs:
            p.join(timeout=15.0)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5.0)
    errors: Counter[str] = Counter()
    for r in results.values():
        errors.update(r["errors"])
    return FleetResult(seconds, [results[i] for i in range(len(procs))],
                       sampler.peak if sampler else 0, sampler.samples if sampler else 0, dict(errors), load,
                       resource=probed)


def others_running(samples: int = 10, interval: float = 0.05) -> float:
    """Mean number of other runnable tasks (from /proc/loadavg; this process not counted)."""
    total = 0.0
    for _ in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                total += max(0, int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        time.sleep(interval)
    return total / samples


def wait_quiet(max_wait: float, threshold: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s) until others leave the CPUs alone; the load seen last."""
    deadline = time.monotonic() + max_wait
    while (busy := others_running()) > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
    return busy


def alternate(contenders: dict[str, Callable[[], FleetResult]], rounds: int,
              skipped: dict[str, str], progress: Callable[[str], None] | None = None,
              quiet: float = 0.0) -> dict[str, list[FleetResult]]:
    """Run every contender once per round, the order rotated each round. With ``quiet``,
    each run first waits up to that many seconds for other work to leave the CPUs."""
    names = list(contenders)
    per_round: dict[str, list[FleetResult]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name in skipped:
                continue
            busy = wait_quiet(quiet) if quiet > 0 else 0.0
            try:
                per_round[name].append(res := contenders[name]())
                res.busy_before = busy
            except Exception as exc:  # one contender failing does not end the benchmark
                skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            if progress is not None and name not in skipped:
                progress(f"round {r + 1}/{rounds} {name}: {per_round[name][-1].rate():,.0f} q/s"
                         + (f" (others runnable before: {busy:.1f})" if quiet > 0 else ""))
    return {n: v for n, v in per_round.items() if n not in skipped}


def ratios(per_round: dict[str, list[FleetResult]], num: str, den: str,
           fig: Callable[[FleetResult], float] = FleetResult.rate) -> list[float]:
    a, b = per_round.get(num, []), per_round.get(den, [])
    if not a or len(a) != len(b):
        return []
    return [fig(x) / fig(y) if fig(y) else float("nan") for x, y in zip(a, b, strict=True)]
