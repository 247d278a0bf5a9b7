"""What the gunicorn and celery integrations share: the coordinator program
their server process owns (:mod:`sharedpool.program`), and what a worker does
at exit (:func:`release_process`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..program import (
    EmbeddedCoordinator,
    EmbeddedStartError,
    check_embedded_options,
    coordinator_listening,
    private_socket_path,
)

__all__ = [
    "EmbeddedCoordinator",
    "EmbeddedStartError",
    "check_embedded_options",
    "compare_served",
    "coordinator_listening",
    "private_socket_path",
    "release_process",
]


def release_process(timeout: float = 5.0) -> None:
    """At a worker's exit: see :func:`sharedpool.process.release_process`."""
    from ..process import release_process as release

    release(timeout)


def compare_served(path: str, declared: Mapping[str, Any]) -> list[str]:
    """How the coordinator already serving ``path`` differs from the resources
    this server declared (``{name: Resource}``): its configuration is the one
    in force, so a resource it lacks fails every checkout (UnknownResource)
    and a different cap is not the one written here. One line per difference."""
    from ..client import Client

    client = Client(path, name="sharedpool-compare")
    try:
        rows = client.inspect("resources", timeout=2.0)["resources"]
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

