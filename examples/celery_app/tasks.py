"""A celery app whose tasks query PostgreSQL through SQLAlchemy, every connection
leased from sharedpool: one cap across all the worker's pool processes.

    celery -A tasks worker --concurrency 8          # in examples/celery_app
    python run.py 300                               # another terminal
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from sqlalchemy import text

from sharedpool import Resource
from sharedpool.contrib.celery import setup
from sharedpool.contrib.sqlalchemy import create_engine

REDIS_URL = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_URL = os.environ.get("EXAMPLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
CAP = int(os.environ.get("EXAMPLE_CAP", "4"))
QUEUE = os.environ.get("EXAMPLE_QUEUE", "sharedpool-example")
APP_NAME = os.environ.get("EXAMPLE_APP_NAME", "sharedpool-celery-example")

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)

# The worker's parent runs the coordinator: at most CAP PostgreSQL connections
# across all its pool processes. monitor_dsn: a killed child's slots come back
# once PostgreSQL shows its backends gone.
setup(
    app,
    resources={"pg": Resource(max_size=CAP, acquire_timeout=30, monitor_dsn=PG_URL)},
    socket=os.environ.get("EXAMPLE_SOCKET"),  # None: $SHAREDPOOL_SOCKET, else a private path
    log_level=os.environ.get("EXAMPLE_COORDINATOR_LOG", "warning"),
)

# Made at import in the parent, before the coordinator's socket is known;
# setup() points it at the coordinator when the worker starts, and each pool
# process then opens its own connections, each under a lease.
engine = create_engine(
    PG_URL.replace("postgresql://", "postgresql+psycopg://", 1),
    resource="pg",
    pool_size=1,  # a prefork child runs one task at a time
    max_overflow=0,
    pool_timeout=30,
    pool_pre_ping=True,
    connect_args={"application_name": APP_NAME},
)


@app.task
def double(n: int, sleep: float = 0.0) -> dict[str, Any]:
    """``2 * n``, computed by PostgreSQL."""
    with engine.connect() as conn:
        value, backend, _ = conn.execute(
            text("SELECT CAST(:n AS integer) * 2, pg_backend_pid(), pg_sleep(:s)"),
            {"n": n, "s": sleep},
        ).one()
    return {"value": value, "worker": os.getpid(), "backend": backend}
