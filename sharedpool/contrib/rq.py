"""rq: a forking worker whose work horses give their leases back before they exit.

::

    SHAREDPOOL_SOCKET=/run/sharedpool.sock rq worker -w sharedpool.contrib.rq.Worker -c myjobs

(``-c`` imports ``myjobs``, and the pools it makes, once in the worker: not in every horse.)

RQ's default worker forks a work horse per job, and the horse ends with
``os._exit()``: no atexit hook, no finalizer. Under ``rq.Worker`` the leases a
job took therefore go back only once the coordinator sees the horse's socket
close, through its fence (a ``quarantined`` line in its log per job, and with
``monitor_dsn`` a wait for the backend to go). :class:`Worker` calls
:func:`sharedpool.release_process` in the horse once the job is done, whatever
its outcome, so its connections are closed and its leases given back first.
A checkout the job never gave back is not waited for (nothing can check it in
once the job has returned), unless a thread the job started still runs
(up to 5 s): its lease goes through the fence as the horse exits.

Nothing else changes: pools made at import (in the worker, e.g. by the module
``-c`` names, or in each horse) work as usual. A horse killed mid-job (RQ's
stop-job command, its SIGKILL past ``job_timeout``) still goes through the fence.

``rq.SimpleWorker`` runs jobs in the worker itself: there is nothing to give
back after each job (its connections serve job after job), so use it as is.
For another forking subclass of ``rq.Worker``, subclass both:
``class MyWorker(sharedpool.contrib.rq.Worker, rq.worker.HerokuWorker)``.
Tested with RQ 1.16, 2.12 and 3.0 (``tests/test_rq.py``).
"""

from __future__ import annotations

import threading
from typing import Any

try:
    import rq
except ImportError as exc:
    raise ImportError(f"sharedpool.contrib.rq needs RQ ({exc}); pip install rq") from exc

from ..process import release_process

__all__ = ["Worker"]


def _threads_left() -> bool:
    """Whether a thread other than sharedpool's own still runs in the horse:
    one the job started may still check a connection in, and the horse's
    ``os._exit()`` would cut its query short, the backend running on with only
    the fence in front of its slot. Daemon threads count too (psycopg_pool's,
    a job's), unlike at Python's exit."""
    me = threading.current_thread()
    return any(t is not me and t.is_alive() and not (t.daemon and t.name.startswith("sharedpool-"))
               for t in threading.enumerate())


class Worker(rq.Worker):
    """``rq.Worker`` whose work horse calls :func:`sharedpool.release_process` after its job."""

    def perform_job(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().perform_job(*args, **kwargs)
        finally:
            # perform_job runs in the worker itself only under a non-forking
            # subclass; that process keeps its pools for the next job.
            if self.is_horse:
                release_process(wait_in_use=_threads_left())
