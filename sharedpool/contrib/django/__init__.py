"""Django's PostgreSQL backend with its connection pool leased from the coordinator.

Django (5.1+, psycopg 3) makes ``psycopg_pool.ConnectionPool(**OPTIONS["pool"])``
itself and has no setting for the pool's class. Naming this package as the
``ENGINE`` makes :class:`sharedpool.contrib.psycopg.ConnectionPool` instead, with
the arguments Django passes, so every connection the pool opens holds a lease::

    DATABASES = {"default": {
        "ENGINE": "sharedpool.contrib.django", "NAME": "app", "HOST": "db", "USER": "app",
        "CONN_MAX_AGE": 0,  # a pool, as Django requires for OPTIONS["pool"]
        "OPTIONS": {"pool": {"resource": "pg", "min_size": 0, "max_size": 4}},
    }}

``OPTIONS["pool"]`` takes that class's arguments (``resource``, ``coordinator``,
``min_size``, ``max_size``, ``timeout``, ...); ``True`` means its defaults. The
backend module is :mod:`sharedpool.contrib.django.base` (Django loads
``<ENGINE>.base``); it imports Django only when Django loads it.
"""
