"""The Django ENGINE's OPTIONS["pool"] and its imports: a bad setting is named
(alias, key, the arguments allowed) in Django's ImproperlyConfigured, not a
TypeError from deep inside the pool. Each case runs in a fresh interpreter:
Django's settings are configured once per process. No database is reached
(the pool opens at the first query; without a pool, the connect is refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from proc_helpers import import_refused

pytest.importorskip("django")

SETUP = """
import json, sys
from django.conf import settings
OPTIONS = %s
settings.configure(USE_TZ=True, DATABASES={"default": {}, **{f"shop{i}": {
    "ENGINE": "sharedpool.contrib.django", "NAME": "test", "HOST": "127.0.0.1", "USER": "postgres",
    "CONN_MAX_AGE": %s, "OPTIONS": {"pool": options}} for i, options in enumerate(OPTIONS)}})
import django
django.setup()
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
said = []
for i in range(len(OPTIONS)):
    try:
        pool = connections[f"shop{i}"].pool
        if pool is None:  # what the first query does then
            connections[f"shop{i}"].ensure_connection()
    except ImproperlyConfigured as exc:
        said.append(f"ImproperlyConfigured: {exc}")
    else:
        said.append("connected without a pool" if pool is None else f"made, check={pool._check!r}")
print(json.dumps(said))
"""


def _pools_made(*options: str, conn_max_age: str = "0") -> list[str]:
    """Make a pool for each ``OPTIONS["pool"]`` given (a Python literal), alias
    "shop0", "shop1"...: what each said. One interpreter for all (Django's
    import is slow on a loaded machine); no coordinator."""
    env = {k: v for k, v in os.environ.items() if k not in ("SHAREDPOOL_SOCKET", "DJANGO_SETTINGS_MODULE")}
    code = SETUP % (f"[{', '.join(options)}]", conn_max_age)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out
    return list(json.loads(out.stdout))


def where(i: int) -> str:
    return f"ImproperlyConfigured: DATABASES['shop{i}']['OPTIONS']['pool']"


BAD = [
    # Was: TypeError: ConnectionPool.__init__() missing 1 required keyword-only argument: 'resource'
    ("True", "{} is True: sharedpool's pool needs at least the coordinator's resource"),
    ("{'max_size': 2}", "{}['resource']: missing"),
    # Was: the same "missing 'resource'", the misspelt key unnamed.
    ("{'resouce': 'pg', 'max_size': 2}", "{}['resouce']: unknown argument; allowed: check, "),
    # Was: TypeError: ConnectionPool.__init__() got an unexpected keyword argument 'max_szie'
    ("{'resource': 'pg', 'max_szie': 2}", "{}['max_szie']: unknown argument; allowed: "),
    # Was: TypeError: ... got multiple values for keyword argument 'configure'
    ("{'resource': 'pg', 'configure': print}", "{}['configure']: set by the ENGINE itself"),
    # Was: sharedpool.errors.ConfigError: timeout: must be >= 0, got -1 (no alias, no setting)
    ("{'resource': 'pg', 'timeout': -1}", "{}['timeout']: must be >= 0, got -1"),
    # Was: TypeError: '<' not supported between instances of 'str' and 'int'
    ("{'resource': 'pg', 'max_size': '2'}", "{}['max_size']: must be a number or None, got '2'"),
    # psycopg_pool's own check, said with the options it was given.
    ("{'resource': 'pg', 'min_size': -1}", "{} = {{'resource': 'pg', 'min_size': -1}}: min_size cannot be "),
    # Was: the conninfo quoted whole, password included.
    ("{'resource': 'pg', 'min_size': -1, 'conninfo': 'postgresql://u:hunter2@h/d'}",
     "{} = {{'resource': 'pg', 'min_size': -1, 'conninfo': 'postgresql://u:***@h/d'}}: min_size cannot be "),
    # Was: made; every query then waited the pool's timeout, "couldn't get a
    # connection after 30.00 sec" and no reason (each checkout's check failed unseen).
    ("{'resource': 'pg', 'check': 'yes'}", "{}['check']: must be callable, got 'yes'"),
    ("'pg'", "{}: must be a dict of ConnectionPool's arguments, got 'pg'"),
    # Was: connected, outside the pool, with no lease (no cap, no word said).
    ("None", "{} is not set: ENGINE 'sharedpool.contrib.django' leases only the connections of Django's "
              "pool"),
]


def test_a_bad_pool_option_is_named_in_improperly_configured() -> None:
    said = _pools_made(*(options for options, _ in BAD))
    for i, (options, expected) in enumerate(BAD):
        assert said[i].startswith(expected.format(where(i))), (options, said[i])


def test_the_allowed_arguments_are_the_pools_own_and_psycopg_pools() -> None:
    [said] = _pools_made("{'resource': 'pg', 'max_szie': 2}")
    allowed = set(said.split("allowed: ")[1].split(", "))
    assert {"resource", "coordinator", "lease_timeout", "max_size", "min_size", "timeout"} <= allowed, said
    assert not {"kwargs", "open", "configure"} & allowed, said


def test_check_in_options_replaces_the_health_check_as_django_6_lets_it() -> None:
    # Django 6's pool property takes OPTIONS["pool"]["check"] (setdefault);
    # 5.x's, which this ENGINE copied, raised "got multiple values for 'check'".
    assert _pools_made("{'resource': 'pg', 'min_size': 0, 'max_size': 2, 'check': print}",
                       "{'resource': 'pg', 'min_size': 0, 'max_size': 2}") == [
        "made, check=<built-in function print>", "made, check=None"]


def test_a_persistent_connection_is_refused_naming_the_alias_and_conn_max_age() -> None:
    # Was Django's "Pooling doesn't support persistent connections.": which alias,
    # which setting, unsaid.
    for conn_max_age in ("None", "60"):
        [said] = _pools_made("{'resource': 'pg'}", conn_max_age=conn_max_age)
        assert said.startswith(f"ImproperlyConfigured: DATABASES['shop0']['CONN_MAX_AGE'] = {conn_max_age}: "
                               "Django's pool takes no persistent connections"), said


def test_the_engine_without_psycopg_pool_says_so() -> None:
    # Was: "'sharedpool.contrib.django' isn't an available database backend or
    # couldn't be imported", over "No module named 'psycopg_pool'". (With
    # psycopg2 instead of psycopg 3 it now says "Django found psycopg2 <version> only".)
    err = import_refused("import sys\nsys.modules['psycopg_pool'] = None\n"
                         "import sharedpool.contrib.django.base\n")
    assert ("ImproperlyConfigured: ENGINE 'sharedpool.contrib.django' needs psycopg_pool (Django's "
            "connection pool)") in err, err
    assert "pip install 'psycopg[pool]'" in err, err
