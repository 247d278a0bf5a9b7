"""What gives a uWSGI worker's slots back as it exits.

gunicorn, celery and RQ call :func:`sharedpool.release_process` from a hook of
theirs at a worker's exit. uWSGI has no such hook to configure, and each worker
it recycled (``max-requests``), reloaded (SIGHUP), stopped (SIGINT, SIGQUIT) or
cheaped left its leases to the coordinator's fence: a quarantine per exit, the
slots unusable meanwhile.

As a worker, mule or spooler exits gracefully, uWSGI's python plugin calls
``uwsgi.atexit`` and then finalizes the interpreter (Python's :mod:`atexit`),
in that process, from its loop or its signal handler. It skips both in a worker
busy in a request then (a stop that cuts one short), in async mode (``async``
> 1, gevent), and with ``skip-atexit``; ``skip-atexit-teardown`` skips Python's
only. A SIGKILL (harakiri, a mercy run out) runs nothing. In those cases the
fence still frees the slots.

Imported in a uWSGI process, sharedpool sets ``uwsgi.atexit`` to release this
process's pools after the app's own (one set before, or set in the master
before a worker is forked, is chained) and registers the same with
:mod:`atexit` for an app that replaces ``uwsgi.atexit`` later: whichever runs
first releases, once. Never in the master: its exit is not a worker's.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from .atfork import in_child

__all__ = ["EXIT_TIMEOUT", "exit_timeout", "install_uwsgi_exit", "release_at_exit"]

log = logging.getLogger("sharedpool")

#: How long an exiting uWSGI process waits at most for its pools (as gunicorn's
#: ``worker_exit``): connections in use, servers to let go of those closed.
EXIT_TIMEOUT = 5.0
#: Beyond the release's own timeout, what its thread is given to end.
JOIN_GRACE = 1.0
#: uWSGI's options bounding how long an exiting process may take before it is SIGKILLed.
MERCY_OPTIONS = ("worker-reload-mercy", "reload-mercy", "mule-reload-mercy")

#: Set by install_uwsgi_exit(): release_process (passed in: process.py imports this module).
_RELEASE: list[Callable[[float], None]] = []
#: The pid whose pools were released at its exit (uwsgi.atexit, then Python's atexit).
_RELEASED_IN = [0]
#: Marks the ``uwsgi.atexit`` callables set here.
_OURS = "_sharedpool_release_at_exit"
#: uWSGI's stop and reload signals: a second one reaching an exiting process
#: (Ctrl-C signals the whole process group, then the master signals each worker
#: again) runs uWSGI's handler, which exits at once, mid-release.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)


def exit_timeout(uwsgi: Any) -> float:
    """:data:`EXIT_TIMEOUT`, or half the shortest mercy uWSGI's options give an
    exiting process if that is less: the exit ends well before uWSGI kills it."""
    bounds = [EXIT_TIMEOUT]
    for name in MERCY_OPTIONS:
        value = uwsgi.opt.get(name)
        if isinstance(value, list):  # given more than once: uWSGI keeps the last
            value = value[-1]
        try:
            mercy = float(value)
        except (TypeError, ValueError):
            continue
        if mercy > 0:
            bounds.append(mercy / 2)
    return min(bounds)


def _ignore_stop_signals() -> None:
    """Ignore further stop signals in this exiting process, for good: uWSGI's
    C handlers cannot be put back from Python, and the mercy's SIGKILL still
    bounds the exit. Only the main thread may set handlers; off it, unchanged."""
    try:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def _release(timeout: float) -> None:
    try:
        _RELEASE[0](timeout)
    except Exception:  # noqa: BLE001 - the process is exiting; the fence covers the rest
        log.exception("sharedpool: releasing leases at uWSGI process exit failed")


def release_at_exit() -> None:
    """In a uWSGI process other than the master, once: release its pools
    (:func:`sharedpool.release_process`) within :func:`exit_timeout`."""
    uwsgi = sys.modules.get("uwsgi")
    pid = os.getpid()
    if uwsgi is None or not _RELEASE or _RELEASED_IN[0] == pid:
        return
    try:
        if pid == uwsgi.masterpid():  # 0 without a master process: every process is a worker
            return
        timeout = exit_timeout(uwsgi)
    except Exception:  # noqa: BLE001 - not uWSGI's module after all: nothing of ours to do
        return
    _RELEASED_IN[0] = pid
    _ignore_stop_signals()
    # uWSGI exits from its signal handler, on a thread it may have cut short
    # inside a pool (a mule's loop, a lazy app's import) holding that pool's
    # lock: released in a thread of its own, waited for no longer than the bound.
    releasing = threading.Thread(target=_release, args=(timeout,), name="sharedpool-uwsgi-exit",
                                 daemon=True)
    try:
        releasing.start()
    except RuntimeError:  # no new thread at the interpreter's finalization (Python 3.12+)
        _release(timeout)
        return
    releasing.join(timeout + JOIN_GRACE)


def _chained(earlier: Callable[[], object] | None) -> Callable[[], None]:
    def at_exit() -> None:
        try:
            if earlier is not None:
                earlier()  # the app's own first: it may still use a pool
        finally:
            release_at_exit()

    setattr(at_exit, _OURS, True)
    return at_exit


def _chain_uwsgi_atexit() -> None:
    """Set ``uwsgi.atexit`` to :func:`release_at_exit`, after the one the app set, unless it is ours."""
    uwsgi: Any = sys.modules.get("uwsgi")
    if uwsgi is None:
        return
    earlier = getattr(uwsgi, "atexit", None)
    if not getattr(earlier, _OURS, False):
        uwsgi.atexit = _chained(earlier)


def install_uwsgi_exit(release: Callable[[float], None]) -> None:
    """Imported in a uWSGI process: have each of its processes but the master
    call ``release(timeout)`` (:func:`sharedpool.release_process`) as it exits."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or not callable(getattr(uwsgi, "masterpid", None)) or _RELEASE:
        return
    _RELEASE.append(release)
    try:
        _chain_uwsgi_atexit()
    except Exception as exc:  # noqa: BLE001 - some other "uwsgi" (a test's fake): importing must not fail
        log.warning("sharedpool: uWSGI's atexit could not be set (%r): a worker's exit "
                    "leaves its slots to the fence", exc)
        return
    # One set by the app in the master after this import is chained in each
    # worker; one set later still leaves Python's atexit to release.
    in_child(_chain_uwsgi_atexit)
    atexit.register(release_at_exit)
