"""What the pools of a process hang on its session: handlers for reclaims
and admin pushes, and the providers of the lease states its reports carry (a
part of :class:`~sharedpool.client.Client`), changed safely even from a
garbage collector's finalizer.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


class Hooks:
    """The handler lists of a Client (a mixin: its state is made by
    :meth:`_init_hooks`, from the client's own state reset)."""

    if TYPE_CHECKING:
        def _notify(self) -> None: ...

    def _init_hooks(self) -> None:
        self._reclaim_handlers: dict[str, list[Callable[[], object]]] = {}
        self._push_handlers: list[Callable[[str, str | None, dict[str, Any]], None]] = []
        self._state_providers: list[Callable[[], list[list[Any]]]] = []
        self._handlers_lock = threading.RLock()
        #: changes to the handler lists not applied yet (see _change_handlers)
        self._handler_changes: collections.deque[Callable[[], None]] = collections.deque()
        self._changing_handlers = False

    # The handler lists are replaced, never changed in place: a loop over them
    # in progress is not disturbed. Each change is queued, then applied by
    # whichever thread is not already applying changes: the garbage collector
    # runs finalizers at any allocation, inside a change too, and one that
    # closes a pool (or a lease book's, forget_later) must neither wait for the
    # lock its own thread holds nor have its change overwritten by the change
    # it interrupted. Its change waits in the queue for the outer one to apply.

    def on_reclaim(self, resource: str, handler: Callable[[], object]) -> None:
        """``handler()`` is called from the background thread when the
        coordinator asks for leases of ``resource`` back."""
        def add() -> None:
            handlers = self._reclaim_handlers
            if not any(h is handler for h in handlers.get(resource, ())):
                self._reclaim_handlers = {**handlers, resource: [*handlers.get(resource, ()), handler]}

        self._change_handlers(add)

    def on_push(self, handler: Callable[[str, str | None, dict[str, Any]], None]) -> None:
        """``handler(verb, resource, args)`` is called from the background thread
        for what the coordinator pushes: drain, resume, resize, end_session, and
        revoke (``args["lease"]`` was not re-registered after a restart: close
        its connection; the client has already forgotten the lease). After a
        reconnect, ``"welcome"`` with ``args["resources"]``: the new session's
        limits and state (``"draining"``), for what the old session pushed."""
        def add() -> None:
            if not any(h is handler for h in self._push_handlers):
                self._push_handlers = [*self._push_handlers, handler]

        self._change_handlers(add)

    def add_state_provider(self, provider: Callable[[], list[list[Any]]]) -> None:
        """``provider()`` returns ``[lease, state, backend_pid, site]`` rows for reports."""
        def add() -> None:
            if not any(h is provider for h in self._state_providers):
                self._state_providers = [*self._state_providers, provider]

        self._change_handlers(add)

    def remove_handlers(self, *handlers: Any) -> None:
        """Forget handlers and state providers given to the methods above."""
        self._change_handlers(functools.partial(self._remove_handlers, handlers))

    def forget_later(self, *handlers: Any) -> None:
        """:meth:`remove_handlers` for a finalizer: takes no lock and builds
        nothing; the background thread, woken here, applies it (or the next
        change of the lists, or close_if_unused)."""
        self._handler_changes.append(functools.partial(self._remove_handlers, handlers))
        with contextlib.suppress(Exception):  # a finalizer must not raise (closed, forked)
            self._notify()

    def _change_handlers(self, change: Callable[[], None] | None = None) -> bool:
        """Queue ``change``, then apply every queued change unless this thread
        is already doing so (re-entered by a finalizer): False then."""
        if change is not None:
            self._handler_changes.append(change)
        with self._handlers_lock:  # re-entrant: a finalizer on this thread never waits for it
            if self._changing_handlers:
                return False
            self._changing_handlers = True
            try:
                while self._handler_changes:
                    # Dequeued once applied: cut short by a signal handler's
                    # exception, it stays for the next applier (each change can
                    # be applied twice), never lost to the thread that queued it.
                    try:
                        self._handler_changes[0]()
                    except Exception:  # a change that fails fails once (not a signal's exception)
                        self._handler_changes.popleft()
                        raise
                    self._handler_changes.popleft()
            finally:
                self._changing_handlers = False
        return True

    def _remove_handlers(self, gone: tuple[Any, ...]) -> None:
        # By identity: a handler's own __eq__ is not ours to call.
        ids = {id(h) for h in gone}
        self._reclaim_handlers = {resource: [h for h in hs if id(h) not in ids]
                                  for resource, hs in self._reclaim_handlers.items()}
        self._push_handlers = [h for h in self._push_handlers if id(h) not in ids]
        self._state_providers = [h for h in self._state_providers if id(h) not in ids]
