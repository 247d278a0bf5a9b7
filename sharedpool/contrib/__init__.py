"""Integrations with the servers and pools users already run.

* :mod:`sharedpool.contrib.sqlalchemy` — an Engine whose QueuePool leases every DBAPI connection.
* :mod:`sharedpool.contrib.psycopg` — a ``psycopg_pool.ConnectionPool`` whose connections are leased.
* :mod:`sharedpool.contrib.django` — Django's PostgreSQL backend whose ``OPTIONS["pool"]`` is that class.
* :mod:`sharedpool.contrib.redis` — a ``redis.BlockingConnectionPool`` whose connections are leased.
* :mod:`sharedpool.contrib.gunicorn`, :mod:`sharedpool.contrib.celery` — hooks that run the
  coordinator in the master / parent process and attach the workers.
* :mod:`sharedpool.contrib.rq` — an RQ ``Worker`` whose work horses give their leases back before they exit.

Each module imports its host library only when imported itself.
"""
