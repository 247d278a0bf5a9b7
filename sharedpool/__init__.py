"""sharedpool: one connection cap across many worker processes.

A coordinator process owns each resource's global budget and hands out
leases over a Unix socket; every process keeps its own real connections in a
local :class:`ConnectionPool`, each covered by a lease.
"""

from .client import AcquireRequest, Client, Lease
from .config import CoordinatorConfig, PoolConfig, Resource, default_socket_path
from .coordinator import Coordinator, CoordinatorRunning
from .errors import (
    AccessDenied,
    AcquireCancelled,
    ConfigError,
    ConnectTimeout,
    CoordinatorUnavailable,
    LeaseDenied,
    PoolClosed,
    PoolMisuse,
    PoolTimeout,
    ProtocolError,
    RemoteProtocolError,
    ResourceDraining,
    ResourceUnavailable,
    SharedPoolError,
    TooManyWaiters,
    UnknownResource,
)
from .pool import ConnectionPool, PoolStatus
from .process import release_process
from .wrapper import ConnectionWrapper, PooledConnection, pooled

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AcquireCancelled",
    "AcquireRequest",
    "Client",
    "ConfigError",
    "ConnectTimeout",
    "ConnectionPool",
    "ConnectionWrapper",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorRunning",
    "CoordinatorUnavailable",
    "Lease",
    "LeaseDenied",
    "PoolClosed",
    "PoolConfig",
    "PoolMisuse",
    "PoolStatus",
    "PoolTimeout",
    "PooledConnection",
    "ProtocolError",
    "RemoteProtocolError",
    "Resource",
    "ResourceDraining",
    "ResourceUnavailable",
    "SharedPoolError",
    "TooManyWaiters",
    "UnknownResource",
    "__version__",
    "default_socket_path",
    "pooled",
    "release_process",
]
