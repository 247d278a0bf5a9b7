"""The fence: confirm that a dead session's server-side connections are gone (I2).

When a client process dies, its leases must not be handed out again while the
server still counts its connections, or the cap (I1) breaks from the server's
side. A PostgreSQL backend whose client was SIGKILLed lingers for about a
millisecond when idle (it reads EOF at once), but a busy one runs its query to
the end before it notices - with ``pg_sleep(5)``, five seconds. So the
coordinator keeps the leases quarantined until a :data:`FenceCheck` reports the
pids gone, or falls back to its configured delay when the check cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, Protocol

from sharedpool.errors import ConfigError

log = logging.getLogger(__name__)

FenceAction = Literal["wait", "terminate"]
_ACTIONS = ("wait", "terminate")


class FenceCheck(Protocol):
    """An async check a resource supplies: given server-side ids, return those still present.

    An empty result confirms the fence. A check that cannot tell returns its
    input unchanged (and logs why); it should not raise for an outage.
    """

    async def __call__(self, pids: Collection[int], /) -> set[int]: ...


def pg_fence_check(
    dsn: str, *, action: FenceAction = "wait", timeout: float = 10.0, poll_interval: float = 0.005
) -> FenceCheck:
    """The :class:`FenceCheck` of a PostgreSQL resource: :func:`wait_backends_gone` on ``dsn``."""

    async def check(pids: Collection[int], /) -> set[int]:
        return await wait_backends_gone(
            dsn, pids, action=action, timeout=timeout, poll_interval=poll_interval
        )

    return check


class MonitorConnections:
    """One monitor connection per DSN, kept open between fences: connecting
    costs 4-20 ms here, most of a dead worker's slot-return time. Used from
    one event loop; :meth:`aclose` when the coordinator stops."""

    def __init__(self) -> None:
        self._conns: dict[str, Any] = {}
        #: DSN -> its lock and how many get() calls are using it; kept only
        #: while some are: kept for good, each DSN a reload ever named (a
        #: password rotated, another host) left a lock behind for the
        #: coordinator's lifetime
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def get(self, psycopg: Any, dsn: str, **extra: Any) -> Any:
        # One connect at a time per DSN: a fence starting while the warm-up
        # connects waits for it instead of opening a second connection.
        lock, users = self._locks.get(dsn) or (asyncio.Lock(), 0)
        self._locks[dsn] = (lock, users + 1)
        try:
            async with lock:
                conn = self._conns.get(dsn)
                if conn is None or conn.closed or conn.broken:
                    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, **extra)
                    self._conns[dsn] = conn
                return conn
        finally:
            # One event loop: nobody gets in between the read and the write.
            lock, users = self._locks[dsn]
            if users > 1:
                self._locks[dsn] = (lock, users - 1)
            else:
                del self._locks[dsn]

    async def discard(self, dsn: str, conn: Any) -> None:
        """A connection in an unknown state (an error, a timeout mid-query): drop it."""
        if self._conns.get(dsn) is conn:
            del self._conns[dsn]
        with contextlib.suppress(Exception):
            await conn.close()

    async def close_except(self, wanted: Callable[[], Collection[str]]) -> None:
        """Close the connections of every DSN not in ``wanted()`` (a reload changed
        or dropped it): kept, each stayed open until the coordinator stopped.
        Asked when this runs, not when it was scheduled: a reload back to a DSN,
        or a fence started on it, since then keeps it."""
        keep = set(wanted())
        for dsn, conn in [(d, c) for d, c in self._conns.items() if d not in keep]:
            await self.discard(dsn, conn)

    async def aclose(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()


async def wait_backends_gone(
    dsn: str,
    pids: Collection[int],
    *,
    action: str = "wait",
    timeout: float = 10.0,
    poll_interval: float = 0.005,
    monitors: MonitorConnections | None = None,
    started: Mapping[int, tuple[float | None, float]] | None = None,
) -> set[int]:
    """Poll ``pg_stat_activity`` until none of ``pids`` is there; return those still present.

    With ``action="terminate"``, ``pg_terminate_backend()`` is called first on
    each client backend still present (a busy backend otherwise stays until its
    query ends); ``started`` bounds that: pid -> (earliest or None, latest) the
    backend can have started, on the running loop's clock (``loop.time()``).
    A backend started outside its bounds is another connection that has the pid
    now (or was reported wrongly): it is waited for, never terminated.
    Returns the empty set once confirmed, or the pids still present
    when ``timeout`` ran out. If the monitor connection cannot be made (or is
    lost) a warning names the host - never the DSN, which may hold a password -
    and the pids come back unconfirmed, so the caller falls back to its delay.
    """
    if action not in _ACTIONS:
        raise ConfigError("action", f"must be one of {_ACTIONS}, not {action!r}")
    if not timeout > 0:
        raise ConfigError("timeout", f"must be > 0, not {timeout!r}")
    if not poll_interval > 0:
        raise ConfigError("poll_interval", f"must be > 0, not {poll_interval!r}")
    remaining = {int(pid) for pid in pids}
    if not remaining:
        return remaining  # nothing to fence: no need for a connection
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def poll(psycopg: Any, conn: Any) -> None:
        nonlocal remaining
        if action == "terminate":
            await _terminate(psycopg, conn, remaining, started or {})
        while True:
            # autocommit: every statement gets a fresh pg_stat_activity
            # snapshot (inside one transaction it would be frozen).
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (list(remaining),)
            )
            remaining = {row[0] for row in await cur.fetchall()}
            if not remaining or loop.time() + poll_interval >= deadline:
                return
            await asyncio.sleep(poll_interval)

    await _on_monitor(dsn, deadline, monitors, poll)
    return remaining


async def backends_started_since(
    dsn: str,
    pids: Collection[int],
    seconds: float,
    *,
    timeout: float = 1.0,
    monitors: MonitorConnections | None = None,
) -> set[int] | None:
    """Those of ``pids`` whose backend started less than ``seconds`` ago, by
    the server's own clock: a backend pid recorded longer ago than that is
    someone else's now. None when the server cannot be asked within
    ``timeout`` (logged as :func:`wait_backends_gone` does)."""
    ask = {int(pid) for pid in pids}
    if not ask:
        return set()
    loop = asyncio.get_running_loop()
    found: set[int] | None = None

    async def query(psycopg: Any, conn: Any) -> None:
        nonlocal found
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)"
            " AND backend_start > clock_timestamp() - make_interval(secs => %s)",
            (sorted(ask), float(seconds)),
        )
        found = {row[0] for row in await cur.fetchall()}

    await _on_monitor(dsn, loop.time() + timeout, monitors, query)
    return found


async def _on_monitor(dsn: str, deadline: float, monitors: MonitorConnections | None,
                      work: Any) -> None:
    """Run ``work(psycopg, conn)`` on a monitor connection to ``dsn``, all of it
    (connect included) before ``deadline``: a hung server must not hold a
    fence longer than the caller allowed. An outage, a timeout or a lost
    connection ends it early with a warning that names the host - never the
    DSN, which may hold a password; ``work`` leaves what it found so far."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError("monitor_dsn", "needs psycopg: pip install 'sharedpool[pg]'") from None
    params = _parse_dsn(psycopg, dsn)
    host, extra = _host_of(params), _monitor_extra(params)
    loop = asyncio.get_running_loop()
    started = loop.time()
    conn: Any = None
    try:
        async with asyncio.timeout_at(deadline):
            if monitors is not None:
                conn = await monitors.get(psycopg, dsn, **extra)
                try:
                    # The cached connection may have died while idle (server
                    # restart, idle_session_timeout, pg_terminate_backend): one
                    # cheap round trip finds out, and a fresh one is made at once
                    # instead of leaving this fence to run out its timeout.
                    await conn.execute("SELECT 1")
                except psycopg.OperationalError:
                    if not (conn.broken or conn.closed):
                        raise
                    await monitors.discard(dsn, conn)
                    conn = None
                    conn = await monitors.get(psycopg, dsn, **extra)
            else:
                conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, **extra)
            await work(psycopg, conn)
    except TimeoutError:
        if conn is None:
            log.warning("fence: no monitor connection to %s within %.3gs", host, deadline - started)
        elif monitors is not None:
            await monitors.discard(dsn, conn)
    except psycopg.Error as exc:
        # libpq's connection errors never contain the password; parse errors
        # could, but _parse_dsn() has already parsed the DSN.
        log.warning("fence: cannot query pg_stat_activity on %s: %s", host, exc)
        if monitors is not None and conn is not None:
            await monitors.discard(dsn, conn)
    finally:
        if conn is not None and monitors is None:
            await conn.close()


async def warm_monitor(monitors: MonitorConnections, dsn: str, timeout: float = 10.0) -> bool:
    """Open ``dsn``'s monitor connection ahead of the first fence (at start-up,
    where a worker may die before anything else happened). False, with a
    warning naming the host, if it cannot be made now; a fence retries."""
    try:
        import psycopg
    except ImportError:
        log.warning("fence: monitor_dsn is set but psycopg is not installed: pip install 'sharedpool[pg]'")
        return False
    try:
        params = _parse_dsn(psycopg, dsn)
    except ConfigError as exc:
        log.warning("fence: %s", exc)
        return False
    try:
        async with asyncio.timeout(timeout):
            await monitors.get(psycopg, dsn, **_monitor_extra(params))
    except (TimeoutError, psycopg.Error) as exc:
        log.warning("fence: no monitor connection to %s yet (%s); the first fence will retry",
                    _host_of(params), exc or "timeout")
        return False
    return True


def _monitor_extra(params: dict[str, Any]) -> dict[str, Any]:
    # Name the monitor connection so it is recognisable (and not counted as a
    # worker's) in pg_stat_activity, unless the DSN names it already.
    return {} if "application_name" in params else {"application_name": "sharedpool-fence"}


#: Seconds (plus a thousandth of the lease's age, for two clocks' drift) by which
#: a backend may seem to have started outside its lease's bounds and still be its.
START_SLACK = 1.0


async def _terminate(psycopg: Any, conn: Any, pids: set[int],
                     started: Mapping[int, tuple[float | None, float]]) -> None:
    """``pg_terminate_backend()`` each client backend of ``pids`` still present
    that started within its ``started`` bounds (see :func:`wait_backends_gone`).

    One statement per pid, so that one refusal (a superuser's backend, a
    missing privilege) does not stop the others. Only ``client backend`` rows:
    a recycled pid may belong to an autovacuum worker or a walsender.
    """
    loop = asyncio.get_running_loop()
    for pid in sorted(pids):
        # The bounds as ages, by the server's own clock: the backend must be at
        # least ``young`` seconds old (it was there when its pid was reported)
        # and at most ``old`` (its connection was opened after the grant).
        young: float | None = None
        old: float | None = None
        if pid in started:
            earliest, latest = started[pid]
            now = loop.time()
            slack = START_SLACK + (now - (latest if earliest is None else earliest)) / 1000
            young = now - latest - slack
            old = None if earliest is None else now - earliest + slack
        try:
            cur = await conn.execute(
                "SELECT ok, CASE WHEN ok THEN pg_terminate_backend(pid) END FROM ("
                " SELECT pid, (%(young)s::float8 IS NULL OR backend_start <= clock_timestamp()"
                "   - make_interval(secs => %(young)s::float8))"
                "  AND (%(old)s::float8 IS NULL OR backend_start >= clock_timestamp()"
                "   - make_interval(secs => %(old)s::float8)) AS ok"
                " FROM pg_stat_activity WHERE pid = %(pid)s AND backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()) AS s",
                {"pid": pid, "young": young, "old": old},
            )
            row = await cur.fetchone()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise  # the monitor connection itself is gone: the caller handles it
            log.warning("fence: pg_terminate_backend(%d) refused: %s", pid, exc)
            continue
        if row is not None and not row[0]:
            log.warning("fence: backend %d started outside the lease it was reported for (a pid "
                        "reused since, a wrong report, or a lease re-registered unknown): "
                        "not terminated, only waited for", pid)


def check_monitor_dsn(field: str, dsn: str) -> None:
    """At start-up and reload: a ``monitor_dsn`` the fence could never use (no
    psycopg, or not a connection string) is refused, as a ConfigError naming
    ``field``, not found out at the first dead worker, whose slots would then
    stay fenced for all of ``fence_timeout``."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError(field, "needs psycopg to check that backends are gone: "
                          "pip install 'sharedpool[pg]'") from None
    try:
        _parse_dsn(psycopg, dsn)
    except ConfigError as exc:
        raise ConfigError(field, exc.detail) from None


def _parse_dsn(psycopg: Any, dsn: str) -> dict[str, Any]:
    """``dsn`` as a dict; a malformed DSN is a ConfigError naming ``monitor_dsn``."""
    try:
        params = dict(psycopg.conninfo.conninfo_to_dict(dsn))
    except psycopg.Error:
        # Not chained: libpq's parse error quotes pieces of the DSN (maybe the password).
        raise ConfigError("monitor_dsn", "not a valid PostgreSQL connection string") from None
    if (spill := password_spill(params)) is not None:
        raise ConfigError("monitor_dsn", f"not a valid PostgreSQL connection string: {spill}")
    return params


def password_spill(params: Mapping[str, Any]) -> str | None:
    """Why a parsed connection string's host or port may be a piece of its password
    (said without quoting either), else None. A URL's password with an ``@``, ``/``
    or ``:`` not percent-encoded is read by libpq as host or port (``u:p@ss@h``:
    host "ss@h"; ``u:pa/ss@h``: port "pa"), which every connect error and the
    fence's log lines then quoted, where no host and no port can be that anyway."""
    hosts = str(params.get("host") or "").split(",")
    # A socket directory may hold one; "@name" is a socket in Linux's abstract namespace (libpq 14+).
    if any("@" in host and not host.startswith(("/", "@")) for host in hosts):
        return ("its host has an '@' in it: an '@' in the password must be percent-encoded "
                "as %40 (host not shown: it may hold a piece of the password)")
    port = str(params.get("port") or "")
    if port and not all(part.strip().isdigit() for part in port.split(",") if part.strip()):
        return ("its port is not a number: a '/', ':' or '@' in the password must be percent-encoded "
                "(%2F, %3A, %40) (port not shown: it may hold a piece of the password)")
    return None


def _host_of(params: dict[str, Any]) -> str:
    """Host (and port) for log lines: never the whole DSN, which may hold a password."""
    host = params.get("host") or params.get("hostaddr") or "the default socket"
    port = params.get("port")
    return f"{host}:{port}" if port else str(host)
