"""Configuration: the local pool's knobs, a resource's global limits, and loading them.

Every value is checked when the object is made, so a bad value fails where it
was written, with a :class:`~sharedpool.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import json
import logging
import math
import numbers
import os
import pwd
import re
import stat
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, NoReturn, TypeVar

from .errors import ConfigError

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., None])

SOCKET_ENV = "SHAREDPOOL_SOCKET"
AWAY_POLICIES = ("wait", "fallback")
#: Longest path a Unix socket can be bound to (sun_path is 108 bytes on Linux).
MAX_SOCKET_PATH = 107
#: Largest integer the wire (msgpack int64) can carry: a limit above it could
#: never be sent in a welcome, so every new session would be refused.
MAX_INT = 2**63 - 1


def default_socket_path() -> str:
    """The socket path used when none is given.

    ``$SHAREDPOOL_SOCKET`` if set; else ``$XDG_RUNTIME_DIR/sharedpool/sharedpool.sock``;
    else ``/tmp/sharedpool-<uid>/sharedpool.sock``. The coordinator, the pools and
    the CLI all resolve it the same way.
    """
    env = os.environ.get(SOCKET_ENV)
    if env == "":  # as for a pool (env_socket_path): a blank template value is a mistake
        raise ConfigError(SOCKET_ENV, "is set but empty: unset it for the default path, "
                          "or set it to the coordinator's socket path")
    if env:
        # Named as the variable: checked later as ``socket`` it read as a setting
        # of the file's [coordinator] table ("coordinator.socket"), which had none.
        return check_socket_path(SOCKET_ENV, env)
    return runtime_socket_path("sharedpool.sock")


def tmp_socket_path() -> str:
    """The default socket path without ``$XDG_RUNTIME_DIR`` (a systemd service, cron)."""
    return os.path.join("/tmp", f"sharedpool-{os.getuid()}", "sharedpool.sock")


def runtime_socket_path(name: str) -> str:
    """``name`` in the per-user socket directory: ``$XDG_RUNTIME_DIR/sharedpool``
    if that variable names a directory, else ``/tmp/sharedpool-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not (runtime and os.path.isdir(runtime)):
        return os.path.join("/tmp", f"sharedpool-{os.getuid()}", name)
    path = os.path.join(runtime, "sharedpool", name)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        # Else the error named the socket path only: nobody had given one.
        raise ConfigError("XDG_RUNTIME_DIR", f"{runtime} makes the default socket path {path} too "
                          f"long for a Unix socket ({size} bytes, at most {MAX_SOCKET_PATH}): set "
                          f"${SOCKET_ENV} or give the socket path")
    return path


def _number(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    integer: bool = False,
    optional: bool = False,
    strict_min: bool = False,
) -> Any:
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        # With its range: "must be a number, got '10'" left the user to find out
        # the next rule by the next error.
        want = ("an integer" if integer else "a number") + f" {'>' if strict_min else '>='} {minimum:g}"
        if optional:
            want += " or None"
        raise ConfigError(name, f"must be {want}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be finite (a number {'>' if strict_min else '>='} {minimum:g}), "
                          f"got {value!r}")
    if value < minimum or (strict_min and value == minimum):
        op = ">" if strict_min else ">="
        raise ConfigError(name, f"must be {op} {minimum:g}, got {value!r}")
    if isinstance(value, int) and value > MAX_INT:
        raise ConfigError(name, f"must be <= {MAX_INT}, got {value!r}")
    return value


#: The largest frame a 4-byte length prefix can announce.
MAX_FRAME_LIMIT = (1 << 32) - 1


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}")
    return value


def keywords_checked(init: _F, known: frozenset[str], refuse: Callable[[str], NoReturn]) -> _F:
    """``init`` (an ``__init__``) wrapped so that a keyword not in ``known`` goes to
    ``refuse`` (which raises a ConfigError naming it) before ``init`` runs."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.keys() <= known:
            refuse(min(set(kwargs) - known))
        init(self, *args, **kwargs)

    return __init__  # type: ignore[return-value]


def _named_keywords(cls: type[_T]) -> type[_T]:
    """A misspelt keyword (``PoolConfig(max_szie=3)``) is a ConfigError naming it
    and listing the fields, as in a TOML table, not Python's TypeError, which
    named it and said nothing of what was allowed."""
    known = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]

    def refuse(name: str) -> NoReturn:
        raise ConfigError(name, f"unknown setting of {cls.__name__}; allowed: {', '.join(sorted(known))}")

    cls.__init__ = keywords_checked(cls.__init__, known, refuse)  # type: ignore[method-assign]
    return cls


@_named_keywords
@dataclass(frozen=True)
class PoolConfig:
    """Knobs of one process's local pool (the seed's names and defaults).

    ``min_size`` connections are kept open when leases allow; ``max_size`` caps
    this process's pool (the global cap is the resource's). Times are seconds.
    """

    min_size: int = 5
    max_size: int = 20
    connection_timeout: float = 30.0
    acquire_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_lifetime: float = 3600.0
    validation_interval: float = 30.0
    test_on_acquire: bool = True
    test_on_release: bool = False
    #: A connection used less than this long ago is not re-validated on acquire.
    validation_bypass: float = 0.5
    #: Checked out longer than this: warn with the acquiring stack (None: off).
    leak_detection_threshold: float | None = None
    #: While the coordinator is away: "wait" for it, or "fallback" to a local cap.
    coordinator_away: str = "wait"
    #: The per-process cap used while away when ``coordinator_away="fallback"``.
    fallback_max_size: int = 1
    #: Longest wait, after close(), for the server to drop a socket connection.
    close_confirm_timeout: float = 2.0

    def __post_init__(self) -> None:
        _number("min_size", self.min_size, integer=True)
        _number("max_size", self.max_size, integer=True, minimum=1)
        if self.min_size > self.max_size:
            raise ConfigError(
                "min_size", f"must be <= max_size ({self.max_size}), got {self.min_size}"
            )
        for name in (
            "connection_timeout",
            "idle_timeout",
            "max_lifetime",
            "validation_interval",
        ):
            _number(name, getattr(self, name), strict_min=True)
        _number("acquire_timeout", self.acquire_timeout)
        _number("validation_bypass", self.validation_bypass)
        _number("close_confirm_timeout", self.close_confirm_timeout)
        _number(
            "leak_detection_threshold",
            self.leak_detection_threshold,
            optional=True,
            strict_min=True,
        )
        _bool("test_on_acquire", self.test_on_acquire)
        _bool("test_on_release", self.test_on_release)
        if self.coordinator_away not in AWAY_POLICIES:
            raise ConfigError(
                "coordinator_away",
                f"must be one of {', '.join(AWAY_POLICIES)}, got {self.coordinator_away!r}",
            )
        _number("fallback_max_size", self.fallback_max_size, integer=True, minimum=1)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "pool") -> PoolConfig:
        """Build from a TOML table / dict, rejecting unknown keys by name."""
        return _from_mapping(cls, data, where)


@_named_keywords
@dataclass(frozen=True)
class Resource:
    """A named global budget, enforced by the coordinator across all processes.

    ``max_size`` is the hard cap on leases (so on open connections).
    ``max_per_process`` caps one session; ``min_per_process`` is a floor that
    reclaim never takes from a session (the process's, not a pool's: one of its
    pools gives an idle lease up for another of its pools that waits);
    ``max_waiting`` bounds the acquires
    queued for a free lease (``None``: unbounded; one that waits only because
    its own process holds ``max_per_process`` is not counted: a process may
    queue that many of those itself).
    ``acquire_timeout`` is the default wait when the client does not give one.
    ``fairness_quantum``: a process holding a connection others wait for gives it
    back at checkin once it is this old (seconds); ``"auto"`` picks 120 times what a
    hand-off costs (connect + confirmed close, measured by the pools; the
    coordinator takes the median), within 0.05-1 s (see :mod:`sharedpool.handoff`).
    ``quarantine_delay`` is how long a dead session's slots stay fenced when no
    check can confirm its connections are gone; with ``monitor_dsn`` set the
    coordinator asks PostgreSQL instead.
    """

    max_size: int
    max_per_process: int | None = None
    min_per_process: int = 0
    max_waiting: int | None = None
    acquire_timeout: float = 10.0
    fairness_quantum: float | str = "auto"
    quarantine_delay: float = 0.05
    # Not in repr: it may hold a password, and a config is shown whole in some errors.
    monitor_dsn: str | None = field(default=None, repr=False)
    fence_action: str = "wait"
    fence_timeout: float = 10.0

    def __post_init__(self) -> None:
        _number("max_size", self.max_size, integer=True, minimum=1)
        _number("max_per_process", self.max_per_process, integer=True, minimum=1, optional=True)
        _number("min_per_process", self.min_per_process, integer=True)
        if self.min_per_process > self.max_size:
            raise ConfigError("min_per_process", f"must be <= max_size ({self.max_size})")
        if self.max_per_process is not None and self.min_per_process > self.max_per_process:
            raise ConfigError(
                "min_per_process", f"must be <= max_per_process ({self.max_per_process})"
            )
        _number("max_waiting", self.max_waiting, integer=True, optional=True)
        _number("acquire_timeout", self.acquire_timeout)
        if self.fairness_quantum != "auto":
            try:
                _number("fairness_quantum", self.fairness_quantum)
            except ConfigError:
                raise ConfigError("fairness_quantum", f"must be a number of seconds >= 0 or \"auto\", "
                                  f"got {self.fairness_quantum!r}") from None
        _number("quarantine_delay", self.quarantine_delay)
        _number("fence_timeout", self.fence_timeout, strict_min=True)
        dsn = self.monitor_dsn
        if dsn is not None and (not isinstance(dsn, str) or not dsn):
            # Its kind only: a list or table holding the DSN (a TOML typo) holds its password.
            got = "an empty string" if isinstance(dsn, str) else f"a {type(dsn).__name__}"
            raise ConfigError("monitor_dsn", f"must be a non-empty string or None, got {got}")
        if self.fence_action not in ("wait", "terminate"):
            raise ConfigError(
                "fence_action", f"must be 'wait' or 'terminate', got {self.fence_action!r}"
            )

    @classmethod
    def coerce(cls, name: str, spec: Any) -> Resource:
        """Accept ``4``, ``Resource(...)`` or a mapping of its fields."""
        if isinstance(spec, Resource):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            try:
                return cls(max_size=spec)
            except ConfigError as exc:  # name the resource, as for a table
                raise ConfigError(f"resources.{name}.{exc.field}", exc.detail) from None
        if isinstance(spec, dict):
            return _from_mapping(cls, spec, f"resources.{name}")
        raise ConfigError(
            f"resources.{name}", f"must be a max_size integer, a Resource or a table, got {spec!r}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The limits as plain data (the monitor DSN is left out: it may hold a password)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "monitor_dsn"}


def check_socket_path(name: str, value: Any) -> str:
    """A path a Unix socket can have (str or os.PathLike, no NUL, no leading ~,
    at most MAX_SOCKET_PATH bytes), as a str; else a ConfigError naming ``name``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"must be a path, got {value!r}")
    if "\0" in value:
        raise ConfigError(name, f"must not contain a NUL byte, got {value!r}")
    if value.startswith("~"):
        # Only a shell expands it: from a TOML file or an environment file, serve made a
        # directory named "~" in its working directory and listened there, unfound.
        raise ConfigError(name, f"{value} starts with ~, which is not expanded here (only a shell "
                          f"does that): give the absolute path, e.g. {os.path.expanduser(value)}")
    size = len(os.fsencode(value))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(name, f"{value} is too long for a Unix socket "
                          f"({size} bytes, at most {MAX_SOCKET_PATH})")
    return value


def not_a_socket(path: str) -> str | None:
    """What ``path`` is if it exists and is no socket ("a regular file", "a
    directory"), else None: connecting to one says only "Connection refused",
    which reads as a coordinator that is not running."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISSOCK(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode)
            else "a fifo" if stat.S_ISFIFO(mode) else "no socket")


def denied_at(path: str) -> str:
    """What refuses this process ``path`` for lack of permission, with its mode and
    owner: the first directory on the way it may not enter, else ``path`` itself if it
    exists (a socket it may not write), else the directory it would be made in. E.g.
    "directory /run/x is drwx------ (mode 0700) owned by postgres": "[Errno 13]
    Permission denied" alone did not say where, nor whose it was."""
    path = os.path.abspath(path)
    # As the kernel checks it: with the effective ids (a setuid program), where it can.
    effective = os.access in os.supports_effective_ids
    parent = "/"
    for part in [p for p in os.path.dirname(path).split("/") if p]:
        entry = os.path.join(parent, part)
        if not os.path.isdir(entry):
            return _mode_and_owner(parent)  # the rest is to be made in ``parent``
        if not os.access(entry, os.X_OK, effective_ids=effective):
            return _mode_and_owner(entry)
        parent = entry
    return _mode_and_owner(path if os.path.lexists(path) else parent)


def _mode_and_owner(path: str) -> str:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    owner = user_name(st.st_uid)
    kind = ("directory" if stat.S_ISDIR(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "file")
    return (f"{kind} {path} is {stat.filemode(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}) "
            f"owned by {owner}")


def user_name(uid: int) -> str:
    """``uid``'s user name, or "uid N" for a uid no user has (a container's, a removed user's)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def explain_denied(exc: OSError, path: str | None = None) -> OSError:
    """``exc``, if a "Permission denied" at ``path`` (else its own filename), as one
    that says what denied it (:func:`denied_at`); any other error as it is."""
    where = path if path is not None else exc.filename
    if exc.errno != errno.EACCES or not isinstance(where, str):
        return exc
    return OSError(exc.errno, f"{exc.strerror} ({denied_at(where)})", *(
        (exc.filename,) if exc.filename is not None else ()))


def check_seconds(name: str, value: Any, *, optional: bool = False, forever: bool = False,
                  positive: bool = False, host_wait: bool = False) -> Any:
    """A finite number of seconds >= 0 (> 0 when ``positive``; or None when
    ``optional``, or inf when ``forever``: a wait with no end); else a
    ConfigError naming ``name``. ``host_wait``: a host library's pool waits
    this long on a lock, which raises OverflowError beyond threading.TIMEOUT_MAX.
    Returns the value, a numpy-like real (numbers.Real: numpy's float32, int64) as
    a float or int: "must be a number, got np.int64(5)" was no reason, and such a
    number cannot go on the wire (msgpack) nor into a message's {:g}."""
    value = _plain_real(value)
    if forever and value == math.inf and not isinstance(value, bool):
        return value
    value = _number(name, value, optional=optional, strict_min=positive)
    if host_wait and value is not None and value > threading.TIMEOUT_MAX:
        raise ConfigError(name, f"must be at most {threading.TIMEOUT_MAX:.0f} seconds (the longest "
                                f"wait a lock takes), got {value!r}")
    return value


def _plain_real(value: Any) -> Any:
    """A numbers.Real that is neither int nor float (nor bool) as one of them; else ``value``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool | int | float):
        try:
            return int(value) if isinstance(value, numbers.Integral) else float(value)
        except (TypeError, ValueError, OverflowError):
            return value  # refused below, as it was given
    return value


def check_host_number(name: str, value: Any, *, integer: bool = False, optional: bool = False) -> None:
    """A host library's size or time, by kind only (its own checks say what range):
    a real number, numpy's too (a float where the library only compares it); an
    integer with ``integer`` (it counts with it: range()); None when ``optional``.
    Else a ConfigError naming ``name``: a string failed deep inside the library."""
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)
            or (not integer and math.isnan(value))):
        want = ("an integer" if integer else "a number") + (" or None" if optional else "")
        raise ConfigError(name, f"must be {want}, got {value!r}")


def _is_table(value: Any) -> bool:
    """A TOML table, or an array of tables (``[[name]]``), as tomllib reads them."""
    return isinstance(value, dict) or (isinstance(value, list) and bool(value)
                                       and all(isinstance(v, dict) for v in value))


#: What an asyncio user is told: the pools are synchronous, used from a thread.
NO_ASYNCIO = ("sharedpool's pools are synchronous (there is no asyncio API): use one from "
              "async code in a thread (asyncio.to_thread)")
#: ... and what to give them instead.
SYNC_INSTEAD = f"pass a sync one (psycopg.connect, not psycopg.AsyncConnection.connect); {NO_ASYNCIO}"


def blocked_loop_note() -> str:
    """For a timeout: what it cost if the wait ran on an asyncio event loop's
    thread (an ``async def`` calling the pool): the whole loop stood still, so
    its tasks holding connections could not give them back; else ""."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return ""
    return ("; this wait blocked a running asyncio event loop, whose tasks could not return "
            "their connections meanwhile (call the pool from a thread: asyncio.to_thread)")


def check_sync_callable(name: str, value: Any) -> None:
    """Refuse a coroutine function where the pool calls and uses the result
    at once: its coroutine is never awaited, and one awaited by its caller
    later (a connection) is a connection the pool never counted (I1)."""
    if inspect.iscoroutinefunction(value):
        raise ConfigError(name, f"is a coroutine function ({value!r}): {SYNC_INSTEAD}")


def check_not_awaitable(name: str, result: Any) -> None:
    """Refuse what ``name`` returned if it is awaitable (a lambda around an
    async connect); a coroutine is closed, so it never runs."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: no "never awaited" warning, no connection
        raise ConfigError(name, f"returned an awaitable ({type(result).__name__}), not a "
                                f"connection: {SYNC_INSTEAD}")


def env_socket_path() -> str | None:
    """``$SHAREDPOOL_SOCKET`` for a pool: None when unset (a process-local pool),
    else checked as a socket path naming the variable. Set but empty is an
    error: a pool must not quietly run uncapped because a template left it blank."""
    value = os.environ.get(SOCKET_ENV)
    if value == "":
        raise ConfigError(SOCKET_ENV, "is set but empty: unset it for a process-local pool, "
                          "or set it to the coordinator's socket path")
    return None if value is None else check_socket_path(SOCKET_ENV, value)


#: Longest resource name; uid_t / gid_t are 32 bits.
MAX_NAME = 200
MAX_ID = 2**32 - 1


def check_resource_name(name: Any) -> str:
    """A resource name is a non-empty string of printable characters, at most
    200 of them, with no whitespace at either end."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        shown = f"{len(name)} characters" if isinstance(name, str) and name else repr(name)
        raise ConfigError("resource", f"must be a non-empty name of at most {MAX_NAME} characters, "
                          f"got {shown}")
    if name != name.strip():  # `--resource " pg=3"`: served as " pg", every pool's "pg" unknown
        raise ConfigError("resource", f"must not begin or end with whitespace, got {name!r}")
    try:  # sent in every welcome: a traceback from its encoding before
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("resource", f"must be UTF-8 text, got {name!r}") from None
    if not name.isprintable():  # "pg\x00x" from a TOML escape: served, and written raw to the log
        # Invisible ones too (U+200B...): "pg\u200b" looks like "pg" in every listing.
        raise ConfigError("resource", f"must be printable text (no control, line-break or invisible "
                          f"formatting characters), got {name!r}")
    return name


def coerce_resources(resources: Any) -> dict[str, Resource]:
    """Normalise ``{"pg": 4, "api": Resource(...)}`` into ``{name: Resource}``."""
    if not isinstance(resources, dict) or not resources:
        raise ConfigError(
            "resources", f"must be a non-empty mapping of name to limits, got {resources!r}"
        )
    return {check_resource_name(k): Resource.coerce(k, v) for k, v in resources.items()}


#: ``CoordinatorConfig.beside_file`` not given (see there).
_UNSTATED: tuple[str, ...] = ("<not given>",)


@_named_keywords
@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything ``sharedpool serve`` needs; loadable from TOML.

    ``allowed_uids``/``allowed_gids``: peers admitted (default: our own uid).
    ``admin_uids``: peers allowed admin verbs (default: our own uid).
    ``group``: with it, the socket is 0660 and owned by that group.
    ``restart_grace``: after a restart (a dead coordinator's socket found, or
    a clean stop with leases out), grant nothing for this long, so that every
    process still holding connections re-registers them first. It must
    exceed the clients' longest reconnect backoff (1 s). Also how long the
    leases of a session its process dropped (no goodbye; the process runs on)
    stay counted for it to reconnect and re-register them.
    ``max_frame``: the largest frame accepted from a peer; replies stay within
    1 MiB, what clients read (a larger one is refused as ``reply_too_large``),
    and the welcome listing every resource must fit. Clients do not learn it:
    they send reports in frames of up to 64 KiB and a reconnect's hello of up
    to 1 MiB (some 2,000 held leases per 64 KiB), so below 64 KiB a busy
    process's report ends its session, and a hello re-registering more held
    leases than fit is refused.
    ``hello_timeout``: a session that has not said hello within this long is
    closed. ``frame_timeout``: a frame begun but not finished within this long
    ends the session.
    """

    socket_path: str = field(default_factory=default_socket_path)
    resources: dict[str, Resource] = field(default_factory=dict)
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    admin_uids: tuple[int, ...] = ()
    group: str | None = None
    max_frame: int = 1 << 20
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    config_file: str | None = None
    restart_grace: float = 1.5
    hello_timeout: float = 10.0
    frame_timeout: float = 30.0
    #: What :meth:`load` took from flags over the file; a reload applies them again.
    overrides: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: The settings given as keywords beside ``config_file=`` (``hooks(resources,
    #: config_file=..., group=...)``), in no file nor override: ``resources.NAME``
    #: for a resource, else the field's name. A reload or restart keeps them: a
    #: resource until the file names it (then the file's limits apply), a
    #: ``[coordinator]`` setting as given. Not given (a config made in code with a
    #: ``config_file``, not by :meth:`load`): its resources and every setting but
    #: the socket that is not the default, as ``Coordinator(..., config_file=...)`` keeps them.
    beside_file: tuple[str, ...] = field(default=_UNSTATED, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_path", check_socket_path("socket", self.socket_path))
        object.__setattr__(self, "resources", coerce_resources(self.resources))
        for name in ("allowed_uids", "allowed_gids", "admin_uids"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID for v in value
            ):  # a uid past 32 bits matches no peer: a typo, not a setting
                raise ConfigError(name, f"must be a list of ids from 0 to {MAX_ID}, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            # Not "or None": neither a flag nor a TOML file can say None (leave it out there).
            raise ConfigError("group", f'must be a group name or gid as a non-empty string (e.g. '
                              f'"www-data" or "1000"), got {self.group!r}')
        _number("max_frame", self.max_frame, integer=True, minimum=1024)
        if self.max_frame > MAX_FRAME_LIMIT:  # the length prefix is 4 bytes
            raise ConfigError("max_frame", f"must be at most {MAX_FRAME_LIMIT}, got {self.max_frame!r}")
        check_welcome_fits(self.resources, self.max_frame)
        for name, res in self.resources.items():
            if res.monitor_dsn is not None:
                from .fence import check_monitor_dsn  # imports psycopg: only when asked for

                check_monitor_dsn(f"resources.{name}.monitor_dsn", res.monitor_dsn)
        _number("restart_grace", self.restart_grace)
        _number("hello_timeout", self.hello_timeout, strict_min=True)
        _number("frame_timeout", self.frame_timeout, strict_min=True)
        _number("metrics_port", self.metrics_port, integer=True, optional=True)
        if self.metrics_port is not None and self.metrics_port > 65535:
            raise ConfigError("metrics_port", f"must be <= 65535, got {self.metrics_port}")
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise ConfigError("metrics_host", f"must be a host name or address, got {self.metrics_host!r}")
        if not isinstance(self.overrides, dict):
            raise ConfigError("overrides", f"must be a mapping, got {self.overrides!r}")
        beside = self.beside_file
        if beside is not _UNSTATED:
            if not isinstance(beside, (list, tuple)) or not all(isinstance(x, str) for x in beside):
                raise ConfigError("beside_file", f"must be a list of setting names, got {beside!r}")
            object.__setattr__(self, "beside_file", tuple(beside))  # a list from the program's JSON
        if self.config_file is not None:  # read again by every reload
            # Absolute now, as load() makes it: the program runs in the owner's cwd when
            # it starts, gunicorn's --chdir applied after its config file (where hooks()
            # was called) was read; a reload, or a restart, read another file or none.
            object.__setattr__(self, "config_file",
                               _absolute("config_file", _config_path("config_file", self.config_file)))
        if self.beside_file is _UNSTATED:  # after the coercions above: [] is the default ()
            object.__setattr__(self, "beside_file", _given_in_code(self))

    @classmethod
    def load(cls, path: str | os.PathLike[str], **overrides: Any) -> CoordinatorConfig:
        """Read a TOML file; keyword overrides (e.g. from CLI flags) win.

        A ``resources`` override given as a mapping of fields is merged over the
        file's table of that name (``--resource pg=5`` changes max_size only); an
        integer or a :class:`Resource` replaces it. The overrides are kept in
        :attr:`overrides` so that a reload applies them again.
        """
        # Not config_file, overrides nor beside_file: load() sets them itself, and one given was dropped.
        allowed = sorted({*_STRUCTURAL, *PLAIN_SETTINGS})
        unknown = sorted(map(str, set(overrides) - set(allowed)))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; allowed: {', '.join(allowed)}")
        kept = {k: v for k, v in overrides.items() if v is not None}
        path = _config_path("config", path)
        try:
            data = tomllib.loads(_read_config(path).decode())
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
        except ConfigError:
            raise
        except (ValueError, RecursionError) as exc:
            # TOMLDecodeError, UnicodeDecodeError (TOML is UTF-8 only), and what tomllib lets
            # through: int()'s refusal of an integer past 4,300 digits, a RecursionError for
            # arrays nested thousands deep (a traceback from serve, an internal_error for reload).
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split("; use sys.")[0]
            raise ConfigError("config", f"{path} is not valid TOML: {why}") from None
        unknown = sorted(set(data) - {"coordinator", "resources"})
        if unknown and not _is_table(data[unknown[0]]):
            # `max_size = 5` above any header: "unknown table" named no table there.
            raise ConfigError(_toml_key(unknown[0]), f"is outside any table in {path}; settings go under "
                              "[coordinator] or [resources.NAME] (is a table header missing above it?)")
        if unknown:
            raise ConfigError(
                _toml_key(unknown[0]), f"unknown table in {path}; allowed: coordinator, resources"
            )
        for table in ("coordinator", "resources"):
            if not isinstance(data.get(table, {}), dict):
                raise ConfigError(table, f"must be a table, got {data[table]!r}")
        section = dict(data.get("coordinator", {}))
        # The file's own vocabulary: ``socket``, not the field name ``socket_path``;
        # ``resources`` is its own table; the bookkeeping fields are not settings.
        allowed = sorted({*PLAIN_SETTINGS, "socket"})
        unknown = sorted(map(str, set(section) - set(allowed)))
        if unknown:
            raise ConfigError(f"coordinator.{_toml_key(unknown[0])}",
                              f"unknown setting; allowed: {', '.join(allowed)}")
        if "socket" in section:
            section["socket_path"] = section.pop("socket")
        resources = _merge_resources(data.get("resources", {}), overrides.pop("resources", None) or {})
        section.update({k: v for k, v in overrides.items() if v is not None})
        # Coerced here, so a bad limit is named resources.NAME.FIELD as the file spells it.
        section["resources"] = coerce_resources(resources)
        # Absolute, symlinks kept: a reload reads what the path names then (a release or a
        # ConfigMap swapped in by a symlink), not the file it named at start. Joined, not
        # abspath()'d: its lexical ".." would drop a symlink before it (`current/../sp.toml`).
        section["config_file"] = _absolute("config", path)
        section["overrides"] = kept
        section["beside_file"] = ()  # all of it is the file's, or an override
        try:
            return _from_mapping(cls, section, "coordinator")
        except ConfigError as exc:
            # A value from a flag or keyword, not from the file: named as it is
            # without a file (``socket``, ``metrics_port``), not as a [coordinator] key.
            name = exc.field.removeprefix("coordinator.")
            if name in {"socket" if k == "socket_path" else k for k in kept}:
                raise ConfigError(name, exc.detail) from None
            if name in (SOCKET_ENV, "XDG_RUNTIME_DIR"):  # the default socket path's: not a file key
                raise ConfigError(name, exc.detail) from None
            if name.startswith("resources."):  # a monitor_dsn checked here: the file's [resources.NAME]
                raise ConfigError(name, exc.detail) from None
            raise


def _toml_key(key: str) -> str:
    """``key`` as TOML would spell it: bare, or quoted (``""``, ``"a b"``), so that
    an empty or odd key reads as a key in a message ("coordinator.: unknown", before)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _config_path(name: str, value: Any) -> str:
    """A TOML file's path as a str. Not an int: open() takes one for a file
    descriptor, and reading the config (at each reload too) then closed that fd
    of the process (the coordinator's listening socket: no new sessions)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(name, f"must be the path of a TOML file, got {value!r}")
    return value


def _absolute(name: str, path: str) -> str:
    """``path`` joined to the working directory if relative. An absolute one is
    never joined: getcwd() fails once the cwd is deleted (a release directory
    cleaned up under a running master), and every config (the program's own,
    a restart's re-read) then failed with a FileNotFoundError."""
    if os.path.isabs(path):
        return path
    try:
        return os.path.join(os.getcwd(), path)
    except FileNotFoundError:
        raise ConfigError(name, f"{path} is relative and the working directory is gone; "
                          "give an absolute path") from None


#: Far above any real config (1,900 resources, near the most a welcome frame holds, take ~150 kB).
_CONFIG_MAX = 16 << 20


def _read_config(path: str) -> bytes:
    """The file's bytes. Opened without blocking: a named pipe with no writer
    blocked open() for ever, in `serve` with its stop signals blocked (only
    SIGKILL ended it) and in a running coordinator's reload (every session hung)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        os.set_blocking(fd, True)  # a pipe's writer, if it has one, is waited for
        # Bounded: `--config /dev/zero` read until memory ran out.
        data = f.read(_CONFIG_MAX + 1)
        if len(data) > _CONFIG_MAX:
            raise ConfigError("config", f"{path} is larger than {_CONFIG_MAX >> 20} MiB; "
                              "is it the config file?")
        if not data and stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ConfigError("config", f"{path} is a named pipe with nothing written to it")
    return data


#: CoordinatorConfig fields the file spells its own way: ``socket`` in
#: ``[coordinator]``, ``[resources]`` its own table. Neither has a plain default.
_STRUCTURAL = ("socket_path", "resources")
#: CoordinatorConfig fields that are no settings at all (the file, the flags laid
#: over it, what was given beside it): a re-read keeps them.
_BOOKKEEPING = ("config_file", "overrides", "beside_file")
#: The settings but the socket and resources: ``[coordinator]`` keys spelled as
#: their field, each with a plain default. Every other list of fields derives from it.
PLAIN_SETTINGS = tuple(f.name for f in fields(CoordinatorConfig)
                       if f.name not in (*_STRUCTURAL, *_BOOKKEEPING))
#: What ``Coordinator(socket_path, resources, **options)`` takes as ``options``.
CODE_OPTIONS = ("config_file", *PLAIN_SETTINGS)


def _given_in_code(config: CoordinatorConfig) -> tuple[str, ...]:
    """``beside_file`` of a config made in code: none without a file, else its
    resources and the settings it does not leave at their default (which were given)."""
    if config.config_file is None:
        return ()
    given = [f.name for f in fields(config) if f.name in PLAIN_SETTINGS
             and getattr(config, f.name) != f.default]
    return (*(f"resources.{name}" for name in config.resources), *given)


#: ``[coordinator]`` settings a restart keeps whatever the file says: the socket
#: is what every process connects to (they would be left at the old path).
KEPT_ON_RESTART = ("socket_path",)


def reread(config: CoordinatorConfig, log: logging.Logger, how: str) -> CoordinatorConfig:
    """What a restart of ``config``'s coordinator serves, and the ``[coordinator]``
    settings (as the file names them) the file changed but the restart keeps
    (:data:`KEPT_ON_RESTART`). The file as it says now, the flags laid over it
    again (as a reload reads it); of what was given beside the file
    (``beside_file``), the resources it does not name and every other setting.
    Without a file, ``config`` itself. A file that does not load raises its ConfigError.
    A setting kept against the file is logged on ``log``, the coordinator ``how``
    ("restarts", "starts again")."""
    path = config.config_file
    if path is None:
        return config
    fresh = CoordinatorConfig.load(path, **config.overrides)
    given = {name: res for name, res in config.resources.items()
             if f"resources.{name}" in config.beside_file and name not in fresh.resources}
    settings: dict[str, Any] = {"resources": {**given, **fresh.resources}}
    kept = []
    for f in fields(CoordinatorConfig):
        if f.name not in PLAIN_SETTINGS + KEPT_ON_RESTART or f.name in config.beside_file:
            continue
        new = getattr(fresh, f.name)
        if f.name in KEPT_ON_RESTART:
            if new != getattr(config, f.name):
                kept.append("socket" if f.name == "socket_path" else f.name)
            continue
        settings[f.name] = new
    if kept:
        log.warning("coordinator for %s %s with [coordinator] %s of %s changed and not applied: it "
                    "is what the processes connect to", config.socket_path, how, ", ".join(kept), path)
    return replace(config, **settings)


def check_welcome_fits(resources: dict[str, Resource], max_frame: int) -> None:
    """Every session opens with a welcome listing every resource's limits: one
    that does not fit in a frame would refuse every session."""
    from . import protocol as p

    state = {name: {**res.as_dict(), "draining": False} for name, res in resources.items()}
    # The frame limit is on the body (after the 4-byte length); session and pid
    # at their widest in practice (32 bits: 5 bytes of msgpack each).
    size = len(p.encode(p.Welcome(p.PROTOCOL_VERSION, 2**32 - 1, 2**32 - 1, state), MAX_FRAME_LIMIT)) - 4
    if size > min(max_frame, p.DEFAULT_MAX_FRAME):
        raise ConfigError("max_frame", f"must be at least {size} for the welcome listing "
                          f"{len(resources)} resource(s), got {max_frame}")


def _merge_resources(from_file: dict[str, Any], flags: Any) -> dict[str, Any]:
    """The file's resources with the overrides laid over them, field by field
    where both are tables (a flag names only the limits it changes)."""
    if not isinstance(flags, dict):
        raise ConfigError("resources", f"must be a mapping of name to limits, got {flags!r}")
    merged = dict(from_file)
    for name, spec in flags.items():
        base = from_file.get(name)
        if isinstance(base, int) and not isinstance(base, bool):
            base = {"max_size": base}
        if isinstance(spec, dict) and isinstance(base, dict):
            spec = {**base, **spec}
        merged[name] = spec
    return merged


def check_option_names(options: Mapping[str, Any], also: tuple[str, ...] = ()) -> None:
    """``options`` are :class:`CoordinatorConfig` fields (or one of ``also``, the
    caller's own keywords): a name that is none of them, a typo, is refused, naming it."""
    allowed = sorted({*CODE_OPTIONS, *also})
    unknown = sorted(map(str, set(options) - set(allowed)))
    if unknown:
        raise ConfigError("options", f"unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}")


def config_from_parts(socket_path: Any, resources: Any, config: Any,
                      options: dict[str, Any]) -> CoordinatorConfig:
    """The config of ``Coordinator(...)`` and the embedded program: a whole
    ``config=``, or a socket path, resources and options - never both, since
    one of them would be silently ignored."""
    if config is not None:
        if socket_path is not None or resources is not None or options:
            raise ConfigError("config", "give either config= or socket_path/resources/options")
        if not isinstance(config, CoordinatorConfig):
            # Its type only: a dict of settings may hold a monitor_dsn's password.
            raise ConfigError("config", f"must be a CoordinatorConfig (e.g. CoordinatorConfig.load(path)), "
                              f"got a {type(config).__name__}")
        return config
    if isinstance(socket_path, CoordinatorConfig):  # Coordinator(config): not "must be a path, got <it all>"
        raise ConfigError("socket", "is a CoordinatorConfig: pass it as config=, "
                          "e.g. Coordinator(config=config)")
    if resources is not None and not isinstance(resources, Mapping):
        raise ConfigError("resources", "must be a mapping of name to limits, e.g. {'pg': 20}, "
                          f"got {resources!r}")
    check_option_names(options)
    beside: tuple[str, ...] = ()
    if options.get("config_file") is not None:  # kept by a reload or restart (see beside_file)
        beside = (*(f"resources.{name}" for name in resources or {}),
                  *(name for name in options if name in PLAIN_SETTINGS),
                  *(("socket_path",) if socket_path is not None else ()))
    return CoordinatorConfig(socket_path=socket_path or default_socket_path(),
                             resources=dict(resources or {}), beside_file=beside, **options)


def _from_mapping(cls: Any, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a table, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ConfigError(
            f"{where}.{_toml_key(unknown[0])}", f"unknown setting; allowed: {', '.join(sorted(known))}"
        )
    required = [
        f.name for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data
    ]
    if required:
        raise ConfigError(f"{where}.{required[0]}", "is required")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.field}", exc.detail) from None
    except TypeError as exc:  # a required field missing
        raise ConfigError(where, str(exc)) from None


def parse_resource_flag(text: str) -> tuple[str, Resource]:
    """Parse ``pg=20`` or ``pg=20,max_per_process=4`` from ``--resource``."""
    name, spec = resource_flag_fields(text)
    return name, Resource.coerce(name, spec)


def resource_flag_fields(text: str) -> tuple[str, dict[str, Any]]:
    """The fields one ``--resource`` flag gives, checked as a resource of their
    own; :meth:`CoordinatorConfig.load` lays them over the file's table."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ConfigError("--resource", f"expected NAME=MAX_SIZE[,key=value...], got {text!r}")
    parts = rest.split(",")
    spec: dict[str, Any] = {}
    known = {f.name for f in fields(Resource)}
    try:
        spec["max_size"] = int(parts[0])
    except ValueError:
        raise ConfigError(
            f"--resource {name}", f"max_size must be an integer, got {parts[0]!r}"
        ) from None
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key = key.strip()
        if "monitor_dsn" in spec and (not sep or key not in known):
            # The rest of a DSN with a comma in it ("password=a,b", "@h1,h2"): not
            # quoted, it may be a piece of the password.
            raise ConfigError(f"--resource {name}", "a part after monitor_dsn is no key=value of a "
                              "resource (not shown: it may be a piece of the DSN, which a comma split "
                              "here); give a DSN with a comma in the --config file; keys: "
                              f"{', '.join(sorted(known))}")
        if not sep or not key:
            raise ConfigError(f"--resource {name}", f"expected key=value, got {part!r}")
        if key in spec:  # which one was meant? say so rather than keep the last
            raise ConfigError(f"--resource {name}", f"{key} given twice in {text!r}")
        spec[key] = _scalar(value.strip())
    Resource.coerce(check_resource_name(name), spec)  # a bad value is named here, by the flag's name
    return name, spec


def parse_resource_flags(texts: Any) -> dict[str, dict[str, Any]]:
    """Every ``--resource`` flag's fields by name; a name given twice is an error."""
    flags: dict[str, dict[str, Any]] = {}
    for text in texts:
        name, spec = resource_flag_fields(text)
        if name in flags:
            raise ConfigError(f"--resource {name}", "given twice; give each resource once")
        flags[name] = spec
    return flags


def _scalar(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)
