"""Passwords taken out of text shown to people: a bad value quoted in an error
(a DSN or URL given where a number or a table was wanted), a process's command
line in ``sharedpool leases`` (``rq worker --url redis://:pw@host``).

Only what a connection string spells as a password is hidden: the userinfo
password of a URL (``scheme://user:***@host``) and a ``password=`` setting
(libpq's keyword form, a URL's query, ``PGPASSWORD=``, a dict's repr); host,
port, user and database stay, so a message still says which server it was.
"""

from __future__ import annotations

import re

#: ``scheme://user:PASSWORD@``: up to the last ``@`` before the path, as
#: urllib (redis-py) reads it; libpq ends the password at its first ``@``, within that.
_URL_PASSWORD = re.compile(r"(://[^\s:/?#@]*:)[^\s/?#]*@")
#: ``password=x``, ``password = 'a b'``, ``sslpassword=x``, ``&password=x``,
#: ``'password': 'x'`` (a dict's repr), ``--password=x``.
_KEY_PASSWORD = re.compile(
    r"""(password(?:\s*=|['"]\s*:)\s*)(?!\*\*\*(?:[\s&,'"]|$))"""  # not again: a dict's "***,"
    # Quoted (a bytes repr's b'' too), or bare with libpq's backslash escapes (``pass\ word``).
    r"""([bB]?'(?:[^'\\]|\\.)*'?|[bB]?"(?:[^"\\]|\\.)*"?|(?:[^\s&'"\\]|\\.)+)""",
    re.IGNORECASE)
#: An argument whose next one is a password (``--password x``, ``--redis-password x``).
_PASSWORD_FLAG = re.compile(r"--?(?:[\w-]*[-_])?pass(?:word)?", re.IGNORECASE)

HIDDEN = "***"


def redact(text: str) -> str:
    """``text`` with every password it spells replaced by ``***``."""
    if "password" not in text.lower() and "://" not in text:
        return text  # the common case, no regex run
    text = _URL_PASSWORD.sub(rf"\g<1>{HIDDEN}@", text)
    return _KEY_PASSWORD.sub(rf"\g<1>{HIDDEN}", text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with its passwords hidden, argument by argument; the one
    after a ``--password`` flag whole."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        out.append(HIDDEN if hide_next else redact(arg))
        hide_next = bool(_PASSWORD_FLAG.fullmatch(arg))
    return out
