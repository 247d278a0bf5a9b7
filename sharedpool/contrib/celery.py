"""celery: the worker's parent process owns the coordinator, the pool children attach.

One call, next to the app::

    from celery import Celery
    from sharedpool.contrib.celery import setup

    app = Celery("proj", broker="redis://127.0.0.1:6379/0")
    setup(app, resources={"pg": 4})

It connects four signals:

* ``worker_init`` (parent, before the pool forks): start the embedded
  coordinator, unless one is already listening (``socket=`` or
  ``$SHAREDPOOL_SOCKET`` naming an external ``sharedpool serve``); set
  ``$SHAREDPOOL_SOCKET`` for the children; and point the pools and engines
  made at import time, before the socket was known, at it. A coordinator
  that cannot start stops the worker (SystemExit, one line): celery logs an
  Exception from a signal handler and goes on, with no cap on the children;
* ``worker_process_init`` (each prefork child): nothing eager — pools and
  clients are fork-aware and open the child's own session on first use;
* ``worker_process_shutdown`` (each child, as it exits): close its leased
  connections and end its session, so its slots return at once;
* ``worker_shutdown`` (parent): the same for the parent (``solo`` and
  ``threads`` pools run tasks there), then stop the coordinator we started.

Nothing happens in processes that only send tasks. A child killed outright
(``SIGKILL``, the OOM killer) loses its session with its socket; the
coordinator fences its leases until its connections are gone.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

try:
    from celery import Celery, signals
except ImportError as missing:
    raise ImportError(f"sharedpool.contrib.celery needs Celery ({missing}); "
                      "pip install 'sharedpool[celery]'") from missing

from ..config import SOCKET_ENV, check_seconds, check_socket_path
from ..errors import ConfigError, SharedPoolError
from ..process import held_connections
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

__all__ = ["CelerySharedPool", "setup"]

log = logging.getLogger("sharedpool.celery")


@dataclass
class CelerySharedPool:
    """What :func:`setup` connected; ``coordinator`` is set while ours runs."""

    app: Celery
    socket: str | None
    embedded: EmbeddedCoordinator | None
    close_timeout: float
    coordinator: EmbeddedCoordinator | None = None
    handlers: list[Any] = field(default_factory=list)
    #: What worker_init had to say; logged again at worker_ready (celery's logging
    #: is not set up yet at worker_init, so an info line there is dropped).
    started_line: str | None = None
    #: Connections this process opened before the coordinator we started (a query
    #: at import time): not leased, so beyond the cap. Logged at worker_ready.
    unleased_line: str | None = None

    @property
    def socket_path(self) -> str | None:
        """The socket in use once the worker started (``$SHAREDPOOL_SOCKET`` in its processes)."""
        return os.environ.get(SOCKET_ENV) if self.socket is None else self.socket

    def worker_init(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", self.app) is not self.app:
            return
        try:
            self._start()
        except SharedPoolError as exc:
            # celery logs an exception from a signal handler and carries on: the
            # children would then run with no cap at all. Stop the worker instead,
            # with one line on stderr (as gunicorn does).
            raise SystemExit(str(exc)) from exc
        except Exception as exc:
            log.exception("sharedpool: starting the coordinator failed")
            raise SystemExit(f"sharedpool: cannot start the coordinator: {exc!r}") from exc

    def _start(self) -> None:
        path = integration_socket_path(self.socket, "celery")
        if coordinator_listening(path):
            self.started_line = f"sharedpool: using the coordinator already serving {path}"
            log.info("%s", self.started_line)
            if self.embedded is not None:
                for line in compare_served(path, self.embedded.config.resources):
                    log.warning("sharedpool: the coordinator at %s: %s", path, line)
        elif self.embedded is None:
            raise EmbeddedStartError(
                f"sharedpool: no coordinator is listening on {path}, and setup() got no "
                "resources to start one with: pass resources={'name': max_size, ...}, or start "
                "`sharedpool serve` on that path first")
        else:
            self.embedded.move(path)
            try:
                self.embedded.start()
            except SharedPoolError as exc:
                raise EmbeddedStartError(f"sharedpool: cannot start the coordinator: {exc}") from exc
            self.coordinator = self.embedded
            limits = ", ".join(f"{n}={r.max_size}"
                               for n, r in self.embedded.config.resources.items())
            self.started_line = f"sharedpool: coordinator pid {self.embedded.pid} serving {path} ({limits})"
            log.info("%s", self.started_line)
            self._check_unleased()
        # Pools made at import time (before this) read the socket when they first
        # open a connection, so they lease from this coordinator too.
        os.environ[SOCKET_ENV] = path
        self.socket = path

    def _check_unleased(self) -> None:
        # Logged at worker_ready, once celery's logging is up (as started_line).
        # Nothing could lease from the coordinator we have just started: whatever
        # the pools hold now was opened at import (create_all(), reflection, a
        # settings query) without a lease. The parent keeps it, idle, for the
        # worker's whole life, and PostgreSQL counts it beside the children's cap.
        held = held_connections()
        if held:
            counts = ", ".join(f"{n} of {r!r}" for r, n in sorted(held.items()))
            self.unleased_line = (
                f"sharedpool: the worker's main process holds connections opened before its "
                f"coordinator started ({counts}), e.g. by a query at import time: they hold no "
                "lease, so PostgreSQL counts them beyond the cap for as long as they stay open; "
                "run no query at import, or close them after it (engine.dispose(), pool.close())")

    def worker_ready(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", self.app) is not self.app:
            return
        if self.started_line:
            log.info("%s", self.started_line)
        if self.unleased_line:
            log.warning("%s", self.unleased_line)

    def worker_process_init(self, **_: Any) -> None:
        if self.socket is not None:
            os.environ[SOCKET_ENV] = self.socket

    def worker_process_shutdown(self, **_: Any) -> None:
        try:
            release_process(self.close_timeout)
        except Exception:  # noqa: BLE001 - the child is exiting; the fence covers the rest
            log.exception("sharedpool: releasing leases at child exit failed")

    def worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", self.app) is not self.app:
            return
        self.worker_process_shutdown()
        running, self.coordinator = self.coordinator, None
        if running is not None:
            wait_for_fences(running.socket_path, running.config)  # children killed mid-query
            running.stop()
            log.info("sharedpool: coordinator for %s stopped", running.socket_path)

    def disconnect(self) -> None:
        """Disconnect the signal handlers (tests; a second setup() of the app does it itself)."""
        for sig, handler in self.handlers:
            sig.disconnect(handler)
        self.handlers.clear()


#: The last setup() of each app: a second one replaces it.
_SET_UP: weakref.WeakKeyDictionary[Celery, CelerySharedPool] = weakref.WeakKeyDictionary()


def setup(
    app: Celery,
    resources: Mapping[str, Any] | None = None,
    *,
    socket: str | os.PathLike[str] | None = None,
    restart: bool = True,
    close_timeout: float = 5.0,
    log_level: str = "warning",
    **options: Any,
) -> CelerySharedPool:
    """Connect the worker signals for ``app``. ``resources`` as for
    :class:`~sharedpool.Coordinator` (``{"pg": 4}``, or ``Resource(...)`` values);
    ``socket`` the coordinator's path (default ``$SHAREDPOOL_SOCKET`` when the
    worker starts, else a private path). ``restart``: restart the embedded
    coordinator if it dies. ``close_timeout``: how long an exiting child waits
    for connections still in use. ``log_level``: the coordinator's stderr log.
    Other keywords go to :class:`~sharedpool.CoordinatorConfig`.

    Limits are checked here, so a bad one fails when the app is imported."""
    if not isinstance(app, Celery):
        raise ConfigError("app", f"must be a Celery app, got {type(app).__name__}")
    close_timeout = check_seconds("close_timeout", close_timeout)
    check_embedded_options(options, ("app", "resources", "socket", "restart", "close_timeout", "log_level"))
    given = None if socket is None else check_socket_path("socket", socket)
    embedded = None
    if resources is None:
        check_unused_settings(options, restart=restart, log_level=log_level)
    else:
        # Checked now; the path is decided when the worker starts.
        embedded = EmbeddedCoordinator(given or "unset.sock", resources, restart=restart,
                                       log_level=log_level, **options)
    state = CelerySharedPool(app, given, embedded, close_timeout)
    earlier = _SET_UP.get(app)
    if earlier is not None and earlier.handlers:
        # Its module imported twice (`proj.celery` and `celery`): both states'
        # handlers ran, the second worker_init starting a second coordinator.
        log.warning("sharedpool: setup() called again for the Celery app %r: the earlier "
                    "setup's signal handlers are replaced", app.main)
        earlier.disconnect()
    _SET_UP[app] = state
    for sig, handler in (
        (signals.worker_init, state.worker_init),
        (signals.worker_ready, state.worker_ready),
        (signals.worker_process_init, state.worker_process_init),
        (signals.worker_process_shutdown, state.worker_process_shutdown),
        (signals.worker_shutdown, state.worker_shutdown),
    ):
        sig.connect(handler, weak=False)
        state.handlers.append((sig, handler))
    return state
