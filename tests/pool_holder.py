"""A worker for reclaim tests: a pool of fake connections under a lease.

    python pool_holder.py SOCKET RESOURCE POOL_SIZE COUNT MODE [SECONDS [CONNECT_DELAY]]

MODE ``idle``: check COUNT connections out, return them, sleep (they sit idle).
MODE ``busy``: COUNT threads check out in a loop, holding each for 10 ms.
Prints ``ready T`` once the connections exist (T: the oldest one's ``time.monotonic()``,
one clock for every process on Linux), then a JSON summary at the end.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from sharedpool import ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory


def main() -> None:
    sock, resource = sys.argv[1:3]
    size, count, mode = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    seconds = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
    factory = FakeFactory(delay=float(sys.argv[7]) if len(sys.argv) > 7 else 0.0)
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=size, acquire_timeout=30),
                          resource=resource, coordinator=sock)
    held = [pool.acquire() for _ in range(count)]
    ready = f"ready {min(w.created_at for w in held)!r}"
    stop = time.monotonic() + seconds
    done = [0]
    if mode == "idle":
        for w in held:
            pool.release(w)
        print(ready, flush=True)
        while time.monotonic() < stop:
            time.sleep(0.05)
    else:
        for w in held:
            pool.release(w)

        def loop() -> None:
            while time.monotonic() < stop:
                with pool.connection() as conn:
                    conn.execute()
                    time.sleep(0.01)
                done[0] += 1

        threads = [threading.Thread(target=loop) for _ in range(count)]
        for t in threads:
            t.start()
        print(ready, flush=True)
        for t in threads:
            t.join()
    m = pool.get_metrics()
    pool.close()
    print(json.dumps({"done": done[0], "reclaimed": m["reclaimed"], "created": m["total_created"]}),
          flush=True)


if __name__ == "__main__":
    main()
