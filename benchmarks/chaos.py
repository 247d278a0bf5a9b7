"""Chaos run: workers hammer PostgreSQL through sharedpool while we SIGKILL
random workers (and restart them) and kill and restart the coordinator,
sampling pg_stat_activity every few milliseconds.

    python -m benchmarks.chaos [--workers 8] [--cap 4] [--seconds 30] [--json PATH]

Prints one table: cap, most connections PostgreSQL saw, worker kills,
coordinator restarts, time for a dead worker's slots to come back (p50/p99),
failed checkouts and why, leases held at the end (must be 0). Everything is
bounded in time and talks only to loopback and a private Unix socket.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
REPORT_EVERY = 0.2  # seconds between two reports of a worker's counts


def _worker(sock: str, app: str, stop_at: float, report_dir: str, wid: int) -> None:
    """One worker process: 2 threads of checkouts. Its counts (checkouts done,
    failures by reason) are written to ``report_dir/<wid>.json`` every
    REPORT_EVERY seconds and at the end: a worker SIGKILLed mid-run has its
    counts up to its last report in the table, not only the survivors'."""
    import psycopg

    from sharedpool import ConnectionPool, PoolConfig

    pool = ConnectionPool(
        lambda: psycopg.connect(DSN, application_name=app, autocommit=True, connect_timeout=5),
        PoolConfig(min_size=0, max_size=3, acquire_timeout=5, validation_bypass=0.2),
        resource="pg", coordinator=sock,
    )
    done = [0]
    failures: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    # Filed by the run's own worker number: a pid the kernel hands out again in a
    # long run would overwrite a killed worker's counts.
    path = os.path.join(report_dir, f"{wid}.json")

    def report(final: bool = False) -> None:
        with lock:
            counts = {"worker": wid, "done": done[0], "failures": dict(failures), "final": final}
        with open(path + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(path + ".tmp", path)  # a kill mid-write leaves the last whole report

    def loop() -> None:
        rnd = random.Random()
        while time.monotonic() < stop_at:
            try:
                with pool.connection() as conn:
                    if rnd.random() < 0.1:
                        conn.execute("SELECT pg_sleep(0.02)")
                    else:
                        conn.execute("SELECT 1").fetchone()
                with lock:
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted by reason
                with lock:
                    failures[type(exc).__name__] += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        report()
        threads[0].join(REPORT_EVERY)
    for t in threads:
        t.join()
    pool.close()
    report(final=True)


def _collect(report_dir: str) -> list[dict[str, Any]]:
    """Every worker's last report (killed ones included)."""
    reports = []
    for name in os.listdir(report_dir):
        if name.endswith(".json"):
            with open(os.path.join(report_dir, name)) as f:
                reports.append(json.load(f))
    return reports


class Sampler(threading.Thread):
    """Counts the run's backends in pg_stat_activity every ``interval`` seconds."""

    def __init__(self, app: str, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.app, self.interval = app, interval
        self.peak = 0
        self.samples = 0
        self.over = 0
        self.cap = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(DSN, autocommit=True, application_name="sp-chaos-sampler") as conn:
            while not self.stop.is_set():
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                   (self.app,)).fetchone()
                n = int(row[0]) if row else 0
                self.peak = max(self.peak, n)
                self.over += n > self.cap
                self.samples += 1
                time.sleep(self.interval)


def _slot_return_time(client: Any, pid: int, timeout: float = 15.0) -> float | None:
    """Seconds from now until the coordinator shows no lease of ``pid`` and nothing fenced."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            leases = client.inspect("leases", pid=pid)["leases"]
            fenced = sum(r["fenced"] for r in client.inspect("resources")["resources"])
        except Exception:  # noqa: BLE001 - coordinator restarting: keep polling
            leases, fenced = [1], 1
        if not leases and not fenced:
            return time.monotonic() - t0
        time.sleep(0.001)
    return None


def run(workers: int, cap: int, seconds: float, coord_restarts: int, seed: int) -> dict[str, Any]:
    import multiprocess

    from sharedpool import Client, Coordinator, Resource

    rnd = random.Random(seed)
    # Not fork: the sampler thread may be inside libpq when we fork a worker.
    ctx = multiprocess.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="sp-chaos-")
    sock = os.path.join(tmp, "sp.sock")
    report_dir = os.path.join(tmp, "counts")
    os.mkdir(report_dir)
    app = f"sp-chaos-{uuid.uuid4().hex[:8]}"
    resources = {"pg": Resource(max_size=cap, monitor_dsn=DSN, fence_action="terminate",
                                fence_timeout=5, acquire_timeout=5)}
    coord = Coordinator(sock, resources).start()
    sampler = Sampler(app)
    sampler.cap = cap
    sampler.start()
    stop_at = time.monotonic() + seconds
    procs: dict[int, Any] = {}
    wids: dict[int, int] = {}  # pid -> the run's number for that worker
    numbers = itertools.count()

    def spawn() -> None:
        wid = next(numbers)
        p = ctx.Process(target=_worker, args=(sock, app, stop_at, report_dir, wid), daemon=True)
        p.start()
        procs[p.pid] = p
        wids[p.pid] = wid

    for _ in range(workers):
        spawn()
    client = Client(sock)
    kills, restarts, slot_times = 0, 0, []
    restart_at = sorted(rnd.uniform(0.2, 0.8) * seconds for _ in range(coord_restarts))
    try:
        while time.monotonic() < stop_at - 1.0:
            time.sleep(rnd.uniform(0.2, 0.6))
            elapsed = seconds - (stop_at - time.monotonic())
            if restart_at and elapsed >= restart_at[0]:
                restart_at.pop(0)
                coord.kill()
                time.sleep(rnd.uniform(0.05, 0.3))
                coord = Coordinator(sock, resources).start()
                restarts += 1
                continue
            holders = [s["pid"] for s in client.inspect("sessions")["sessions"]
                       if s["leases"] and s["pid"] in procs]
            if not holders:
                continue
            victim = rnd.choice(holders)
            os.kill(victim, signal.SIGKILL)
            kills += 1
            took = _slot_return_time(client, victim)
            if took is not None:
                slot_times.append(took)
            procs.pop(victim).join(5)
            del wids[victim]
            spawn()
        for p in procs.values():
            p.join(seconds + 30)
        time.sleep(0.2)
        leased_end = sum(r["leased"] for r in client.inspect("resources")["resources"])
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)
        sampler.stop.set()
        sampler.join(5)
        client.close()
        coord.stop()
    results = _collect(report_dir)
    finished = {r["worker"] for r in results if r["final"]}
    shutil.rmtree(tmp, ignore_errors=True)
    failures: collections.Counter[str] = collections.Counter()
    for r in results:
        failures.update(r["failures"])
    slot_ms = sorted(t * 1000 for t in slot_times)
    return {
        "cap": cap,
        "workers": workers,
        "seconds": seconds,
        "pg_peak": sampler.peak,
        "samples": sampler.samples,
        "moments_over_cap": sampler.over,
        "worker_kills": kills,
        "coordinator_restarts": restarts,
        "slot_return_ms_p50": round(statistics.median(slot_ms), 1) if slot_ms else None,
        "slot_return_ms_p99": round(slot_ms[min(len(slot_ms) - 1, int(len(slot_ms) * 0.99))], 1)
        if slot_ms else None,
        "checkouts": sum(r["done"] for r in results),
        # Workers alive at the end that did not finish on their own (hung, so killed).
        "workers_unfinished": sum(1 for pid in procs if wids[pid] not in finished),
        "failed_checkouts": dict(failures),
        "leases_held_at_end": leased_end,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--cap", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--coordinator-restarts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.seconds > 600 or args.workers > 64:
        ap.error("keep it bounded: --seconds <= 600, --workers <= 64")
    res = run(args.workers, args.cap, args.seconds, args.coordinator_restarts, args.seed)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sharedpool chaos run ({res['workers']} workers, {res['seconds']:g}s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("cap", "pg_peak", "moments_over_cap", "samples", "worker_kills", "coordinator_restarts",
                "slot_return_ms_p50", "slot_return_ms_p99", "checkouts", "failed_checkouts",
                "workers_unfinished", "leases_held_at_end"):
        table.add_row(key, str(res[key]))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    ok = (res["moments_over_cap"] == 0 and res["leases_held_at_end"] == 0
          and res["workers_unfinished"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
