"""What the gunicorn and celery integrations share: the coordinator program
their server process owns (:mod:`sharedpool.program`), and what a worker does
at exit (:func:`release_process`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from typing import Any

from ..config import CoordinatorConfig
from ..errors import SharedPoolError
from ..program import (
    EmbeddedCoordinator,
    EmbeddedStartError,
    check_embedded_options,
    check_unused_settings,
    coordinator_listening,
    integration_socket_path,
    private_socket_path,
)

__all__ = [
    "EmbeddedCoordinator",
    "EmbeddedStartError",
    "check_embedded_options",
    "check_unused_settings",
    "compare_served",
    "coordinator_listening",
    "integration_socket_path",
    "private_socket_path",
    "release_process",
    "wait_for_fences",
]

log = logging.getLogger("sharedpool.embedded")


def release_process(timeout: float = 5.0) -> None:
    """At a worker's exit: see :func:`sharedpool.process.release_process`."""
    from ..process import release_process as release

    release(timeout)


def compare_served(path: str, declared: Mapping[str, Any]) -> list[str]:
    """How the coordinator already serving ``path`` differs from the resources
    this server declared (``{name: Resource}``): its configuration is the one
    in force, so a resource it lacks fails every checkout (UnknownResource)
    and a different cap is not the one written here. One line per difference."""
    from ..cli import get_resources
    from ..client import Client

    client = Client(path, name="sharedpool-compare")
    try:
        rows = get_resources(client, timeout=2.0)  # in parts: some 1,900 resources fill one reply
    except Exception as exc:  # noqa: BLE001 - what it serves is unknown: said so, never fatal
        return [f"its resources could not be compared with the ones declared here: {exc}"]
    finally:
        client.close()
    served = {row.get("name"): row for row in rows if isinstance(row, dict)}
    out = []
    for name, resource in declared.items():
        row = served.get(name)
        if row is None:
            out.append(f"it does not serve {name!r} (declared here with max_size="
                       f"{resource.max_size}): every checkout of {name!r} fails")
        elif row.get("max_size") != resource.max_size:
            out.append(f"its cap for {name!r} is {row.get('max_size')}, not the {resource.max_size} "
                       "declared here: its own configuration is in force")
    return out


def wait_for_fences(path: str, config: CoordinatorConfig, killed: Collection[int] = ()) -> None:
    """Before a server stops the coordinator it started: wait until nothing is
    fenced and the sessions of the ``killed`` worker pids have ended (at most the
    longest ``fence_timeout`` or ``quarantine_delay``, plus a second).

    A worker killed mid-query (past gunicorn's ``graceful_timeout``, celery's hard
    time limit) leaves its backend running until the query ends. Stopped now, the
    coordinator hands that on only to a successor on this very path: a server
    restarted at once on another (private) path would open the whole cap beside it.
    Nothing fenced, nothing killed: one round trip."""
    from ..cli import get_resources
    from ..client import Client

    bound = max((max(r.fence_timeout, r.quarantine_delay) for r in config.resources.values()),
                default=0.0)
    deadline = time.monotonic() + bound + 1.0
    client = Client(path, name="sharedpool-server-exit")
    try:
        while True:
            # In parts: with some 1,900 resources one reply is too large, and
            # that error read as "not answering" ended the wait at once.
            rows = get_resources(client, timeout=1.0)
            # A killed worker's session ends once the coordinator reads EOF on it;
            # its leases are fenced from then on.
            sessions = client.inspect("sessions", timeout=1.0)["sessions"] if killed else []
            if (all(not r.get("fenced") for r in rows)
                    and not any(s.get("pid") in killed for s in sessions)):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        log.warning("sharedpool: stopping the coordinator on %s with slots still fenced: "
                    "queries of killed workers may still run on the server", path)
    except SharedPoolError as exc:  # not answering: nothing to wait for
        log.debug("sharedpool: cannot ask the coordinator about its fence: %s", exc)
    finally:
        client.close()
