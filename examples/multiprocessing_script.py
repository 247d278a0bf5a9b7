"""A plain multiprocessing fleet sharing one PostgreSQL cap.

The parent runs the coordinator; 8 worker processes each keep their own local
pool of psycopg connections and run queries; a sampler in the parent counts
the fleet's connections in pg_stat_activity and shows the cap held.

    python examples/multiprocessing_script.py [--processes 8] [--cap 3] [--queries 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
import uuid

import psycopg

from sharedpool import ConnectionPool, Coordinator, PoolConfig, Resource

DSN = os.environ.get("EXAMPLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def work(socket_path: str, app_name: str, queries: int) -> int:
    """One worker process: its own pool, each connection under a lease of "pg"."""
    pool = ConnectionPool(
        lambda: psycopg.connect(DSN, application_name=app_name, autocommit=True),
        PoolConfig(min_size=0, max_size=2, acquire_timeout=60),
        resource="pg",
        coordinator=socket_path,
    )
    try:
        for _ in range(queries):
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(0.002)")
    finally:
        pool.close()  # close (confirmed) and give every lease back
    return queries


def sample(app_name: str, stop: threading.Event, seen: list[int]) -> None:
    """Count the fleet's connections as PostgreSQL sees them, every 2 ms."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                               (app_name,)).fetchone()
            seen.append(int(row[0]) if row else 0)
            stop.wait(0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--cap", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    socket_path = os.path.join(tempfile.mkdtemp(prefix="sharedpool-"), "sharedpool.sock")
    app_name = f"sharedpool-mp-{uuid.uuid4().hex[:8]}"
    seen: list[int] = []
    stop = threading.Event()
    with Coordinator(socket_path, {"pg": Resource(max_size=args.cap, monitor_dsn=DSN)}):
        sampler = threading.Thread(target=sample, args=(app_name, stop, seen))
        sampler.start()
        t0 = time.monotonic()
        with multiprocessing.get_context("spawn").Pool(args.processes) as fleet:
            done = sum(fleet.starmap(work, [(socket_path, app_name, args.queries)] * args.processes))
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
    peak = max(seen, default=0)
    print(f"{args.processes} processes ran {done} queries in {elapsed:.1f}s; PostgreSQL saw at most "
          f"{peak} of their connections at once (cap {args.cap}, {len(seen)} samples)")
    if peak > args.cap:
        raise SystemExit(f"the cap was exceeded: {peak} > {args.cap}")


if __name__ == "__main__":
    main()
