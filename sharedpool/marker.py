"""The restart marker: what a coordinator hands on to the next one on its path.

A file next to the socket (``<socket>.restart``) holding the dead processes'
fenced leases (their backends may still run a query), the live processes'
leases (counted until re-registered; fenced if their process died meanwhile)
and which fences may belong to a live process. A start that finds it is a
restart (see :func:`sharedpool.coordinator.bind_socket`).

A clean stop used to be the only writer, so a coordinator killed with SIGKILL
handed nothing on: a dead worker's slot was free once ``restart_grace`` had
passed, its query possibly still running. :class:`MarkerKeeper` keeps the
file current while serving instead, coalesced to one write per
:data:`KEEP_EVERY` at most, each atomic (a rename): a SIGKILL loses only the
changes of that last moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from typing import Any

from .errors import ConfigError
from .fence import backends_started_since

log = logging.getLogger("sharedpool.coordinator")

#: The longest a change waits before the marker shows it (with few leases).
KEEP_EVERY = 0.02
#: The keeper waits at least this many times what its last keep cost: with
#: thousands of leases a keep takes milliseconds of the event loop, and a keep
#: every 20 ms would take most of it (acquire p99 from 0.4 to 10 ms).
KEEP_DUTY = 10
#: While the marker cannot be written (a full or read-only disk, no fd left),
#: it is tried again this often, changes or not: under load a try at every
#: change logged an error every 20 ms for as long as the disk stayed full, and
#: with no change a marker left stale was never written once the disk came back.
RETRY_EVERY = 1.0

_KEYS = ("fenced", "held", "late", "started", "dropped")

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This boot of the host (Linux), None where unknown."""
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


def marker_path(socket_path: str) -> str:
    """Where the coordinator serving ``socket_path`` keeps its marker."""
    return socket_path + ".restart"


def read_marker(path: str) -> dict[str, Any]:
    """What the previous coordinator handed on: ``"fenced"``, the dead
    processes' leases still fenced, ``"held"``, the live processes' leases,
    and ``"late"`` (each [] when absent, for an old format or an unreadable file);
    ``"boot"``, the host's boot it was written in, and ``"mono"``, the
    boot's monotonic clock when it was written (each None when not said)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None
    out: dict[str, Any] = {}
    for key in _KEYS:
        value = data.get(key) if isinstance(data, dict) else None
        out[key] = value if isinstance(value, list) else []
    boot = data.get("boot") if isinstance(data, dict) else None
    out["boot"] = boot if isinstance(boot, str) else None
    mono: Any = data.get("mono") if isinstance(data, dict) else None
    try:  # an int too big for a float (hand-written) must not stop the start
        mono = float(mono) if isinstance(mono, int | float) and not isinstance(mono, bool) else None
    except OverflowError:
        mono = None
    out["mono"] = mono if mono is not None and math.isfinite(mono) else None
    return out


def from_another_boot(handed: dict[str, Any]) -> bool:
    """Whether ``handed`` was written before the host rebooted."""
    boot, now = handed.get("boot"), boot_id()
    return boot is not None and now is not None and boot != now


def marker_age(handed: dict[str, Any]) -> float | None:
    """Seconds since ``handed`` was written, on this boot's monotonic clock
    (unmoved by wall-clock steps); None when unknown or from another boot."""
    mono = handed.get("mono")
    if mono is None or from_another_boot(handed):
        return None
    return max(0.0, time.monotonic() - mono)


def time_left_now(handed: dict[str, Any]) -> dict[str, Any]:
    """``handed`` with each fence's time left counted from now: less the
    marker's age (the keeper rewrites it only on real changes, so the time
    left it holds is that of its last write). Unchanged when the age is
    unknown: a fence then lasts longer than it had left, never shorter.
    Stamped now, as its time left is (a failed start writes it back)."""
    age = marker_age(handed)
    if age is None and handed.get("started"):
        # Ages as of an unknown moment: a grant would seem later than it was,
        # and the lease's own backend too old to be its (never terminated).
        return {**handed, "started": []}
    if not age:
        return handed
    out = {**handed, "mono": handed["mono"] + age}
    out["fenced"] = [_less(e, age) for e in handed.get("fenced", [])]
    out["started"] = [_older(e, age) for e in handed.get("started", [])]
    return out


def _older(entry: Any, age: float) -> Any:
    # [lease, seconds_since_grant or None, seconds_since_pid_reported], as of the write
    if not (isinstance(entry, list) and len(entry) == 3 and type(entry[2]) in (int, float)
            and (entry[1] is None or type(entry[1]) in (int, float))):
        return entry  # malformed: the ledger's restore skips it
    try:
        return [entry[0], None if entry[1] is None else entry[1] + age, entry[2] + age]
    except OverflowError:  # an int too big for a float: hand-written; skipped by the restore
        return entry


def _less(entry: Any, age: float) -> Any:
    if not (isinstance(entry, list) and len(entry) == 6 and type(entry[4]) in (int, float)):
        return entry  # malformed: the ledger's restore skips it
    try:
        return [*entry[:4], max(0.0, entry[4] - age), entry[5]]
    except OverflowError:  # an int too big for a float: hand-written; all of it
        return entry


def backends_named(handed: dict[str, Any]) -> dict[str, set[int]]:
    """The backend pids ``handed`` lists, by resource."""
    out: dict[str, set[int]] = {}
    for entry in _backend_entries(handed):
        out.setdefault(entry[0], set()).add(entry[-1])
    return out


def forget_backends(handed: dict[str, Any],
                    which: dict[str, set[int]] | None = None) -> dict[str, Any]:
    """``handed`` without the backend pids ``which`` names (by resource; None:
    all of them). A marker from before a reboot names only gone processes, and
    pids, backend pids among them, that may belong to others now; so does one
    whose backend pids were reused since it was written (a fence would wait
    on, or terminate, someone else's connection). Their leases still count,
    through the hold and then ``quarantine_delay``, as leases whose backend
    was never known."""
    drop = {id(e) for e in _backend_entries(handed)
            if which is None or e[-1] in which.get(e[0], ())}
    out = dict(handed)
    for key in ("fenced", "held"):
        out[key] = [[*e[:-1], None] if id(e) in drop else e for e in handed.get(key, [])]
    return out


#: A backend started less than this before the marker was written may still
#: be one it names (the server's clock against ours, the query's own time).
REUSE_SLACK = 1.0


async def forget_reused(handed: dict[str, Any], resources: dict[str, Any], monitors: Any,
                        timeout: float = 1.0) -> dict[str, Any]:
    """``handed`` without the backend pids that PostgreSQL has given to a
    backend started since it was written. A coordinator down long enough
    (or a marker left long enough) for a pid to come round again would
    otherwise fence, or with ``fence_action="terminate"`` terminate, someone
    else's connection. Asked of each resource with a ``monitor_dsn``, all
    within ``timeout``; one that cannot tell keeps its pids (logged)."""
    age = marker_age(handed)
    if age is None or age <= REUSE_SLACK:
        return handed  # too recent for a pid to have come round (or from another boot)
    asks: list[tuple[str, set[int], str]] = []
    for name, pids in backends_named(handed).items():
        dsn = getattr(resources.get(name), "monitor_dsn", None)
        if dsn:
            asks.append((name, pids, dsn))

    async def ask(name: str, pids: set[int], dsn: str) -> set[int] | None:
        try:
            return await backends_started_since(dsn, pids, age - REUSE_SLACK,
                                                timeout=timeout, monitors=monitors)
        except ConfigError as exc:  # a malformed DSN, no psycopg: the fence logs it too
            log.warning("restart marker: cannot ask %s which backend pids are reused: %s", name, exc)
            return None

    # All at once: one hung server holds the start for ``timeout``, not once per resource.
    results = await asyncio.gather(*(ask(*a) for a in asks))
    reused: dict[str, set[int]] = {}
    for (name, _, _), found in zip(asks, results, strict=True):
        if found:
            log.info("restart marker (%.0fs old): %s backend pid(s) %s now belong to "
                     "newer backends: not fenced", age, name, sorted(found))
            reused[name] = found
    return forget_backends(handed, reused) if reused else handed


def _backend_entries(handed: dict[str, Any]) -> list[list[Any]]:
    # fenced: [resource, lease, token, pid, seconds_left, backend_pid];
    # held: [resource, lease, token, pid, backend_pid]. Anything else the
    # ledger's restore skips, as it does malformed entries.
    return [e for key, n in (("fenced", 6), ("held", 5)) for e in handed.get(key, [])
            if isinstance(e, list) and len(e) == n and isinstance(e[0], str)
            and type(e[-1]) is int and e[-1] > 0]


def write_marker(path: str, handed: dict[str, Any]) -> bool:
    """Write the marker whole or not at all (a SIGKILL mid-write leaves the
    previous one); an error is logged (False): the coordinator serves on.
    Stamped with this boot, unless ``handed`` says which (one read back)."""
    try:
        _write_marker(path, handed)
    except OSError as exc:
        log.error("cannot write the restart marker %s: %s", path, exc)
        return False
    return True


def _write_marker(path: str, handed: dict[str, Any]) -> None:
    """:func:`write_marker`, raising its OSError."""
    tmp = path + ".tmp"
    # One-shot dumps (C encoder) and one write: json.dump() writes piece by
    # piece, ~5x slower, and the keeper runs on the coordinator's event loop.
    boot = handed["boot"] if "boot" in handed else boot_id()
    # When the backend pids it lists were last seen in use: a backend started
    # later with one of them is someone else's (read back: kept).
    mono = handed["mono"] if "mono" in handed else time.monotonic()
    data = json.dumps({"pid": os.getpid(), "boot": boot, "mono": mono,
                       **{k: handed.get(k, []) for k in _KEYS}}, separators=(",", ":"))
    try:
        # 0600: in a socket directory made for a group (0750), its members, admitted
        # or not, read which processes hold what (the umask left it 0644).
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a part written to a full disk: its space back
            os.unlink(tmp)
        raise


def remove_marker(path: str) -> None:
    for name in (path, path + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def handed_on(server: Any, now: float) -> dict[str, list[Any]] | None:
    """What this coordinator would hand on now; None when nothing (no lease
    out, no fence, not inside a restart's grace: the next start is a fresh one)."""
    ledger = server.ledger
    handed = {"fenced": ledger.fenced_state(now), "held": ledger.held_state(),
              "late": ledger.late_state(), "dropped": ledger.dropped_state()}
    # Inside a restart's grace: processes may hold leases not re-registered yet.
    holding = ledger.hold_until is not None and now < ledger.hold_until
    if not (holding or any(handed.values())):
        return None
    # Ages as of this write (its "mono"): the next coordinator counts them on.
    handed["started"] = ledger.started_state(now)
    return handed


def _without_time_left(handed: dict[str, list[Any]] | None) -> Any:
    # A fence's time left changes by itself; rewritten only on a real change
    # (the time left then is never shorter than the true one: on the safe side).
    if handed is None:
        return None
    # The ages in "started" grow by themselves too (what else changes them changes a row).
    return (handed["held"], handed["late"], handed.get("dropped", []),
            [entry[:4] + entry[5:] for entry in handed["fenced"]])


class MarkerKeeper:
    """Keeps the marker current while a coordinator serves (a server observer)."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop,
                 every: float = KEEP_EVERY) -> None:
        self.path, self._loop, self._every = path, loop, every
        self._timer: asyncio.TimerHandle | None = None
        self._last: Any = None
        self._cost = 0.0  # what the last keep took (s)
        self._stopped = False
        self._failing = False  # the last write failed (logged once, until one succeeds)

    def __repr__(self) -> str:
        return f"<MarkerKeeper {self.path} pending={self._timer is not None}>"

    def changed(self, server: Any) -> None:
        """The ledger may have changed: write within :data:`KEEP_EVERY` (or
        :data:`KEEP_DUTY` times what the last keep cost, if longer)."""
        if self._timer is None and not self._stopped:
            delay = max(self._every, KEEP_DUTY * self._cost, RETRY_EVERY if self._failing else 0.0)
            self._timer = self._loop.call_later(delay, self._keep, server)

    def _keep(self, server: Any) -> None:
        self._timer = None
        t0 = time.perf_counter()
        self.write(handed_on(server, self._loop.time()), only_if_changed=True)
        self._cost = time.perf_counter() - t0
        if self._failing:
            self.changed(server)  # tried again in RETRY_EVERY, whether anything changes or not

    def write(self, handed: dict[str, list[Any]] | None, only_if_changed: bool = False) -> None:
        """Write ``handed`` (None: remove the marker)."""
        shape = _without_time_left(handed)
        if not (only_if_changed and shape == self._last):
            try:
                if handed is None:
                    remove_marker(self.path)
                else:
                    _write_marker(self.path, handed)
            except OSError as exc:
                if self._failing:  # said once: not a line per try while the disk stays full
                    log.debug("restart marker %s still not written: %s", self.path, exc)
                else:
                    log.error("cannot %s the restart marker %s: %s; trying again every %gs "
                              "(a coordinator killed meanwhile hands on what it last wrote)",
                              "remove" if handed is None else "write", self.path, exc, RETRY_EVERY)
                self._failing = True
                return
            self._last = shape
        if self._failing:
            self._failing = False
            log.warning("restart marker %s is current again", self.path)

    def stop(self, server: Any, restart: bool = False) -> None:
        """At a clean stop: write what is handed on now, and keep no more.
        ``restart``: a marker even with nothing to hand on, so that the next
        start is a restart (it holds its grants while processes re-register)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._failing = False  # the last write matters most: a failure is logged at error
        handed = handed_on(server, self._loop.time())
        if handed is None and restart:
            handed = {key: [] for key in _KEYS}
        self.write(handed)
        if handed is not None and not self._failing:
            # Why the next start holds its grants ("coordinator restarted: granting nothing").
            log.info("handed on to the next start in %s: %d lease(s) of live processes, %d fenced",
                     self.path, len(handed["held"]), len(handed["fenced"]))
