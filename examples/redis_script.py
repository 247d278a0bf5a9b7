"""redis-py processes sharing one cap on Redis connections.

The parent runs the coordinator; 8 worker processes each use a redis-py
``BlockingConnectionPool`` of 4 connections whose connections are leased
(resource "redis", cap 2); the parent counts the fleet's clients in
``CLIENT LIST`` (by client name) and shows the cap held.

    python examples/redis_script.py [--processes 8] [--cap 2] [--commands 500]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
import uuid

import redis

from sharedpool import Coordinator
from sharedpool.contrib.redis import BlockingConnectionPool

HOST = os.environ.get("EXAMPLE_REDIS_HOST", "127.0.0.1")
PORT = int(os.environ.get("EXAMPLE_REDIS_PORT", "6379"))
DB = int(os.environ.get("EXAMPLE_REDIS_DB", "15"))


def work(socket_path: str, name: str, key: str, commands: int) -> int:
    """One worker process: 4 threads on one leased pool, INCR in a loop."""
    pool = BlockingConnectionPool(host=HOST, port=PORT, db=DB, client_name=name,
                                  max_connections=4, timeout=60,
                                  resource="redis", coordinator=socket_path)
    r = redis.Redis(connection_pool=pool)

    def loop() -> None:
        for _ in range(commands // 4):
            r.incr(key)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.disconnect()  # close (confirmed) and give every lease back
    return commands // 4 * 4


def sample(name: str, stop: threading.Event, seen: list[int]) -> None:
    """Count the fleet's Redis clients by name, every 2 ms."""
    r = redis.Redis(host=HOST, port=PORT, db=DB)
    while not stop.is_set():
        seen.append(sum(1 for c in r.client_list() if c.get("name") == name))
        stop.wait(0.002)
    r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--cap", type=int, default=2)
    parser.add_argument("--commands", type=int, default=500)
    args = parser.parse_args()

    socket_path = os.path.join(tempfile.mkdtemp(prefix="sharedpool-"), "sharedpool.sock")
    name = f"sharedpool-redis-{uuid.uuid4().hex[:8]}"
    key = f"{name}:counter"
    seen: list[int] = []
    stop = threading.Event()
    with Coordinator(socket_path, {"redis": args.cap}):
        sampler = threading.Thread(target=sample, args=(name, stop, seen))
        sampler.start()
        t0 = time.monotonic()
        with multiprocessing.get_context("spawn").Pool(args.processes) as fleet:
            done = sum(fleet.starmap(work, [(socket_path, name, key, args.commands)]
                                     * args.processes))
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
    r = redis.Redis(host=HOST, port=PORT, db=DB)
    total = int(r.get(key) or 0)
    r.delete(key)
    peak = max(seen, default=0)
    print(f"{args.processes} processes sent {done} INCRs in {elapsed:.1f}s (counter = {total}); "
          f"Redis saw at most {peak} of their connections at once (cap {args.cap})")
    if peak > args.cap or total != done:
        raise SystemExit("the cap was exceeded or increments were lost")


if __name__ == "__main__":
    main()
