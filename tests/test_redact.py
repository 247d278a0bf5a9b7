"""Passwords hidden from text shown to people (sharedpool.redact): what is
hidden, and that the rest of a connection string (host, port, user, database)
stays to say which server it was."""

from __future__ import annotations

import pytest

from sharedpool.redact import redact, redact_argv


@pytest.mark.parametrize(("text", "shown"), [
    ("postgresql://u:hunter2@h:5432/d", "postgresql://u:***@h:5432/d"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    # urllib (redis-py) takes the password up to the last @ before the path.
    ("redis://u:hun@ter2@h/0", "redis://u:***@h/0"),
    ("postgresql://u:hunter2@h1,h2/d", "postgresql://u:***@h1,h2/d"),
    ("host=h password=hunter2 dbname=d", "host=h password=*** dbname=d"),
    (r"host=h password='hun ter\' 2' dbname=d", "host=h password=*** dbname=d"),
    ("host=h sslpassword = hunter2", "host=h sslpassword = ***"),
    ("postgresql://u@h/d?password=hunter2&sslmode=require", "postgresql://u@h/d?password=***&sslmode=require"),
    ("{'password': 'hunter2', 'host': 'h'}", "{'password': ***, 'host': 'h'}"),
    ("PGPASSWORD=hunter2 psql", "PGPASSWORD=*** psql"),
    ("got 'host=h password=hunter2'", "got 'host=h password=***'"),
    # libpq's unquoted value takes a backslash escape; a bytes value's repr has a b before its quote.
    (r"host=h password=hun\ ter2 dbname=d", "host=h password=*** dbname=d"),
    ("{'password': b'hunter2', 'host': 'h'}", "{'password': ***, 'host': 'h'}"),
])
def test_a_password_is_hidden_and_the_rest_kept(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert redact(shown) == shown  # again: unchanged (a ConfigError's detail is re-raised)


@pytest.mark.parametrize("text", [
    "resources.pg.max_size: must be an integer, got 'x'", "postgresql://u@h/d", "http://h:8080/metrics",
    "not shown: it may hold a password)", "allowed: db, password, port",
])
def test_text_without_a_password_is_unchanged(text: str) -> None:
    assert redact(text) == text


def test_a_command_line_hides_each_password_and_a_password_flags_value() -> None:
    argv = ["rq", "worker", "--url", "redis://:hunter2@h/0", "--password", "hunter3", "--redis-pass",
            "hunter4", "--bypass", "kept", "--dsn=host=h password=hunter5"]
    assert redact_argv(argv) == ["rq", "worker", "--url", "redis://:***@h/0", "--password", "***",
                                 "--redis-pass", "***", "--bypass", "kept", "--dsn=host=h password=***"]
