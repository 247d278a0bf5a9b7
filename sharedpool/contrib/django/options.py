"""``OPTIONS["pool"]`` of the Django ENGINE: checked, every error naming the setting.

Plain ``TypeError``s from deep inside the pool's ``__init__`` ("missing 1
required keyword-only argument", "unexpected keyword argument") named neither
the database alias nor the arguments allowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured

from ...errors import ConfigError
from ...redact import redact

P = TypeVar("P")

#: Arguments the ENGINE gives the pool itself, and why a user's cannot replace them.
SET_BY_THE_ENGINE = {
    "kwargs": "the connection settings: NAME, USER, HOST, PORT, OPTIONS",
    "open": "the pool opens at the first query, in the process that makes it",
    "configure": "Django's own (time zone, role) on every new connection",
}


def make_pool(cls: type[P], alias: str, options: Any, fixed: dict[str, Any],
              defaults: dict[str, Any]) -> P:
    """``cls(**fixed, **defaults, **options)``, the user's ``options`` checked
    first (``defaults`` they may replace, as Django 6 lets ``check`` be)."""
    where = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    if options is True:
        raise ImproperlyConfigured(
            f"{where} is True: sharedpool's pool needs at least the coordinator's resource "
            f"to lease from, e.g. {{'resource': 'pg'}}")
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"{where}: must be a dict of {cls.__qualname__}'s arguments, got {options!r}")
    allowed = sorted(_arguments(cls) - set(fixed))
    for key in options:
        if key in fixed:
            why = SET_BY_THE_ENGINE.get(key, "")
            raise ImproperlyConfigured(f"{where}[{key!r}]: set by the ENGINE itself ({why})")
        if key not in allowed:
            raise ImproperlyConfigured(f"{where}[{key!r}]: unknown argument; allowed: {', '.join(allowed)}")
    if "resource" not in options:
        raise ImproperlyConfigured(f"{where}['resource']: missing: the coordinator's resource to lease "
                                   "from, e.g. 'pg'")
    try:
        return cls(**fixed, **{**defaults, **options})
    except ConfigError as exc:
        field = f"[{exc.field!r}]" if exc.field in options else f": {exc.field}"
        raise ImproperlyConfigured(f"{where}{field}: {exc.detail}") from exc
    except (TypeError, ValueError) as exc:  # psycopg_pool's own checks: "max_size must be ...", "'<' not ..."
        # Its password hidden: OPTIONS["pool"] may hold a conninfo.
        raise ImproperlyConfigured(redact(f"{where} = {dict(options)!r}: {exc}")) from exc


def _arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s, and its bases'
    as far as each passes ``**kwargs`` on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names
