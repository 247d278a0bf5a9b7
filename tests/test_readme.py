"""The README's Layout names every module of the package, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layout_names_every_module_and_only_those() -> None:
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"\b([_a-z]+\.py)\b", layout))
    modules = {p.name for p in (ROOT / "sharedpool").rglob("*.py")}
    assert modules - named == set(), "modules the README's Layout does not name"
    assert named - modules == set(), "the README's Layout names modules that are gone"


def test_the_socket_flags_help_gives_the_readmes_default_path() -> None:
    # serve --help said "$SHAREDPOOL_SOCKET, else the per-user runtime dir",
    # while with --config the file's socket comes first (as the README says).
    import subprocess
    import sys

    text = " ".join((ROOT / "README.md").read_text().split())
    assert "else (for `serve --config`) the file's `socket`, else `$SHAREDPOOL_SOCKET`" in text
    default = ("$SHAREDPOOL_SOCKET, else $XDG_RUNTIME_DIR/sharedpool/sharedpool.sock, "
               "else /tmp/sharedpool-<uid>/sharedpool.sock")
    for command, first in (("serve", "with --config, the file's socket; else "), ("status", "")):
        out = subprocess.run([sys.executable, "-m", "sharedpool", command, "--help"],
                             capture_output=True, text=True, timeout=60, env={"COLUMNS": "400"})
        assert f"(default: {first}{default})" in " ".join(out.stdout.split()), out.stdout


def test_the_local_pools_signature_is_the_readmes() -> None:
    # The README gave ConnectionPool's signature without name=, which it takes.
    import inspect

    from sharedpool import ConnectionPool

    text = (ROOT / "README.md").read_text()
    shown = re.search(r"`ConnectionPool\((factory[^`]*)\)`", text)
    assert shown is not None, "the README shows no ConnectionPool(...) signature"
    params = list(inspect.signature(ConnectionPool.__init__).parameters.values())[1:]
    real = ", ".join(("*, " if p.kind is p.KEYWORD_ONLY and params[i - 1].kind is not p.KEYWORD_ONLY else "")
                     + p.name + ("" if p.default is p.empty else f"={p.default!r}".replace("'", '"'))
                     for i, p in enumerate(params))
    assert shown.group(1) == real


def test_the_sqlalchemy_extra_is_said_to_bring_no_driver() -> None:
    # `[sqlalchemy]` alone and the README's postgresql+psycopg:// snippet:
    # ModuleNotFoundError: No module named 'psycopg'.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = " ".join((ROOT / "README.md").read_text().split())
    if not any(req.lower().startswith("psycopg") for req in extras["sqlalchemy"]):
        assert "`[sqlalchemy]` brings no driver" in text
