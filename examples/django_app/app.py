"""A one-file Django project whose every request queries PostgreSQL through
Django's connection pool, each connection leased from sharedpool: one cap across
all gunicorn workers.

``GET /?sleep=0.01`` runs ``SELECT pg_backend_pid(), pg_sleep(0.01)`` through
``django.db.connection`` and answers ``{"worker": <pid>, "backend": <backend pid>}``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

PG_URL = urlsplit(os.environ.get("EXAMPLE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
APP_NAME = os.environ.get("EXAMPLE_APP_NAME", "sharedpool-django-example")

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    USE_TZ=True,
    DATABASES={
        "default": {
            "ENGINE": "sharedpool.contrib.django",  # Django's PostgreSQL backend, pool leased
            "NAME": PG_URL.path.lstrip("/"),
            "USER": PG_URL.username or "",
            "HOST": PG_URL.hostname or "",
            "PORT": str(PG_URL.port or ""),
            "CONN_MAX_AGE": 0,  # Django's pool: each request checks a connection out and back in
            "OPTIONS": {
                "application_name": APP_NAME,
                # sharedpool.contrib.psycopg.ConnectionPool's arguments. No coordinator=:
                # the gunicorn hooks set $SHAREDPOOL_SOCKET. One connection per
                # concurrent request of the worker, leased from "pg" when opened.
                "pool": {"resource": "pg", "min_size": 0,
                         "max_size": int(os.environ.get("EXAMPLE_THREADS", "1")), "timeout": 30},
            },
        }
    },
)


def query(request: HttpRequest) -> JsonResponse:
    sleep = float(request.GET.get("sleep", "0"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [sleep])
        backend = cursor.fetchone()[0]
    return JsonResponse({"worker": os.getpid(), "backend": backend})


urlpatterns = [path("", query)]
application = get_wsgi_application()
