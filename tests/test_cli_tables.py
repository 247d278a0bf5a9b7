"""`status`, `sessions`, `leases` and `top` at the widths operators have: 80 columns
(ssh, tmux panes, `kubectl exec`), 100, 132, and output that is not a terminal
(grep, less), against a real `sharedpool serve` with a real worker holding leases.

At 80 columns the 13 columns of `status` folded every header mid-word ("res/our/ce"),
and `leases` drew its lease, pid, process, state and age columns zero wide.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console
from servers import wait_for
from test_cli import ANSI, ENV, Serve, Worker, states_reported, stop, table_rows

from sharedpool import Client

#: Every column, in order: shown at 132 columns (short names) and when piped.
ALL = {"resources": ["resource", "cap", "leased", "in use", "idle", "connecting", "fenced", "waiting",
                     "longest wait", "grants", "timeouts", "reclaims", "state"],
       "sessions": ["pid", "name", "leases", "waiters", "connected", "last report"],
       "leases": ["lease", "resource", "pid", "process", "command", "state", "age", "in state", "site"]}
#: Shown at any width of 80 or more.
KEY = {"resources": ["resource", "cap", "leased", "in use", "idle", "fenced", "waiting", "state"],
       "sessions": ["pid", "name", "leases", "waiters"],
       "leases": ["lease", "resource", "pid", "process", "state", "age"]}


def headers(text: str) -> list[list[str]]:
    """Each table's header, one list of cells per line it takes."""
    tables: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if line.lstrip().startswith("┏"):
            inside = True
            tables.append([])
        elif line.lstrip().startswith("┡"):
            inside = False
        elif inside:
            tables[-1].append(line)
    return tables


def header_cells(text: str) -> list[list[str]]:
    """Each table's header cells; asserts that each header is one line: no word of it
    split or wrapped onto a second."""
    found = headers(text)
    assert found and all(len(lines) == 1 for lines in found), text
    return [[c.strip() for c in lines[0].split("┃")[1:-1]] for lines in found]


def check_fitted(text: str, width: int | None, name: str) -> list[str]:
    """The headers of the one table in ``text``, checked against ``width``."""
    if width is not None:
        assert max(cell_len(line) for line in text.splitlines()) <= width, text
    (shown,) = header_cells(text)
    if width is None or width >= 80:  # narrower, key columns give way too, named as the rest
        assert set(KEY[name]) <= set(shown), text
    assert shown == [h for h in ALL[name] if h in shown], text  # in their order
    hidden = [h for h in ALL[name] if h not in shown]
    if hidden:
        assert f"hidden: {', '.join(hidden)}" in " ".join(text.split()), text
    else:
        assert "hidden:" not in text, text
    return shown


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Serve, Worker]]:
    """A coordinator with two resources, and a worker holding two leases of one."""
    server = Serve(tmp_path, "--resource", "pg-main=50")
    worker = None
    try:
        worker = Worker(server, hold=2)
        wait_for(lambda: states_reported(server, 1, 1), what="lease states reported")
        yield server, worker
    finally:
        if worker is not None:
            stop(worker.proc)
        stop(server.proc)


@pytest.mark.parametrize("width", [60, 80, 100, 132, None])
def test_each_table_fits_the_width_keeping_its_key_columns(watched: tuple[Serve, Worker],
                                                             width: int | None) -> None:
    from sharedpool.cli import get_leases, get_resources, get_sessions
    from sharedpool.tables import Sheet, leases_sheet, resources_sheet, sessions_sheet

    server, worker = watched
    client = Client(server.socket, name="test-tables")
    try:
        sheets: dict[str, Sheet] = {
            "resources": resources_sheet(get_resources(client)),
            "sessions": sessions_sheet([s for s in get_sessions(client) if s["pid"] == worker.pid]),
            "leases": leases_sheet(get_leases(client)),
        }
    finally:
        client.close()
    shown = {}
    for name, sheet in sheets.items():
        console = Console(file=io.StringIO(), width=width or 1000, record=True)
        console.print(*sheet.render(width, "--wide shows all"))
        text = console.export_text()
        shown[name] = check_fitted(text, width, name)
        # Every figure whole, on the one line of its row.
        cells = [dict(zip(shown[name], r, strict=True)) for r in table_rows(text)[1:]]
        if name == "resources":
            for row, want in zip(cells, ({"resource": "demo", "cap": "3", "leased": "2", "in use": "1"},
                                         {"resource": "pg-main", "cap": "50", "leased": "0", "in use": "0"}),
                                 strict=True):
                assert {k: row[k] for k in want if k in row} == want, text
        else:
            assert [row["pid"] for row in cells] == [str(worker.pid)] * len(sheet.rows) != [], text
    if width is None or width >= 132:
        assert shown == ALL
    if width == 80:  # what gives way first
        assert "grants" not in shown["resources"] and "site" not in shown["leases"]


def _cli(*args: str, columns: str | None) -> str:
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    out = subprocess.run([sys.executable, "-m", "sharedpool", *args], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0 and not out.stderr, out
    return out.stdout


def test_piped_output_has_every_column_one_line_a_row(watched: tuple[Serve, Worker]) -> None:
    """Not a terminal and no $COLUMNS (`| grep`, `| less -S`): every column at its full
    width, each row on one line, whatever the width; the worker's command line, a
    multi-line `python -c` script, drew each lease over 27 lines."""
    server, worker = watched
    for name, command in (("resources", "status"), ("sessions", "sessions"), ("leases", "leases")):
        text = _cli(command, "--socket", server.socket, columns=None)
        assert check_fitted(text, None, name) == ALL[name]
        rows = table_rows(text)[1:]
        assert len(rows) == {"resources": 2, "sessions": 1, "leases": 2}[name], text
    assert len([line for line in text.splitlines() if str(worker.pid) in line]) == 2


def test_columns_set_is_fitted_and_wide_shows_all(watched: tuple[Serve, Worker]) -> None:
    """$COLUMNS (as `watch` sets it) is fitted to; --wide shows every column anyway;
    --json is what it was."""
    server, _ = watched
    for name, command in (("resources", "status"), ("sessions", "sessions"), ("leases", "leases")):
        text = _cli(command, "--socket", server.socket, columns="80")
        shown = check_fitted(text, 80, name)
        if shown != ALL[name]:
            assert "(--wide shows all)" in text, text
        text = _cli(command, "--wide", "--socket", server.socket, columns="80")
        assert check_fitted(text, None, name) == ALL[name]
        data = json.loads(_cli(command, "--wide", "--json", "--socket", server.socket, columns="80"))
        assert list(data) == (["coordinator", "resources"] if name == "resources" else [name])


def test_fit_width_is_the_terminals_or_columns_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from sharedpool.cli import fit_width

    monkeypatch.delenv("COLUMNS", raising=False)
    assert fit_width(Console(file=io.StringIO(), width=200)) is None  # piped
    assert fit_width(Console(file=io.StringIO(), width=90, force_terminal=True)) == 90
    assert fit_width(Console(file=io.StringIO(), width=90, force_terminal=True), wide=True) is None
    monkeypatch.setenv("COLUMNS", "72")
    assert fit_width(Console(file=io.StringIO(), width=72)) == 72


def test_top_on_an_80_column_terminal(watched: tuple[Serve, Worker]) -> None:
    server, _ = watched
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 80, 0, 0))
    env = {k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedpool", "top", "--socket", server.socket, "--interval", "0.2"],
        stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm-256color"},
        start_new_session=True)
    os.close(slave)
    seen = bytearray()

    def screen() -> str:
        if select.select([master], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                seen.extend(os.read(master, 65536))
        return ANSI.sub("", seen.decode("utf-8", "replace"))

    try:
        wait_for(lambda: screen().count("sharedpool top") >= 3, 15, "top to refresh twice")
        os.write(master, b"q")
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            screen()
        text = screen()
        assert proc.returncode == 0 and "Traceback" not in text, text[-2000:]
        first = text.index("sharedpool top")
        frame = text[first:text.index("sharedpool top", first + 1)]  # one whole refresh
        assert "hidden: " in frame and "(widen to see)" in frame, frame
        tables: list[Any] = header_cells(frame)
        assert len(tables) == 2 and set(KEY["resources"]) <= set(tables[0]), frame
        assert set(KEY["sessions"]) <= set(tables[1]), frame
        assert max(cell_len(line) for line in frame.splitlines()) <= 80, frame
    finally:
        stop(proc)
        os.close(master)
