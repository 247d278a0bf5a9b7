"""sharedpool.contrib.sqlalchemy when the garbage collector checks a connection
in: SQLAlchemy returns a Connection dropped unclosed to its pool from a
finalizer (its queue's lock is an RLock for that), and one in a reference
cycle (its autobegun transaction) goes in a collection, in whatever thread the
collection interrupted, which may hold the lease book's locks."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import pytest
from proc_helpers import collect_holding, run_in_child
from sqlalchemy import text

from sharedpool import Resource
from sharedpool.contrib.sqlalchemy import create_engine

pytestmark = pytest.mark.pg

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def test_a_collection_inside_a_lease_wait_checks_in_without_hanging(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # Checked in by the collector inside the lease wait's look at the pool (the
    # book's condition held), the dropped connection was offered to that very
    # wait: the thread waited on its own lock for good, and every checkin of
    # the process after it (a plain ABBA with the client's thread, which
    # collects inside the book's lock, did the same). Measured before: 1 run in
    # 3 of 4 threads, a cap of 3 and a dropped connection every 20 ms hung.
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=10)})

    def child() -> int:
        engine = create_engine(URL, resource="pg", coordinator=sock_path, pool_size=2,
                               max_overflow=0, pool_timeout=10,
                               connect_args={"application_name": app_name})
        book = engine.pool.lease_book  # type: ignore[attr-defined]
        gc.disable()
        dropped = engine.connect()
        dropped.execute(text("SELECT 1"))  # autobegin: a cycle, freed by a collection only
        del dropped
        got: list[int] = []

        def checkout() -> None:
            with engine.connect() as conn:  # waits at the cap for the dropped one's lease
                got.append(conn.execute(text("SELECT 1")).scalar_one())

        waiter = threading.Thread(target=checkout, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 5
        while not book._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        if not book._waiting:
            return 3
        if not collect_holding(book._returned):  # as a collection inside the wait's look at the pool
            return 2  # hung in the finalizer's checkin
        waiter.join(10)
        gc.enable()
        engine.dispose()
        return 0 if got == [1] else 4

    assert run_in_child(child) == 0  # 2: the collection hung, 3: no lease wait, 4: no checkout
