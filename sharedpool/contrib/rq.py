"""rq: workers that give back what a job leaves held.

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

``rq.SimpleWorker`` runs jobs in the worker itself, and its pools' connections
serve job after job. But a host library may hold a checkout past the job:
Django checks its connections back in only when a request ends, and a job is
no request, so under the Django ENGINE each worker kept its connection, and
its lease, for good (no reclaim can take a connection in use: with more
workers than the cap, the others' jobs waited for it and failed).
:class:`SimpleWorker` has those given back to their pools after each job
(:func:`sharedpool.process.release_host_checkouts`); use it in place of
``rq.SimpleWorker`` (``-w sharedpool.contrib.rq.SimpleWorker``).
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

from ..process import release_host_checkouts, release_process

__all__ = ["SimpleWorker", "Worker"]


def _threads_left() -> bool:
    """Whether a thread other than sharedpool's own still runs in the horse:
    one the job started may still check a connection in, and the horse's
    ``os._exit()`` would cut its query short, the backend running on with only
    the fence in front of its slot. Daemon threads count too (psycopg_pool's,
    a job's), unlike at Python's exit."""
    me = threading.current_thread()
    return any(t is not me and t.is_alive() and not (t.daemon and t.name.startswith("sharedpool-"))
               for t in threading.enumerate())


class _GivesBack:
    """What a job leaves held given back once it is done, whatever its outcome."""

    def perform_job(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().perform_job(*args, **kwargs)  # type: ignore[misc]  # rq's
        finally:
            if self.is_horse:  # type: ignore[attr-defined]  # rq's
                release_process(wait_in_use=_threads_left())
            else:
                # In the worker itself (no fork): its pools serve the next job.
                release_host_checkouts()


class Worker(_GivesBack, rq.Worker):
    """``rq.Worker`` whose work horse calls :func:`sharedpool.release_process` after its job."""


class SimpleWorker(_GivesBack, rq.SimpleWorker):
    """``rq.SimpleWorker`` that gives back the checkouts a host library (Django)
    holds past each job; its pools stay open for the next one."""
