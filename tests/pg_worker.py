"""A worker process for the PostgreSQL tests: a local pool of psycopg connections
under a coordinator's lease, doing ``SELECT 1`` checkouts; prints a JSON summary.

    python pg_worker.py SOCKET RESOURCE APP_NAME ITERATIONS [POOL_SIZE] [THREADS] [HOLD_S]
"""

from __future__ import annotations

import json
import sys
import threading
import time

import psycopg
from pg_helpers import pg_dsn

from sharedpool import ConnectionPool, PoolConfig


def main() -> None:
    sock, resource, app = sys.argv[1:4]
    iterations = int(sys.argv[4])
    size = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    hold = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    pool = ConnectionPool(
        lambda: psycopg.connect(pg_dsn(), application_name=app, autocommit=True),
        PoolConfig(min_size=0, max_size=size, acquire_timeout=60),
        resource=resource,
        coordinator=sock,
    )
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()

    def work() -> None:
        for _ in range(iterations):
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT 1").fetchone()
                    if hold:
                        time.sleep(hold)
                with lock:
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported in the summary
                errors.append(f"{type(exc).__name__}: {exc}")

    print("started", flush=True)
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    metrics = pool.get_metrics()
    pool.close()
    print(json.dumps({"done": done[0], "errors": errors[:5], "n_errors": len(errors),
                      "created": metrics["total_created"], "queued": metrics["requests_queued"]}),
          flush=True)


if __name__ == "__main__":
    main()
