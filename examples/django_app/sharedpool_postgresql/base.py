"""Django's PostgreSQL backend whose ``OPTIONS["pool"]`` is sharedpool's psycopg_pool.

Django (5.1+) makes ``psycopg_pool.ConnectionPool(**OPTIONS["pool"])`` itself and
has no setting for the class: this ENGINE makes ``sharedpool.contrib.psycopg``'s
instead, with the same arguments Django passes, so every connection the pool
opens is leased (``OPTIONS["pool"]`` takes ``resource=`` and the rest of that
class's arguments). Copy this package into the project and name it in
``DATABASES[...]["ENGINE"]``. It overrides Django's ``DatabaseWrapper.pool``
(Django 5.1 and 5.2), so compare it with Django's own after an upgrade.
"""

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base

from sharedpool.contrib.psycopg import ConnectionPool


class DatabaseWrapper(base.DatabaseWrapper):
    @property
    def pool(self):  # Django's, with sharedpool's ConnectionPool
        options = self.settings_dict["OPTIONS"].get("pool")
        if self.alias == NO_DB_ALIAS or not options:
            return None
        if self.alias not in self._connection_pools:
            if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
                # A connection held between requests would hold its lease: the
                # other workers would wait for it, at the cap, until it ages out.
                raise ImproperlyConfigured("Pooling doesn't support persistent connections.")
            pool = ConnectionPool(
                kwargs={**self.get_connection_params(), "autocommit": True},
                open=False,  # opened at the first query, in the worker
                configure=self._configure_connection,
                check=ConnectionPool.check_connection if self.settings_dict["CONN_HEALTH_CHECKS"] else None,
                **({} if options is True else options),
            )
            self._connection_pools.setdefault(self.alias, pool)
        return self._connection_pools[self.alias]
