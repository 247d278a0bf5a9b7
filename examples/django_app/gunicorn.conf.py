"""gunicorn config: Django workers sharing one PostgreSQL cap through sharedpool.

    gunicorn -c examples/django_app/gunicorn.conf.py --chdir examples/django_app app:application
"""

import os

from sharedpool import Resource
from sharedpool.contrib.gunicorn import hooks

bind = os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("EXAMPLE_WORKERS", "8"))
worker_class = os.environ.get("EXAMPLE_WORKER_CLASS", "sync")  # or "gthread"
threads = int(os.environ.get("EXAMPLE_THREADS", "1"))
control_socket_disable = True  # gunicorn >= 24: no shared ~/.gunicorn/gunicorn.ctl

CAP = int(os.environ.get("EXAMPLE_CAP", "4"))
PG_URL = os.environ.get("EXAMPLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

on_starting, post_fork, worker_exit, on_exit = hooks(
    resources={"pg": Resource(max_size=CAP, acquire_timeout=30, monitor_dsn=PG_URL)},
    socket=os.environ.get("EXAMPLE_SOCKET"),  # None: $SHAREDPOOL_SOCKET, else a private path
    log_level=os.environ.get("EXAMPLE_COORDINATOR_LOG", "warning"),
    close_timeout=float(os.environ.get("EXAMPLE_CLOSE_TIMEOUT", "5")),  # worker_exit waits this for busy ones
)

