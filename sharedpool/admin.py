"""Admin verbs, run inside the coordinator: pause, resume, drain, resize,
end_session, reload. Each returns a reply payload and the ledger's effects."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .config import CODE_OPTIONS, CoordinatorConfig, Resource, check_welcome_fits
from .coordinator import unreachable_peers
from .effects import Notify
from .errors import ConfigError

if TYPE_CHECKING:
    from .effects import Effect
    from .server import Server

VERBS = ("pause", "resume", "drain", "resize", "end_session", "reload")
#: Compared by :func:`fixed_fields_changed`: resources are compared one by one,
#: overrides and beside_file are no settings. ``config_file`` is the same in a
#: reload (the file read again); a gunicorn re-read of ``hooks()`` may name another.
_COMPARED = frozenset(("socket_path", *CODE_OPTIONS))
#: ``[coordinator]`` settings a reload applies: read at each use (a peer's
#: access at its connect or admin verb, a session's timeouts as it runs, the
#: grace at the next start). Sessions already open stay open. The others take
#: a restart: the socket, its group and the metrics listener are bound at
#: start, and max_frame is each open session's frame limit.
LIVE_SETTINGS = ("allowed_uids", "allowed_gids", "admin_uids", "hello_timeout", "frame_timeout",
                 "restart_grace")

log = logging.getLogger("sharedpool.coordinator")


def _resource(server: Server, args: dict[str, Any]) -> str:
    name = args.get("resource")
    # Not hashable (a list from a hand-made frame): "unhashable type: 'list'" before.
    if not isinstance(name, str) or name not in server.ledger.resources:
        raise ValueError(server.ledger.no_such_resource(name))
    return str(name)


def run_admin(server: Server, verb: str, args: dict[str, Any], now: float) -> tuple[Any, list[Effect]]:
    """Carry out one admin verb; raises ValueError naming what was wrong."""
    ledger = server.ledger
    if verb == "pause":
        name = _resource(server, args)
        return {"resource": name, "paused": True}, ledger.pause(name)
    if verb == "resume":
        name = _resource(server, args)
        return {"resource": name, "paused": False}, ledger.resume(name, now)
    if verb == "drain":
        name = _resource(server, args)
        return {"resource": name, "draining": True}, ledger.drain(name)
    if verb == "resize":
        name = _resource(server, args)
        size = args.get("max_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"max_size must be an integer >= 1, got {p.brief(size)}")
        return {"resource": name, "max_size": size}, ledger.resize(name, size, now)
    if verb == "end_session":
        pid = args.get("pid")
        if not isinstance(pid, int):
            raise ValueError(f"pid must be an integer, got {p.brief(pid)}")
        effects = ledger.end_session(pid)
        if not effects:
            raise ValueError(f"no session with pid {pid}")
        return {"pid": pid, "sessions": len(effects)}, effects
    if verb == "reload":
        return reload_config(server, now)
    raise ValueError(f"unknown verb {p.brief(verb)}; one of {', '.join(VERBS)}")


def reload_config(server: Server, now: float) -> tuple[Any, list[Effect]]:
    """Re-read the config file, with the flags the coordinator was started with
    laid over it again; resources are added or their limits replaced.

    A resource gone from the file is removed: no new leases, the held ones valid
    until released, then it is forgotten. A changed ``[coordinator]`` field is
    applied if it is one of :data:`LIVE_SETTINGS`, else reported (reply and
    log) as taking a restart. One given in code beside ``config_file=`` is kept."""
    running = server.config
    path = running.config_file
    if not path:
        raise ValueError("the coordinator was not started with --config; nothing to reload")
    fresh = CoordinatorConfig.load(path, **running.overrides)
    # Checked against the frame size in force (a new max_frame takes a restart): every
    # session opens with a welcome listing every resource, the kept ones too.
    served = {**{name: res.limits for name, res in server.ledger.resources.items()}, **fresh.resources}
    try:
        check_welcome_fits(served, running.max_frame)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.detail} (the running coordinator's; a new max_frame "
                          "takes a restart)") from None
    effects: list[Effect] = []
    # What the reload changes in the live limits: the file's edits, and also
    # what a `resize` set since (the file's value wins; said, not silent).
    changed: dict[str, dict[str, list[Any]]] = {}
    ledger = server.ledger
    # One removed by an earlier reload and still held is added back.
    added = [name for name in fresh.resources
             if name not in ledger.resources or ledger.resources[name].removed]
    for name, limits in fresh.resources.items():
        res = server.ledger.resources.get(name)
        if res is not None and name not in added and (diff := limits_changed(res.limits, limits)):
            changed[name] = diff
        effects += server.ledger.set_limits(name, limits, now)
    # Sessions know the limits from their welcome: told, or an acquire given no
    # timeout after a reload that raised acquire_timeout gave up on its own (at
    # twice the old one, "no reply in time") while the coordinator still queued it.
    if told := {name: server.ledger.resources[name].welcome_state() for name in [*changed, *added]}:
        effects += [Notify(sid, "limits", None, {"resources": told}) for sid in server.ledger.sessions]
    if added:  # its limits on record: "resources pg, redis" said only that it is served
        log.info("reload of %s added %s", path, "; ".join(
            f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in fresh.resources[name].as_dict().items())
            for name in added))
    if changed:
        log.info("reload of %s changed %s", path, "; ".join(
            f"{name}: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items())
            for name, diff in changed.items()))
    needs_restart = fixed_fields_changed(running, fresh, running.beside_file)
    settings = {name: [getattr(running, name), getattr(fresh, name)] for name in needs_restart
                if name in LIVE_SETTINGS}
    needs_restart = [name for name in needs_restart if name not in settings]
    if settings:
        server.config = replace(running, **{name: new for name, (_, new) in settings.items()})
        log.info("reload of %s changed [coordinator] %s", path,
                 ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in settings.items()))
        # As at start: peers admitted now may still be shut out by the socket's mode.
        if (shut_out := unreachable_peers(server.config)) is not None:
            log.warning("reload of %s: %s (the group takes a restart)", path, shut_out)
    # Not one given beside config_file= (in code, in no file): kept, as a restart keeps it.
    removed = sorted(name for name, res in ledger.resources.items() if name not in fresh.resources
                     and not res.removed and f"resources.{name}" not in running.beside_file)
    # Held leases of one are never cut: their connections exist (counted until released).
    held = {name: ledger.resources[name].leased for name in removed}
    for name in removed:
        effects += ledger.remove(name, now)
    if needs_restart:
        log.warning("reload of %s: changed [coordinator] fields not applied, they take a restart: %s",
                    path, ", ".join(needs_restart))
    server.monitors_reloaded()
    if removed:
        log.warning("reload of %s removed %s: no new leases; those held stay valid until released, "
                    "then it is gone", path,
                    ", ".join(f"{name} ({held[name]} lease(s) held)" for name in removed))
    # The path may not be UTF-8 (its bytes kept as surrogates): the reply must still go out.
    return {"reloaded": p.wire_text(path), "resources": sorted(fresh.resources), "added": sorted(added),
            "changed": changed, "settings": settings, "needs_restart": needs_restart,
            "removed": removed}, effects


def limits_changed(was: Resource, now: Resource) -> dict[str, list[Any]]:
    """Each limit that differs, as [old, new]; the monitor DSN only as changed
    (it may hold a password)."""
    old, new = was.as_dict(), now.as_dict()
    diff: dict[str, list[Any]] = {k: [old[k], new[k]] for k in old if old[k] != new[k]}
    if was.monitor_dsn != now.monitor_dsn:
        diff["monitor_dsn"] = ["(hidden)", "(hidden)"]
    return diff


def fixed_fields_changed(running: CoordinatorConfig, fresh: CoordinatorConfig,
                         kept: Collection[str] = ()) -> list[str]:
    """The ``[coordinator]`` fields whose new value differs (named as the field,
    the socket as the file names it), but for ``kept``: a reload passes those
    given in code beside ``config_file=``, which the file does not set (see
    ``beside_file``); a gunicorn re-read compares code with code, all of it."""
    changed = []
    for f in fields(CoordinatorConfig):
        if (f.name not in _COMPARED or f.name in kept
                or getattr(running, f.name) == getattr(fresh, f.name)):
            continue
        changed.append("socket" if f.name == "socket_path" else f.name)
    return changed
