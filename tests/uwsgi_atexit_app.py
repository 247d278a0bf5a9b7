"""The example app for tests/test_uwsgi.py, with a ``uwsgi.atexit`` of its own
set before sharedpool is imported (EXAMPLE_ATEXIT=before) or after it
(EXAMPLE_ATEXIT=after), that queries through the app's engine: each process
that runs it appends "<pid> ok" (or the error) to $EXAMPLE_ATEXIT_LOG."""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Any

import uwsgi

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gunicorn_app" / "app.py"
_example: dict[str, Any] = {}


def _app_atexit() -> None:
    from sqlalchemy import text

    try:
        with _example["engine"].connect() as conn:
            conn.execute(text("SELECT 1"))
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - written down, asserted by the test
        outcome = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    with open(os.environ["EXAMPLE_ATEXIT_LOG"], "a") as f:
        f.write(f"{os.getpid()} {outcome}\n")


if os.environ["EXAMPLE_ATEXIT"] == "before":
    uwsgi.atexit = _app_atexit
_example.update(runpy.run_path(str(EXAMPLE)))  # imports sharedpool
if os.environ["EXAMPLE_ATEXIT"] == "after":
    uwsgi.atexit = _app_atexit
application = _example["app"]
