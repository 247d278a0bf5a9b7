"""gunicorn server hooks: the master owns the coordinator, the workers attach to it.

In ``gunicorn.conf.py``::

    from sharedpool.contrib.gunicorn import hooks

    workers = 8
    on_starting, post_fork, worker_exit, on_exit = hooks(resources={"pg": 4})

* when the config is read, the socket path is chosen and ``$SHAREDPOOL_SOCKET``
  set, so every pool made afterwards (in a worker, or in the master with
  ``preload_app``) finds the coordinator without being told;
* ``on_starting`` (master): start the embedded coordinator, unless one is
  already listening on that path (``socket=`` or ``$SHAREDPOOL_SOCKET`` naming
  an external ``sharedpool serve``);
* ``post_fork`` (worker): nothing to do eagerly; pools and clients are
  fork-aware and open their own session on first use (it only makes sure a
  stop signal that arrives before gunicorn's worker listens is not lost);
* ``worker_exit`` (worker): close the worker's leased connections and end its
  session, so its slots return at once;
* ``on_exit`` (master): stop the coordinator we started, once the slots of
  workers gunicorn killed after ``graceful_timeout`` have left the fence
  (at most ``fence_timeout``): a query such a worker left running counts on.

A stopping master also sends its stop signal a second time, after a second, to
workers still running: one forked just before the stop can miss the first, and
gunicorn would otherwise wait ``graceful_timeout`` for it before the hooks can
end the sessions and stop the coordinator.

A worker that dies without running ``worker_exit`` (SIGKILL after gunicorn's
timeout, the OOM killer) loses its session when the kernel closes its socket;
the coordinator fences its leases and frees them once its connections are gone.

``preload_app``: the app is imported before ``on_starting``, so before the
embedded coordinator runs. Making pools at import time is fine (they connect
on first use), but a query at import time fails: the integrations' pools wait
``pool_timeout`` and raise CoordinatorUnavailable, sharedpool's own
ConnectionPool waits ``acquire_timeout`` and raises PoolTimeout. Query in the workers, or run
``sharedpool serve`` (and pass its ``socket=``) so that a coordinator is
already listening. The coordinator is not started when the config is read:
gunicorn also reads it for ``--check-config`` and before ``--daemon`` forks the
master away from the process that would own the coordinator.

Works with any worker class that forks from the master (``sync``, ``gthread``,
``gevent``, uvicorn's ``UvicornWorker``...).
This module does not import gunicorn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..admin import fixed_fields_changed, limits_changed
from ..config import SOCKET_ENV, CoordinatorConfig, check_seconds, check_socket_path
from ..errors import ConfigError, SharedPoolError
from ..program import hand_on_socket_path
from ._embedded import (
    EmbeddedCoordinator,
    EmbeddedStartError,
    check_embedded_options,
    check_unused_settings,
    compare_served,
    coordinator_listening,
    integration_socket_path,
    release_process,
    wait_for_fences,
)

__all__ = ["GunicornHooks", "hooks"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: When a stopping master sends its stop signal to the workers once more.
RESEND_AFTER = 1.0
#: How long a take-over waits for the old coordinator's socket file to go.
TAKEOVER_GRACE = 5.0

log = logging.getLogger("sharedpool.gunicorn")


def _gunicorn_log() -> logging.Logger:
    """gunicorn's error log once gunicorn has set it up (its format, its
    ``--error-logfile``), else ours. What ``hooks()`` says at a SIGHUP re-read
    went to Python's last-resort stderr handler, bare, and not to that file."""
    error_log = logging.getLogger("gunicorn.error")
    return error_log if error_log.handlers else log


class GunicornHooks(NamedTuple):
    """The four server hooks, in the order ``hooks()`` returns them."""

    on_starting: Callable[[Any], None]
    post_fork: Callable[[Any, Any], None]
    worker_exit: Callable[[Any, Any], None]
    on_exit: Callable[[Any], None]


#: The coordinator this master started (module-level: gunicorn's SIGHUP reload
#: re-reads the config file, and the new hooks must still know it).
_EMBEDDED: dict[str, EmbeddedCoordinator] = {}
#: USR2 take-overs waiting for the old master's coordinator to stop.
_TAKEOVERS: dict[str, _TakeOver] = {}


def hooks(
    resources: Mapping[str, Any] | None = None,
    socket: str | os.PathLike[str] | None = None,
    *,
    restart: bool = True,
    close_timeout: float = 5.0,
    log_level: str = "warning",
    **options: Any,
) -> GunicornHooks:
    """Make the hooks. ``resources`` as for :class:`~sharedpool.Coordinator`
    (``{"pg": 4}`` or ``{"pg": Resource(max_size=4, ...)}``); ``socket`` the
    coordinator's path (default ``$SHAREDPOOL_SOCKET``, else a private path).

    ``restart``: restart the embedded coordinator if it dies. ``close_timeout``:
    how long ``worker_exit`` waits for connections still in use. ``log_level``:
    the coordinator's stderr logging. Other keywords go to
    :class:`~sharedpool.CoordinatorConfig` (``allowed_uids``, ``metrics_port``...).
    """
    check_embedded_options(options, ("resources", "socket", "restart", "close_timeout", "log_level"))
    given = None if socket is None else check_socket_path("socket", socket)
    path = integration_socket_path(given, "gunicorn")
    # Or the one a USR2 take-over is waiting to start (registered once it has).
    served = next(iter(_EMBEDDED), None) or next(iter(_TAKEOVERS), None)
    if served is not None and path != served:
        # gunicorn's SIGHUP re-read a changed socket= in a master whose coordinator
        # serves another path: workers sent there would find nothing listening.
        _gunicorn_log().warning(
            "sharedpool: gunicorn reloaded its config: socket %s not applied, the coordinator "
            "this master started serves %s until gunicorn restarts", path, served)
        path = served
    embedded = _EMBEDDED.get(path)
    if resources is None:
        if embedded is None:  # not at a SIGHUP re-read: gunicorn would exit the master on it
            check_unused_settings(options, restart=restart, log_level=log_level)
    else:
        # Checked now: a bad limit fails when gunicorn reads its config, naming the field.
        try:
            fresh = EmbeddedCoordinator(path, resources, restart=restart,
                                        log_level=log_level, **options)
        except ConfigError as exc:
            if embedded is None:
                raise
            # A SIGHUP re-read: gunicorn exits the master (and its workers) on an error
            # here, for a setting the running coordinator would not apply anyway.
            _gunicorn_log().warning(
                "sharedpool: gunicorn reloaded its config, but the coordinator this master "
                "started keeps its settings until gunicorn restarts: %s", exc)
        else:
            if embedded is None:
                embedded = fresh
            else:  # a SIGHUP re-read: the running coordinator keeps its settings, said so
                # Code with code: a restart after a crash took embedded.config from the
                # file, whose settings then read as changed by this unchanged config.
                changes = _changed_settings(embedded.given, fresh.config)
                if changes:
                    _gunicorn_log().warning(
                        "sharedpool: gunicorn reloaded its config, but the coordinator this master "
                        "started keeps its settings until gunicorn restarts (`sharedpool resize` "
                        "changes a cap live): %s", "; ".join(changes))
    close_timeout = check_seconds("close_timeout", close_timeout)
    os.environ[SOCKET_ENV] = path
    read_by = os.getpid()

    def on_starting(server: Any) -> None:
        nonlocal embedded
        _note_killed_workers(server)
        if embedded is not None and path not in _EMBEDDED and os.getpid() != read_by:
            # --daemon forks the master away after gunicorn read this config: an
            # embedded coordinator only starts in the process that made it.
            embedded = EmbeddedCoordinator(config=embedded.config, restart=restart,
                                           log_level=log_level, start_timeout=embedded.start_timeout)
        _resend_stop_signal(server)
        # gunicorn's binary upgrade (USR2) execs the new master with cfg.env_orig:
        # without this it would pick another path and start a second budget.
        env_orig = getattr(getattr(server, "cfg", None), "env_orig", None)
        if isinstance(env_orig, dict):
            env_orig[SOCKET_ENV] = path
            # A USR2 successor starts its coordinator on this path once ours
            # stops, even when this master is SIGKILLed: the restart marker
            # must stay for it to read (not a private path any more).
            hand_on_socket_path(path)
        if path in _EMBEDDED:
            return
        if coordinator_listening(path):
            server.log.info("sharedpool: using the coordinator already serving %s", path)
            if embedded is not None and not os.environ.get("GUNICORN_PID"):
                for line in compare_served(path, embedded.config.resources):
                    server.log.warning("sharedpool: the coordinator at %s: %s", path, line)
            if embedded is not None and os.environ.get("GUNICORN_PID"):
                # We are the new master of a USR2 upgrade: the old master owns that
                # coordinator and stops it when it exits; take over then (its
                # clients re-register their leases within restart_grace: I4).
                takeover = _TAKEOVERS[path] = _TakeOver()
                threading.Thread(target=_take_over, args=(server, path, embedded, takeover),
                                 name="sharedpool-takeover", daemon=True).start()
            return
        if embedded is None:
            raise EmbeddedStartError(
                f"sharedpool: no coordinator is listening on {path}, and hooks() got no "
                "resources to start one with: pass resources={'name': max_size, ...}, or start "
                "`sharedpool serve` on that path first")
        try:
            embedded.start()
        except SharedPoolError as exc:
            # gunicorn prints a RuntimeError as one line ("Error: ...") and exits 1.
            raise EmbeddedStartError(f"sharedpool: cannot start the coordinator: {exc}") from None
        _EMBEDDED[path] = embedded
        limits = ", ".join(f"{n}={r.max_size}" for n, r in embedded.config.resources.items())
        server.log.info("sharedpool: coordinator pid %s serving %s (%s)", embedded.pid, path, limits)
        shut_out = _workers_shut_out(server, embedded.config)
        if shut_out:
            server.log.warning("sharedpool: %s: every checkout in the workers will fail", shut_out)

    def post_fork(server: Any, worker: Any) -> None:
        # The client is fork-aware and connects on first use; only make sure the
        # path is what the workers see, whatever the app did to the environment.
        os.environ[SOCKET_ENV] = path
        _keep_early_stop_signals(server, worker)

    def worker_exit(server: Any, worker: Any) -> None:
        # gunicorn also calls this in the master for a worker already gone: nothing of ours.
        if getattr(worker, "pid", None) != os.getpid():
            return
        if threading.current_thread() is threading.main_thread():
            # Stopping already: a second stop signal (the master's resend) must not
            # cut this short with gunicorn's sys.exit() in the middle of the release.
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
        try:
            release_process(close_timeout)
        except Exception:  # noqa: BLE001 - the worker is exiting; the fence covers the rest
            _gunicorn_log().exception("sharedpool: releasing leases at worker exit failed")

    def on_exit(server: Any) -> None:
        takeover = _TAKEOVERS.pop(path, None)
        if takeover is not None:
            takeover.cancel()  # after this, a take-over has registered its coordinator or never will
        running = _EMBEDDED.pop(path, None)
        if running is not None:
            killed = getattr(server, "_sharedpool_killed", None)
            if killed:
                wait_for_fences(path, running.config, killed)
            running.stop()
            server.log.info("sharedpool: coordinator for %s stopped", path)

    return GunicornHooks(on_starting, post_fork, worker_exit, on_exit)


def _workers_shut_out(server: Any, config: CoordinatorConfig) -> str | None:
    """Why workers that gunicorn runs as another user (``--user``) cannot use the
    coordinator the master starts as its own, or None. Without this said at the
    start, each worker's first checkout failed on "Permission denied" (the
    socket is 0600) or AccessDenied, with nothing pointing at the settings."""
    cfg = getattr(server, "cfg", None)
    uid, gid = getattr(cfg, "uid", None), getattr(cfg, "gid", None)
    if not isinstance(uid, int) or not isinstance(gid, int) or uid == os.getuid():
        return None
    gids = {gid}
    if getattr(cfg, "initgroups", False):  # --initgroups: the user's supplementary groups too
        with contextlib.suppress(KeyError, OSError):
            gids.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    if not (uid in (config.allowed_uids or (os.getuid(),)) or gids & set(config.allowed_gids)):
        return (f"the workers run as uid {uid} and the coordinator admits only uids "
                f"{list(config.allowed_uids or (os.getuid(),))} and gids {list(config.allowed_gids)}; "
                f"pass allowed_uids=[{uid}] (or allowed_gids) to hooks()")
    if config.group is None:
        return (f"the workers run as uid {uid} and the coordinator's socket is 0600, uid "
                f"{os.getuid()}'s; pass group= a group of the workers to hooks()")
    from ..coordinator import _group_id  # a name or a gid, as the start read it

    try:
        socket_gid = _group_id(config)
    except ConfigError:  # the start has refused it already
        return None
    # Without --initgroups gunicorn keeps the master's supplementary groups.
    reach = gids if getattr(cfg, "initgroups", False) else gids | set(os.getgroups())
    if socket_gid not in reach:  # a 0660 socket of a group they are not in: Permission denied
        return (f"the workers run as uid {uid}, gids {sorted(reach)}, and the coordinator's socket "
                f"is 0660, group {config.group!r}'s (gid {socket_gid}); pass group= a group of the workers")
    return None


def _changed_settings(running: CoordinatorConfig, fresh: CoordinatorConfig) -> list[str]:
    """What a re-read config changes against the one the coordinator was made
    with: one entry per resource added, removed or with other limits, and per
    other setting."""
    out = []
    for name, limits in fresh.resources.items():
        was = running.resources.get(name)
        if was is None:
            out.append(f"resource {name!r} added")
        elif diff := limits_changed(was, limits):
            out.append(f"{name}: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items()))
    out += [f"resource {name!r} removed" for name in running.resources if name not in fresh.resources]
    # The file by name: a relative one re-read under --chdir is another path, not another file.
    out += [f"config_file {running.config_file!r} -> {fresh.config_file!r}" if field == "config_file"
            else f"{field} changed" for field in fixed_fields_changed(running, fresh) if field != "socket"]
    return out


class _TakeOver:
    """A USR2 take-over in progress: ``on_exit`` cancels it, so that a coordinator
    it is starting at that moment is registered (and stopped) or not started."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.lock = threading.Lock()

    def cancel(self) -> None:
        with self.lock:  # waits out a start under way
            self.cancelled.set()


def _take_over(server: Any, path: str, embedded: EmbeddedCoordinator, takeover: _TakeOver) -> None:
    """Start our coordinator once the one the old master owned has stopped.

    It stops accepting before its shutdown ends (metrics port, socket file):
    wait for its socket file to go (bounded: a crashed one leaves it), and
    retry a start that fails meanwhile instead of giving up for good."""
    delay = 0.2
    cancelled = takeover.cancelled
    while not cancelled.is_set():
        while coordinator_listening(path, timeout=0.5):
            if cancelled.wait(0.2):
                return
        gone_by = time.monotonic() + TAKEOVER_GRACE
        while os.path.exists(path) and time.monotonic() < gone_by:
            if cancelled.wait(0.05):
                return
        with takeover.lock:
            if cancelled.is_set():
                return
            try:
                embedded.start()
            except SharedPoolError as exc:
                server.log.error("sharedpool: cannot take over the coordinator on %s yet: %s; "
                                 "retrying in %.1fs", path, exc, delay)
            else:
                # Registered before on_exit can look: it stops this one.
                _EMBEDDED[path] = embedded
                _TAKEOVERS.pop(path, None)
                server.log.info("sharedpool: coordinator pid %s took over %s", embedded.pid, path)
                return
        cancelled.wait(delay)
        delay = min(delay * 2, 5.0)


def _note_killed_workers(server: Any) -> None:
    """Make the master remember the workers it SIGKILLs (those a stop found still
    running after ``graceful_timeout``): ``on_exit`` waits for their fence."""
    kill_workers = getattr(server, "kill_workers", None)
    if kill_workers is None or getattr(kill_workers, "_sharedpool_notes", False):
        return
    killed: set[int] = set()

    def kill_and_note(sig: int) -> None:
        if sig == signal.SIGKILL:
            killed.update(getattr(server, "WORKERS", {}))
        kill_workers(sig)

    kill_and_note._sharedpool_notes = True  # type: ignore[attr-defined]
    server.kill_workers = kill_and_note
    server._sharedpool_killed = killed


def _resend_stop_signal(server: Any) -> None:
    """Make a stopping master send its stop signal again, once, after RESEND_AFTER.

    A worker forked just before the master stops can miss the master's SIGTERM
    altogether: if it arrives before the child first runs, CPython's after-fork
    code clears it as one meant for the parent. gunicorn then waits the whole
    ``graceful_timeout`` (30 s by default) for a worker that never heard it. A
    second SIGTERM to a worker already stopping only sets the same flag again.
    """
    stop = getattr(server, "stop", None)
    if stop is None or getattr(stop, "_sharedpool_resends", False):
        return

    def stop_and_resend(graceful: bool = True) -> None:
        signum = signal.SIGTERM if graceful else signal.SIGQUIT

        def resend() -> None:
            # A pid leaves WORKERS just after the master reaps it; the kernel hands
            # pids out in sequence, so none is reused within that instant.
            workers = getattr(server, "WORKERS", {})
            for pid in list(workers):
                if pid in workers:  # not reaped meanwhile
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)

        timer = threading.Timer(RESEND_AFTER, resend)
        timer.daemon = True
        timer.start()
        try:
            stop(graceful)
        finally:
            timer.cancel()

    stop_and_resend._sharedpool_resends = True  # type: ignore[attr-defined]
    server.stop = stop_and_resend


def _keep_early_stop_signals(server: Any, worker: Any) -> None:
    """Deliver a stop signal that reached this worker before gunicorn listened for it.

    Between ``fork()`` and the worker's ``init_signals()``, a SIGTERM from the
    master runs the arbiter's handler inherited by the child and lands on the
    child's copy of the arbiter's queue, where nothing reads it (gunicorn issue
    #1910). The master then waits the whole ``graceful_timeout`` for a worker
    that never heard it; under ``max_requests`` recycling that happens on any
    stop that meets a worker being born. Here: take the stop signals queued so
    far, catch any that come before ``init_signals()``, and send them again to
    this process once gunicorn's own handlers are in place.
    """
    init_signals = getattr(worker, "init_signals", None)
    if init_signals is None:
        return
    pending: list[int] = []

    def catch(signum: int, frame: Any) -> None:
        pending.append(signum)

    for signum in _STOP_SIGNALS:  # first: from here on nothing goes to the queue
        signal.signal(signum, catch)
    early = getattr(server, "SIG_QUEUE", None)
    try:
        if isinstance(early, list):  # gunicorn < 23
            pending.extend(early)
            early.clear()
        elif early is not None:
            while True:
                try:
                    pending.append(early.get_nowait())
                except queue.Empty:
                    break
    except Exception:  # noqa: BLE001 - another gunicorn's queue: the master's resend covers it
        log.debug("sharedpool: cannot read the arbiter's signal queue", exc_info=True)

    def init_signals_then_replay() -> None:
        init_signals()
        _exit_through_hooks_on_default_stop()
        for signum in dict.fromkeys(pending):  # once each, in order of arrival
            if signum in _STOP_SIGNALS:
                os.kill(os.getpid(), signum)

    worker.init_signals = init_signals_then_replay


def _exit_through_hooks_on_default_stop() -> None:
    """Make a stop signal left at its default action exit the worker through gunicorn.

    uvicorn's ``UvicornWorker`` sets them to SIG_DFL, catches them while it serves,
    and once it has shut down raises the one it stopped for again: the worker
    died by it, and gunicorn's ``finally`` never ran ``worker_exit`` (its leases
    went back through the fence, not at once; their connections never closed).
    A handler set now is the one uvicorn restores before raising: it exits as
    gunicorn's own workers do on SIGINT / SIGQUIT (``sys.exit(0)``)."""
    for signum in _STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _exit_through_hooks)


def _exit_through_hooks(signum: int, frame: Any) -> None:
    sys.exit(0)  # SystemExit: gunicorn's spawn_worker runs worker_exit on its way out
