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

``OPTIONS["pool"]`` is required (without it Django would connect unleased,
outside the cap: refused). It takes that class's arguments (``resource``, required,
``coordinator``, ``min_size``, ``max_size``, ``timeout``, ...; ``check`` too, as
in Django 6, in place of ``CONN_HEALTH_CHECKS``'s): not ``True``, which gives no
resource. A missing, misspelt or bad one raises ``ImproperlyConfigured`` naming
``DATABASES[alias]['OPTIONS']['pool'][key]`` (and the arguments allowed); so
do psycopg2 in place of psycopg 3, and psycopg without psycopg_pool. The
backend module is :mod:`sharedpool.contrib.django.base` (Django loads
``<ENGINE>.base``); it imports Django only when Django loads it.
"""
