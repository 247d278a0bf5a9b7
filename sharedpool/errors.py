"""The one exception hierarchy of sharedpool.

Every error we raise derives from :class:`SharedPoolError`, and also from the
builtin a user's existing ``except`` clause would name: a timeout is a
``TimeoutError``, a bad value a ``ValueError``, a lost coordinator a
``ConnectionError``.
"""

from __future__ import annotations

from .redact import redact


class SharedPoolError(Exception):
    """Root of every error raised by sharedpool."""


class ConfigError(SharedPoolError, ValueError):
    """A configuration value or argument is invalid; ``field`` names it.

    A password the message quotes is hidden (``password=***``): the bad value
    may be a DSN given in the wrong place (``--resource pg=<dsn>``, a table's
    ``pg = "postgresql://..."``), and the message reaches a terminal, the
    coordinator's log (a failed reload) and the admin peer's reply."""

    def __init__(self, field: str, message: str) -> None:
        self.field = redact(field)
        self.detail = message = redact(message)
        super().__init__(f"{self.field}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across processes
        return type(self), (self.field, self.detail)


class PoolTimeout(SharedPoolError, TimeoutError):
    """No connection (or no lease) could be had before the deadline."""


class ConnectTimeout(SharedPoolError, TimeoutError):
    """The connection factory did not return within ``connection_timeout``."""


class AcquireCancelled(SharedPoolError):
    """An acquire request was withdrawn by its owner before it was granted."""


class PoolClosed(SharedPoolError):
    """The pool is closed (or draining) and hands out no connections."""


class PoolMisuse(SharedPoolError, ValueError):
    """A wrapper released twice, or released to a pool that did not make it."""


class LeaseDenied(SharedPoolError):
    """The coordinator refused a lease; ``reason`` is its machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.detail = message
        # The code is appended unless the message says it already ("is draining").
        said = reason.replace("_", " ") in message
        super().__init__(message if said else f"{message} ({reason})")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.reason, self.detail)


class UnknownResource(LeaseDenied, LookupError):
    """The coordinator has no resource of that name."""


class TooManyWaiters(LeaseDenied):
    """The resource already has ``max_waiting`` acquires queued."""


class ResourceUnavailable(LeaseDenied):
    """The resource is paused, draining, or failing to connect; try later."""


class ResourceDraining(ResourceUnavailable, PoolClosed):
    """The resource is draining (``sharedpool drain``): what a pool that learns it
    from a refused lease raises, so that ``except PoolClosed`` catches it as it
    does for pools told by the drain's push."""


class CoordinatorUnavailable(SharedPoolError, ConnectionError):
    """The coordinator could not be reached, or the session to it was lost."""


class CoordinatorRunning(SharedPoolError, OSError):
    """Another coordinator is live (or starting) on that socket path."""


class AccessDenied(SharedPoolError, PermissionError):
    """The coordinator refused this peer (uid/gid not allowed, or not an admin)."""


class ProtocolError(SharedPoolError):
    """A frame broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug here)."""


class FrameTooLarge(LocalProtocolError):
    """A message we were to send encodes to ``size`` bytes, over the frame ``limit``."""

    def __init__(self, op: str, size: int, limit: int) -> None:
        self.op, self.size, self.limit = op, size, limit
        super().__init__(f"{op} frame of {size} bytes exceeds {limit}")

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:
        return type(self), (self.op, self.size, self.limit)


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame or message."""


_DENIAL_CLASSES: dict[str, type[LeaseDenied]] = {
    "unknown_resource": UnknownResource,
    "too_many_waiters": TooManyWaiters,
    "paused": ResourceUnavailable,
    "draining": ResourceDraining,
    "failing": ResourceUnavailable,
}


def denial_error(reason: str, message: str) -> SharedPoolError:
    """Translate a coordinator's deny frame into the exception a caller sees."""
    if reason == "timeout":
        return PoolTimeout(message)
    return _DENIAL_CLASSES.get(reason, LeaseDenied)(reason, message)
