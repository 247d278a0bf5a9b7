"""The ``DatabaseWrapper`` Django loads for ``ENGINE = "sharedpool.contrib.django"``."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base

from ...process import before_release
from .options import make_pool

if not base.is_psycopg3:
    # Else Django loaded psycopg2 and the import below failed with "No module named
    # 'psycopg'", shown under "isn't an available database backend".
    raise ImproperlyConfigured(
        f"ENGINE 'sharedpool.contrib.django' needs psycopg 3 and psycopg_pool (Django's connection "
        f"pool): Django found psycopg2 {base.Database.__version__.split()[0]} only; "
        f"pip install 'psycopg[binary,pool]'")
try:
    from ..psycopg import ConnectionPool
except ImportError as exc:  # no psycopg_pool (psycopg without [pool]), or one too old
    raise ImproperlyConfigured(
        f"ENGINE 'sharedpool.contrib.django' needs psycopg_pool (Django's connection pool): "
        f"{exc}; pip install 'psycopg[pool]'") from exc


class DatabaseWrapper(base.DatabaseWrapper):  # type: ignore[misc]  # Django ships no types
    """Django's PostgreSQL wrapper whose pool is sharedpool's psycopg_pool class.

    Overrides Django's ``pool`` property (the same in Django 5.1 and 5.2; 6.x
    only lets ``OPTIONS["pool"]`` set ``check``, as this one does): the same
    arguments, this class instead of ``psycopg_pool.ConnectionPool``.
    """

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if self.alias != NO_DB_ALIAS and not self.settings_dict["OPTIONS"].get("pool"):
            # Django would connect without its pool: no lease, silently outside
            # the cap this ENGINE was named for. (NO_DB_ALIAS: Django's own
            # connection to the "postgres" database, to make the test database.)
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['pool'] is not set: ENGINE "
                f"'sharedpool.contrib.django' leases only the connections of Django's pool, e.g. "
                f"{{'resource': 'pg'}} (for connections outside any cap, ENGINE "
                f"'django.db.backends.postgresql')")
        return super().get_new_connection(conn_params)

    @property
    def pool(self) -> ConnectionPool | None:
        options = self.settings_dict["OPTIONS"].get("pool")
        if self.alias == NO_DB_ALIAS or not options:
            return None
        if self.alias not in self._connection_pools:
            if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
                # A connection kept between requests keeps its lease: the other
                # workers would wait for it at the cap, idle or not.
                # Django's own words named neither the alias nor the setting.
                raise ImproperlyConfigured(
                    f"DATABASES[{self.alias!r}]['CONN_MAX_AGE'] = {self.settings_dict['CONN_MAX_AGE']!r}: "
                    f"Django's pool takes no persistent connections (OPTIONS['pool'] is set): set it to 0")
            check = ConnectionPool.check_connection if self.settings_dict["CONN_HEALTH_CHECKS"] else None
            pool = make_pool(
                ConnectionPool, self.alias, options,
                fixed={"kwargs": {**self.get_connection_params(), "autocommit": True},
                       "open": False,  # opened at the first query: in the worker, not a preloading master
                       "configure": self._configure_connection},
                defaults={"check": check},
            )
            self._connection_pools.setdefault(self.alias, pool)
        return self._connection_pools[self.alias]


def _close_this_threads_connections() -> None:
    # Django checks a request's connection back in only when the request ends: a
    # sync worker stopped mid-request (SIGQUIT, gunicorn's timeout, Ctrl-C) still
    # held it at worker_exit, and release_process() waited close_timeout for it
    # (a quick stop: 5.6 s instead of 0.6 s). Django's connections are per thread:
    # this closes the exiting thread's only.
    from django.db import connections

    connections.close_all()


before_release(_close_this_threads_connections)
