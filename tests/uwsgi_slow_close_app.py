"""A WSGI app for tests/test_uwsgi.py whose pool's connections take 1 s to
close (a server far away): a worker's release at exit outlasts the moment
another stop signal reaches it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from sharedpool import ConnectionPool, PoolConfig


class SlowClose(psycopg.Connection[Any]):
    def close(self) -> None:
        time.sleep(1.0)
        super().close()


POOL = ConnectionPool(
    lambda: SlowClose.connect(os.environ["EXAMPLE_PG_URL"], autocommit=True,
                              application_name=os.environ["EXAMPLE_APP_NAME"]),
    PoolConfig(min_size=0, max_size=1, acquire_timeout=30), resource="pg")


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with POOL.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"worker": os.getpid(), "backend": row[0] if row else None}).encode()]
