"""A WSGI app for tests/test_uwsgi.py that queries PostgreSQL at import, so in
the uWSGI master before it forks the workers (a warm-up, a table reflected):
the master's pool then holds a leased connection every worker inherits. With
EXAMPLE_EMBEDDED=1, the master first starts a coordinator of its own.

``GET /?sleep=0.01`` answers ``{"worker": <pid>, "backend": <backend pid>,
"master_backend": <the master's backend pid>}``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import psycopg

from sharedpool import ConnectionPool, Coordinator, PoolConfig, Resource

if os.environ.get("EXAMPLE_EMBEDDED") == "1":
    # The master runs the coordinator itself, as a program of its own.
    coordinator = Coordinator(os.environ["SHAREDPOOL_SOCKET"], {"pg": Resource(
        max_size=int(os.environ["EXAMPLE_CAP"]), acquire_timeout=30,
        monitor_dsn="host=127.0.0.1 dbname=test user=postgres")}).start()

DSN = f"host=127.0.0.1 dbname=test user=postgres application_name={os.environ['EXAMPLE_APP_NAME']}"

pool = ConnectionPool(lambda: psycopg.connect(DSN, autocommit=True),
                      PoolConfig(min_size=0, max_size=1, acquire_timeout=30), resource="pg")
with pool.connection() as conn:
    MASTER_BACKEND = conn.info.backend_pid


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The WSGI callable."""
    sleep = float(parse_qs(environ.get("QUERY_STRING", "")).get("sleep", ["0"])[0])
    with pool.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (sleep,)).fetchone()
    assert row is not None
    body = json.dumps({"worker": os.getpid(), "backend": row[0],
                       "master_backend": MASTER_BACKEND}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
