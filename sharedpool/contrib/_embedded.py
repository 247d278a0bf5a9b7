"""What the gunicorn and celery integrations share: the coordinator program
their server process owns (:mod:`sharedpool.program`), and what a worker does
at exit (:func:`release_process`)."""

from __future__ import annotations

from ..program import (
    EmbeddedCoordinator,
    EmbeddedStartError,
    coordinator_listening,
    private_socket_path,
)

__all__ = [
    "EmbeddedCoordinator",
    "EmbeddedStartError",
    "coordinator_listening",
    "private_socket_path",
    "release_process",
]


def release_process(timeout: float = 5.0) -> None:
    """At a worker's exit: see :func:`sharedpool.process.release_process`."""
    from ..process import release_process as release

    release(timeout)
