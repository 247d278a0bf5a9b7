"""Shared fixtures: a private coordinator per test, PostgreSQL, unique names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from pg_helpers import pg  # noqa: F401  (re-exported fixture)

from sharedpool import Coordinator
from sharedpool.config import SOCKET_ENV


@pytest.fixture(autouse=True)
def _socket_env_stays_put() -> Iterator[None]:
    """$SHAREDPOOL_SOCKET as it was before each test, after it: code under test
    (gunicorn's hooks(), a demo) sets it in os.environ, and a pool made later in
    the same worker process would look for that long-gone coordinator."""
    before = os.environ.get(SOCKET_ENV)
    yield
    if before is None:
        os.environ.pop(SOCKET_ENV, None)
    else:
        os.environ[SOCKET_ENV] = before


@pytest.fixture
def sock_path(tmp_path: Any) -> str:
    """A socket path of this test's own, under tmp_path."""
    return str(tmp_path / "sp.sock")


@pytest.fixture
def start_coordinator(sock_path: str) -> Iterator[Callable[..., Coordinator]]:
    """Start a coordinator (child process) on this test's socket; stopped after the test."""
    started: list[Coordinator] = []

    def start(resources: dict[str, Any], path: str | None = None, **options: Any) -> Coordinator:
        coord = Coordinator(path or sock_path, resources, **options).start()
        started.append(coord)
        return coord

    yield start
    for coord in started:
        coord.stop()


@pytest.fixture
def app_name() -> str:
    """A unique PostgreSQL application_name, to count this test's backends only."""
    return f"sp-test-{uuid.uuid4().hex[:10]}"


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@pytest.fixture
def redis_name() -> Iterator[str]:
    """A client name (and key prefix) of this test's own; skips without Redis
    (fails instead with SHAREDPOOL_REQUIRE_REDIS=1)."""
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        why = f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable ({exc}); start redis-server"
        if os.environ.get("SHAREDPOOL_REQUIRE_REDIS") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    name = f"sp-test-{uuid.uuid4().hex[:10]}"
    yield name
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    keys = list(r.scan_iter(f"{name}*"))
    if keys:
        r.delete(*keys)
    r.close()
