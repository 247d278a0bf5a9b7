"""A WSGI app whose every request queries PostgreSQL through SQLAlchemy, with the
engine's connections leased from sharedpool: one cap across all workers. Served
by gunicorn (``app``, with gunicorn.conf.py here) and by uWSGI (the same
callable, with ../uwsgi_app/uwsgi.ini).

``GET /?sleep=0.01`` runs ``SELECT pg_backend_pid(), pg_sleep(0.01)`` and answers
``{"worker": <pid>, "backend": <backend pid>}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import text

from sharedpool.contrib.sqlalchemy import create_engine

PG_URL = os.environ.get("EXAMPLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
APP_NAME = os.environ.get("EXAMPLE_APP_NAME", "sharedpool-gunicorn-example")

# Made at import, in each worker (or once in the master: gunicorn's preload_app,
# uWSGI without lazy-apps; each worker then opens its own connections). The
# gunicorn hooks or the uWSGI ini have set $SHAREDPOOL_SOCKET, so the engine
# finds the coordinator by itself; its pool is SQLAlchemy's QueuePool, each
# connection covered by a lease of "pg".
engine = create_engine(
    PG_URL.replace("postgresql://", "postgresql+psycopg://", 1),
    resource="pg",
    pool_size=int(os.environ.get("EXAMPLE_THREADS", "1")),  # one per concurrent request
    max_overflow=0,
    pool_timeout=30,
    pool_pre_ping=True,
    connect_args={"application_name": APP_NAME},
)


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The WSGI callable."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    sleep = float(query.get("sleep", ["0"])[0])
    with engine.connect() as conn:
        backend, _ = conn.execute(text("SELECT pg_backend_pid(), pg_sleep(:s)"), {"s": sleep}).one()
    body = json.dumps({"worker": os.getpid(), "backend": backend}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
