"""``sharedpool demo``: many worker processes, one global cap, and the proof it held.

An embedded coordinator (in a fresh private temp dir unless a socket is given)
owns resource ``"demo"`` with cap M. N forked worker processes each keep a
local :class:`~sharedpool.pool.ConnectionPool` of SQLite (or, with a DSN,
PostgreSQL) connections and check them out from two threads in a loop. The
parent samples the coordinator (and PostgreSQL's ``pg_stat_activity``) every
few milliseconds and ends with a table: the cap, the most leases (and
connections) ever seen at once, and each worker's checkouts and waits.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .client import Client
from .config import PoolConfig, Resource, check_socket_path
from .coordinator import Coordinator
from .errors import ConfigError, PoolTimeout
from .pool import ConnectionPool

RESOURCE = "demo"
THREADS = 2
#: How often the parent asks the coordinator how many leases are held.
SAMPLE_EVERY = 0.02
#: How often PostgreSQL's own count is taken (--dsn).
PG_SAMPLE_EVERY = 0.003
HOLD = 0.001
ACQUIRE_TIMEOUT = 5.0


@dataclass
class Peaks:
    """What the samplers saw; written by their threads, read by the parent."""

    leased_now: int = 0
    waiting_now: int = 0
    most_leased: int = 0
    coordinator_peak: int = 0
    pg_now: int = 0
    most_pg: int = 0
    pg_samples: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)


def _factory(dsn: str | None, db_path: str, app: str) -> Callable[[], Any]:
    if dsn is None:
        return lambda: sqlite3.connect(db_path, check_same_thread=False, timeout=10)
    import psycopg

    return lambda: psycopg.connect(dsn, application_name=app, autocommit=True)


def _worker(index: int, socket_path: str, dsn: str | None, db_path: str, app: str, pool_size: int,
            gate: Any, counts: Any, results: Any) -> None:
    """One worker process: two threads doing checkouts until the gate's end time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not ours
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by the parent around fork
    # A failing connect would log a warning per attempt, hundreds a second; the
    # table counts them and shows the last one.
    logging.getLogger("sharedpool.pool").setLevel(logging.ERROR)
    pool: ConnectionPool[Any] = ConnectionPool(
        _factory(dsn, db_path, app), PoolConfig(min_size=0, max_size=pool_size, test_on_acquire=False),
        resource=RESOURCE, coordinator=socket_path, name=f"demo-worker-{index}")
    gate.wait_for_start(index)
    tally = {"checkouts": 0, "timeouts": 0, "errors": 0}
    last_error: list[str] = []
    lock = threading.Lock()
    query = "SELECT 1" if dsn else "SELECT count(*) FROM demo"

    def loop(slot: int) -> None:
        done = 0
        # the parent ends it early on Ctrl-C; a parent gone (killed) ends it too
        while time.monotonic() < gate.end.value and os.getppid() == gate.parent:
            try:
                with pool.connection(timeout=ACQUIRE_TIMEOUT) as conn:
                    conn.execute(query).fetchone()
                    time.sleep(HOLD)
                done += 1
                counts[slot] = done
            except PoolTimeout:
                with lock:
                    tally["timeouts"] += 1
            except Exception as exc:  # noqa: BLE001 - counted and shown in the table
                with lock:
                    tally["errors"] += 1
                    last_error[:] = [f"{type(exc).__name__}: {exc}"]
                time.sleep(0.01)
        with lock:
            tally["checkouts"] += done

    threads = [threading.Thread(target=loop, args=(index * THREADS + t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics = pool.get_metrics()
    pool.close()
    results.put({"index": index, "pid": os.getpid(), **tally, "waits": metrics["requests_queued"],
                 "last_error": last_error[0] if last_error else None})


class _Gate:
    """Workers report ready, then all start together; the clock starts when all are up."""

    def __init__(self, ctx: Any) -> None:
        self.ready = ctx.Queue()
        self.go = ctx.Event()
        self.end = ctx.Value("d", 0.0, lock=False)
        self.parent = os.getpid()  # the workers' parent: nobody else will say go

    def wait_for_start(self, index: int) -> float:
        """In a worker: say ready, wait for go; return the monotonic end time."""
        self.ready.put(index)
        while not self.go.wait(0.5):
            if os.getppid() != self.parent:  # killed before it said go: do not wait for ever
                os._exit(1)
        return float(self.end.value)

    def open(self, procs: list[Any], seconds: float, timeout: float = 60.0) -> float:
        """In the parent: wait (bounded) for every live worker, then start the clock."""
        waiting = len(procs)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline and any(p.is_alive() for p in procs):
            try:
                self.ready.get(timeout=0.1)
                waiting -= 1
            except queue.Empty:
                pass
        started = time.monotonic()
        self.end.value = started + seconds
        self.go.set()
        return started


def _sample_coordinator(client: Client, peaks: Peaks, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            res = next(r for r in client.inspect("resources")["resources"] if r["name"] == RESOURCE)
        except Exception as exc:  # noqa: BLE001 - shown at the end; the run goes on
            peaks.errors.append(f"coordinator sample: {exc}")
            stop.wait(0.2)
            continue
        peaks.leased_now, peaks.waiting_now = res["leased"], res["waiting"]
        peaks.most_leased = max(peaks.most_leased, res["leased"])
        peaks.coordinator_peak = max(peaks.coordinator_peak, res.get("peak", 0))
        peaks.samples += 1
        stop.wait(SAMPLE_EVERY)


def _sample_pg(dsn: str, app: str, peaks: Peaks, stop: threading.Event) -> None:
    import psycopg

    try:
        with psycopg.connect(dsn, application_name=f"{app}-sampler", autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                   (app,)).fetchone()
                peaks.pg_now = int(row[0]) if row else 0
                peaks.most_pg = max(peaks.most_pg, peaks.pg_now)
                peaks.pg_samples += 1
                stop.wait(PG_SAMPLE_EVERY)
    except Exception as exc:  # noqa: BLE001 - shown at the end in one line; the verdict counts samples
        peaks.errors.append(f"PostgreSQL sample: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    """psycopg's messages run over several lines (connection attempts, hints)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _progress(peaks: Peaks, counts: Any, started: float, seconds: float, cap: int,
              dsn: str | None) -> RenderableType:
    elapsed = min(time.monotonic() - started, seconds)
    line = (f"[{elapsed:4.1f}s / {seconds:g}s]  leases held now {peaks.leased_now}/{cap}  "
            f"most at once {peaks.most_leased}  waiting {peaks.waiting_now}  "
            f"checkouts {sum(counts)}")
    if dsn:
        line += f"  PostgreSQL connections now {peaks.pg_now} (most {peaks.most_pg})"
    return Text(line)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``timeout``, a supervisor): leave through run_demo's clean-up."""
    raise SystemExit(128 + signum)


def _stop_process(proc: Any, timeout: float) -> None:
    """Join; then SIGTERM; then SIGKILL — always by this process's own pid."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(2)
    if proc.is_alive():
        proc.kill()
        proc.join(2)


def _results_table(cap: int, peaks: Peaks, rows: list[dict[str, Any]], dsn: str | None) -> RenderableType:
    summary = Table(title="sharedpool demo", title_justify="left", show_header=False)
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    summary.add_row("cap (max_size of resource 'demo')", str(cap))
    summary.add_row("most leases ever held at once (coordinator)", str(peaks.coordinator_peak))
    summary.add_row(f"most leases seen by sampling every {SAMPLE_EVERY * 1000:.0f} ms",
                    f"{peaks.most_leased} ({peaks.samples} samples)")
    if dsn:
        summary.add_row("most connections PostgreSQL saw",
                        f"{peaks.most_pg} ({peaks.pg_samples} samples)")
    done = [int(r["checkouts"]) for r in rows if "checkouts" in r]
    if done:
        summary.add_row("checkouts per worker: fewest / most", f"{min(done)} / {max(done)}")
    workers = Table(title="workers", title_justify="left")
    for col in ("worker", "pid", "checkouts", "waits", "timeouts", "errors"):
        workers.add_column(col, justify="right")
    workers.add_column("note")
    for row in rows:
        workers.add_row(*(str(row.get(k, "-")) for k in ("index", "pid", "checkouts", "waits",
                                                         "timeouts", "errors")),
                        Text(row.get("last_error") or ""))  # an error's text, not markup
    workers.add_row("all", "", *(str(sum(int(r.get(k) or 0) for r in rows))
                                 for k in ("checkouts", "waits", "timeouts", "errors")), "")
    return Group(summary, workers)


def run_demo(*, workers: int = 8, max_size: int = 3, seconds: float = 5.0, pool_size: int = 4,
             dsn: str | None = None, socket_path: str | None = None,
             console: Console | None = None) -> int:
    """Run the demo; 0 if the cap held (leases, and PostgreSQL's count with a DSN), else 1."""
    import multiprocess

    console = console or Console()
    if socket_path is not None:  # '' is a blank left by a script, not "a temp dir"
        socket_path = check_socket_path("--socket", socket_path)
    if dsn is not None and not dsn.strip():  # as blank: libpq's defaults, yet SQLite's query
        raise ConfigError("--dsn", f"must be a PostgreSQL connection string, got {dsn!r}")
    if dsn:
        # Before anything starts, and imported once here, inherited by every
        # worker. `pip install sharedpool` does not bring psycopg: say so in
        # one line, not with a traceback from inside the run.
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError("--dsn", "needs psycopg, which `pip install sharedpool` does not "
                              "bring: pip install 'sharedpool[pg]'") from None
        from .fence import check_monitor_dsn

        # Now, not after the whole run (exit 1, "check --dsn"), whose sampler line
        # quoted libpq's parse error, a piece of the DSN: maybe of its password.
        check_monitor_dsn("--dsn", dsn)
    workdir = tempfile.mkdtemp(prefix="sharedpool-demo-")  # 0700: a private socket directory
    sock = socket_path or os.path.join(workdir, "sharedpool.sock")
    db_path = os.path.join(workdir, "demo.sqlite3")
    app = f"sharedpool-demo-{uuid.uuid4().hex[:10]}"
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE demo (x INTEGER)")
        db.executemany("INSERT INTO demo VALUES (?)", [(i,) for i in range(100)])
    ctx = multiprocess.get_context("fork")
    counts = ctx.Array("q", workers * THREADS, lock=False)
    results = ctx.Queue()
    gate = _Gate(ctx)
    procs: list[Any] = []
    peaks = Peaks()
    stop = threading.Event()
    coordinator = Coordinator(sock, resources={RESOURCE: Resource(max_size=max_size)})
    sampler_client: Client | None = None
    rows: list[dict[str, Any]] = []
    interrupted = False
    # SIGTERM only in the main thread (signal.signal refuses elsewhere).
    main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        coordinator.start()
        # Fork every worker before this process starts any thread. SIGTERM is
        # held back meanwhile: its handler would otherwise run inside an at-fork
        # hook, where the SystemExit it raises is printed and dropped.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if main else None
        try:
            for i in range(workers):
                proc = ctx.Process(target=_worker, name=f"sharedpool-demo-{i}", daemon=True,
                                   args=(i, sock, dsn, db_path, app, pool_size, gate, counts, results))
                proc.start()
                procs.append(proc)
        finally:
            if mask is not None:  # a SIGTERM that came meanwhile is handled here
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        started = gate.open(procs, seconds)
        end = started + seconds
        sampler_client = Client(sock, name="sharedpool-demo-sampler")
        samplers = [threading.Thread(target=_sample_coordinator, args=(sampler_client, peaks, stop),
                                     daemon=True)]
        if dsn:
            samplers.append(threading.Thread(target=_sample_pg, args=(dsn, app, peaks, stop),
                                             daemon=True))
        for thread in samplers:
            thread.start()
        console.print(f"demo: {workers} workers x {THREADS} threads, local pools of {pool_size}, "
                      f"global cap {max_size}, {seconds:g}s, "
                      f"{'PostgreSQL' if dsn else 'SQLite'}; coordinator pid {coordinator.pid} at {sock}")
        try:
            _watch(console, peaks, counts, started, seconds, max_size, dsn, procs, end)
        except KeyboardInterrupt:
            interrupted = True
            gate.end.value = 0.0  # workers stop after their current checkout and report
        rows = _collect(results, workers, 2.0 if interrupted else ACQUIRE_TIMEOUT + 5)
        stop.set()
        for thread in samplers:
            thread.join(5)
    except SystemExit:  # SIGTERM: stop the workers at once, clean up, exit 143
        interrupted = True
        gate.end.value = 0.0
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous_term)
        stop.set()
        for proc in procs:
            _stop_process(proc, 0 if interrupted else 5)
        if sampler_client is not None:
            sampler_client.close()
        coordinator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(console, max_size, peaks, rows, procs, dsn, interrupted, sum(counts))


def _watch(console: Console, peaks: Peaks, counts: Any, started: float, seconds: float, cap: int,
           dsn: str | None, procs: list[Any], end: float) -> None:
    def running() -> bool:
        return time.monotonic() < end or any(p.is_alive() for p in procs)

    if console.is_terminal:
        with Live(console=console, refresh_per_second=10, transient=False) as live:
            while running() and time.monotonic() < end + ACQUIRE_TIMEOUT + 5:
                live.update(_progress(peaks, counts, started, seconds, cap, dsn))
                time.sleep(0.1)
            live.update(_progress(peaks, counts, started, seconds, cap, dsn))
        return
    next_line = started
    while running() and time.monotonic() < end + ACQUIRE_TIMEOUT + 5:
        if time.monotonic() >= next_line:
            console.print(_progress(peaks, counts, started, seconds, cap, dsn))
            next_line += 1.0
        time.sleep(0.05)


def _collect(results: Any, workers: int, timeout: float) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(rows) < workers:
        try:
            row = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        rows[row["index"]] = row
    return [rows[i] for i in sorted(rows)]


def _failure(rows: list[dict[str, Any]], peaks: Peaks, dsn: str | None,
             counted: int = 0) -> str | None:
    """Why the run proves nothing (PostgreSQL never counted, or no checkout), if so.
    ``counted``: the checkouts the workers counted live (a worker that was stopped
    before it reported has no row)."""
    if dsn and not peaks.pg_samples:
        return "PostgreSQL was never reached to count its connections; check --dsn"
    if not max(counted, sum(int(r.get("checkouts") or 0) for r in rows)):
        errors = [r["last_error"] for r in rows if r.get("last_error")]
        return "no checkout succeeded" + (f" (last error: {errors[-1]})" if errors else "")
    return None


def _report(console: Console, cap: int, peaks: Peaks, rows: list[dict[str, Any]], procs: list[Any],
            dsn: str | None, interrupted: bool, counted: int = 0) -> int:
    seen = {row["index"] for row in rows}
    for i, proc in enumerate(procs):
        if i not in seen:
            rows.append({"index": i, "pid": proc.pid, "last_error": f"no result (exit code {proc.exitcode})"})
    rows.sort(key=lambda r: r["index"])
    console.print(_results_table(cap, peaks, rows, dsn))
    for error in dict.fromkeys(peaks.errors):
        console.print(f"sampler: {error}", markup=False)
    held = max(peaks.coordinator_peak, peaks.most_leased) <= cap and (not dsn or peaks.most_pg <= cap)
    if interrupted:
        console.print("interrupted: figures cover the run so far")
    failure = _failure(rows, peaks, dsn, counted)
    if held and failure:  # nothing was shown, so nothing was proved
        console.print(f"demo failed: {failure}", markup=False)
        return 1
    if held:
        console.print(f"cap held: never more than {cap} leases at once"
                      + (" (and PostgreSQL agrees)" if dsn else ""))
        return 0
    console.print(f"CAP BROKEN: {max(peaks.coordinator_peak, peaks.most_leased, peaks.most_pg)} "
                  f"> cap {cap}")
    return 1
