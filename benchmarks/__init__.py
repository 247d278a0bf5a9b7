"""sharedpool benchmarks: ``python -m benchmarks [--quick] [--rounds N] [--json PATH]``.

Every figure is measured in the same run as the peers it is compared with, in
alternating rounds, and ratios are taken within a round (the machine's speed drifts).

* :mod:`benchmarks.checkout` - local checkout cycles/s, 1 and 8 threads, against
  psycopg_pool, SQLAlchemy QueuePool and a deque+Condition floor;
* :mod:`benchmarks.roundtrip` - lease round trip p50/p99 against a raw msgpack ping-pong;
* :mod:`benchmarks.lease_ops` - lease operations/s with 8 client processes.
"""
