"""The ``sharedpool`` command, run as real subprocesses against a real ``sharedpool serve``
with real worker processes holding real leases.

Every process a test starts is stopped by its pid; every test has its own socket
under ``tmp_path``. The helpers here are imported by test_metrics.py and test_demo.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pty
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import servers
from servers import wait_for

from sharedpool import Client, SharedPoolError
from sharedpool.program import coordinator_listening

ENV = {**os.environ, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
ENV.pop("SHAREDPOOL_SOCKET", None)

# A worker: a pool on resource "demo" holding HOLD connections (the first in use,
# the rest idle), then obeying commands from stdin, one reply line each.
WORKER = r"""
import json, sqlite3, sys, time
from sharedpool import ConnectionPool, PoolConfig
sock, hold = sys.argv[1], int(sys.argv[2])
pool = ConnectionPool(lambda: sqlite3.connect(":memory:", check_same_thread=False),
                      PoolConfig(min_size=0, max_size=5, test_on_acquire=False),
                      resource="demo", coordinator=sock)
held = [pool.acquire(timeout=10) for _ in range(hold)]
for w in held[1:]:
    pool.release(w)
held = held[:1]
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "acquire":
            start = time.monotonic()
            held.append(pool.acquire(timeout=float(args[0])))
            print(f"got {time.monotonic() - start:.3f}", flush=True)
        elif cmd == "release":
            pool.release(held.pop())
            print("released", flush=True)
        elif cmd == "metrics":
            print("metrics " + json.dumps(pool.get_metrics()), flush=True)
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
"""


def sp(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sharedpool ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "sharedpool", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def serve_config(tmp_path: Path, text: str) -> tuple[Path, Serve]:
    """``sharedpool serve --config tmp_path/sp.toml``, the file holding ``text``
    (rewrite it to reload): the file and the server."""
    config = tmp_path / "sp.toml"
    config.write_text(text)
    return config, Serve(tmp_path, "--config", str(config), resource="")


def sp_json(*args: str) -> Any:
    out = sp(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its pid: signal, wait, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Serve(servers.Serve):
    """``sharedpool serve`` with the CLI tests' environment (no $SHAREDPOOL_SOCKET)."""

    def __init__(self, tmp_path: Path, *args: str, resource: str = "demo=3") -> None:
        super().__init__(tmp_path, *args, resource=resource, env=ENV)

    def status(self, name: str = "demo") -> dict[str, Any]:
        rows = sp_json("status", "--socket", self.socket)["resources"]
        return next(r for r in rows if r["name"] == name)


class Worker:
    """A worker process holding leases, driven line by line over stdin/stdout."""

    def __init__(self, serve: Serve, hold: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, serve.socket, str(hold), *extra], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.expect(15) == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, timeout: float = 10.0) -> str:
        return self.lines.get(timeout=timeout)

    def silent_for(self, seconds: float) -> bool:
        try:
            self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    server = Serve(tmp_path)
    yield server
    stop(server.proc)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        stop(worker.proc)


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of a rich table (box drawing or ASCII)."""
    return [[c.strip() for c in re.split(r"[│|┃]", line)[1:-1]]
            for line in text.splitlines() if re.match(r"^\s*[│|┃]", line)]


def states_reported(serve: Serve, in_use: int, idle: int) -> bool:
    res = serve.status()
    return res["in_use"] == in_use and res["idle"] == idle


# ------------------------------------------------------------------ inspection


def test_status_leases_sessions_json_and_tables(serve: Serve, workers: list[Worker]) -> None:
    workers.append(worker := Worker(serve, hold=2))
    wait_for(lambda: states_reported(serve, 1, 1), what="lease states reported")

    status = sp_json("status", "--socket", serve.socket)
    (res,) = status["resources"]
    for key in ("name", "max_size", "leased", "in_use", "idle", "waiting", "longest_wait_s",
                "grants", "timeouts", "reclaims", "paused", "draining"):
        assert key in res
    assert (res["name"], res["max_size"], res["leased"], res["in_use"], res["idle"],
            res["waiting"]) == ("demo", 3, 2, 1, 1, 0)
    assert status["coordinator"]["pid"] == serve.proc.pid
    assert status["coordinator"]["sessions"] == 1  # the worker's; not this command's own

    leases = sp_json("leases", "--socket", serve.socket)["leases"]
    assert len(leases) == 2
    for lease in leases:
        assert {"id", "resource", "pid", "state", "age_s", "state_s", "site", "process_name",
                "cmdline"} <= lease.keys()
        assert (lease["resource"], lease["pid"]) == ("demo", worker.pid)
        assert lease["process_name"].startswith("python")
        assert lease["cmdline"][:2] == [sys.executable, "-c"]
        assert lease["age_s"] >= lease["state_s"] >= 0
    assert sorted(lease["state"] for lease in leases) == ["idle", "in_use"]
    assert sp_json("leases", "--socket", serve.socket, "--pid", str(worker.pid))["leases"]
    assert sp_json("leases", "--socket", serve.socket, "--pid", "1")["leases"] == []
    other = sp("leases", "--socket", serve.socket, "--resource", "other", "--json")
    assert other.returncode == 1 and "no resource 'other' (known: demo)" in other.stderr

    (session,) = sp_json("sessions", "--socket", serve.socket)["sessions"]  # not the CLI's own
    assert (session["pid"], session["leases"], session["waiters"]) == (worker.pid, 2, 0)
    assert {"name", "connected_s", "last_report_s"} <= session.keys()

    out = sp("status", "--socket", serve.socket)
    assert out.returncode == 0, out.stderr
    row = next(r for r in table_rows(out.stdout) if r and r[0] == "demo")
    assert row[:8] == ["demo", "3", "2", "1", "1", "0", "0", "0"]
    assert row[-1] == "active"

    out = sp("leases", "--socket", serve.socket)
    rows = [r for r in table_rows(out.stdout) if r and r[0].isdigit()]
    assert sorted(int(r[0]) for r in rows) == sorted(lease["id"] for lease in leases)
    assert {r[2] for r in rows} == {str(worker.pid)}
    assert sorted(r[5] for r in rows) == ["idle", "in_use"]
    assert all(r[3].startswith("python") and "-c" in r[4] for r in rows)

    out = sp("sessions", "--socket", serve.socket)
    (row,) = [r for r in table_rows(out.stdout) if r and r[0] == str(worker.pid)]
    assert row[2:4] == ["2", "0"]


def test_leases_shows_a_command_line_with_its_passwords_hidden(serve: Serve, workers: list[Worker]) -> None:
    # `rq worker --url redis://:pw@host`: the command column (and --json's cmdline)
    # showed the password to whoever ran `sharedpool leases`, and wherever it was pasted.
    extra = ("--url", "redis://:hunter2@127.0.0.1:6379/0", "--dsn", "host=h password=hunter3 dbname=d",
             "--password", "hunter4")
    workers.append(worker := Worker(serve, extra=extra))
    (lease,) = sp_json("leases", "--socket", serve.socket)["leases"]
    assert lease["pid"] == worker.pid
    assert lease["cmdline"][-6:] == ["--url", "redis://:***@127.0.0.1:6379/0", "--dsn",
                                     "host=h password=*** dbname=d", "--password", "***"], lease["cmdline"]
    # The table's command column is these rows' cmdline (here cut short by the -c script's width).
    out = sp("leases", "--socket", serve.socket, "--wide")
    assert out.returncode == 0 and str(worker.pid) in out.stdout and "hunter" not in out.stdout, out


def test_leases_lists_the_fenced_slots_status_counts(tmp_path: Path, workers: list[Worker]) -> None:
    # Before: status said fenced 2 after a worker died, and `leases` listed nothing.
    server = Serve(tmp_path, resource="demo=3,quarantine_delay=60")
    try:
        workers.append(worker := Worker(server, hold=2))
        ids = sorted(row["id"] for row in sp_json("leases", "--socket", server.socket)["leases"])
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait(10)
        wait_for(lambda: server.status()["fenced"] == 2, what="the dead worker's leases fenced")
        rows = sp_json("leases", "--socket", server.socket)["leases"]
        assert sorted(r["id"] for r in rows) == ids, rows
        assert {(r["pid"], r["state"]) for r in rows} == {(worker.pid, "fenced")}
        assert all(0 < r["ends_in_s"] <= 60 and r["state_s"] is None for r in rows), rows
        assert sp_json("leases", "--socket", server.socket, "--pid", "1")["leases"] == []
        out = sp("leases", "--socket", server.socket)
        states = [r[5] for r in table_rows(out.stdout) if r and r[0].isdigit()]
        assert len(states) == 2 and all(s.startswith("fenced <=") for s in states), out.stdout
    finally:
        stop(server.proc)


def test_missing_coordinator_is_one_clear_line(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    for command in ("status", "leases", "sessions", "top"):
        start = time.monotonic()
        out = sp(command, "--socket", path)
        assert out.returncode == 1
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert f"no coordinator at {path}" in out.stderr
        assert "start one with `sharedpool serve`" in out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
        assert time.monotonic() - start < 5


def test_a_socket_path_that_is_no_socket_says_so(tmp_path: Path) -> None:
    # Connecting to a file or a directory is "Connection refused": it read as a
    # coordinator not running, and `sharedpool serve` there then refused the path.
    conf = tmp_path / "sharedpool.toml"
    conf.write_text("[resources.pg]\nmax_size = 2\n")
    for path, kind in ((str(conf), "a regular file"), (str(tmp_path), "a directory")):
        out = sp("status", "--socket", path)
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert f"no coordinator at {path}: it is {kind}, not a socket" in out.stderr, out.stderr
        assert "start one" not in out.stderr and "Traceback" not in out.stderr


def test_errors_are_one_line_with_a_click_that_has_no_no_args_is_help_error(tmp_path: Path) -> None:
    # click < 8.2 (click>=8.1 is admitted) has no NoArgsIsHelpError: naming it in an
    # except clause turned every error of the CLI into a traceback there.
    code = ("import sys, click.exceptions\n"
            "vars(click.exceptions).pop('NoArgsIsHelpError', None)\n"
            "from sharedpool.cli import main\n"
            "main(sys.argv[1:])\n")
    path = str(tmp_path / "nobody.sock")
    out = subprocess.run([sys.executable, "-c", code, "status", "--socket", path],
                         capture_output=True, text=True, env=ENV, timeout=30)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().count("\n") == 0 and f"no coordinator at {path}" in out.stderr, out.stderr


def test_top_for_a_script_fails_when_its_last_refresh_got_no_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen(8)  # connects succeed; nobody ever answers
        out = sp("top", "--socket", path, "--iterations", "1", "--interval", "0.1")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "coordinator unreachable" in out.stdout  # the frame it showed
    assert out.stderr.strip().count("\n") == 0 and path in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_top_shows_a_coordinator_restart_in_its_frames_not_in_log_lines(
        start_coordinator: Any, sock_path: str) -> None:
    # The view says "coordinator unreachable" itself; the client's own warnings
    # ("lost coordinator ...", "reconnected to ...") went to stderr as well,
    # which in a terminal print over the live view. Each step waits for the frame
    # that shows the one before: fixed sleeps lost the race on a loaded machine
    # (top not yet connected when the coordinator was killed: "no coordinator").
    first = start_coordinator({"r": 1})
    top = subprocess.Popen([sys.executable, "-m", "sharedpool", "top", "--socket", sock_path,
                            "--interval", "0.2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in top.stdout or ()], daemon=True).start()

    def frame(saying: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                if saying in lines.get(timeout=0.5):
                    return
        pytest.fail(f"no frame of top said {saying!r} in 60 s")

    try:
        frame("every 0.2s")  # a frame of the first coordinator
        first.kill()
        frame("coordinator unreachable")
        start_coordinator({"r": 1})
        frame("every 0.2s")  # reconnected: the warnings, if any, are out
        top.send_signal(signal.SIGINT)  # quits as Ctrl-C does
        _, err = top.communicate(timeout=30)
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
    assert top.returncode == 0, err
    assert "lost coordinator" not in err and "reconnected" not in err, err


def test_a_refusing_coordinator_is_named_as_such_not_as_missing(start_coordinator: Any,
                                                                 sock_path: str) -> None:
    start_coordinator({"r": 1}, allowed_uids=[os.getuid() + 12345])  # not us
    # A few times: the refusal may hang up before our hello is out (EPIPE).
    for command in ("status", "leases", "status", "top", "status"):
        out = sp(command, "--socket", sock_path, *(["--iterations", "1"] if command == "top" else []))
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert "access denied by the coordinator" in out.stderr, out.stderr
        assert f"uid {os.getuid()}" in out.stderr
        assert "start one" not in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ admin verbs


def test_pause_then_resume(serve: Serve, workers: list[Worker]) -> None:
    workers.append(worker := Worker(serve))
    out = sp("pause", "demo", "--socket", serve.socket)
    assert out.returncode == 0 and "paused demo" in out.stdout
    assert serve.status()["paused"] is True
    worker.send("acquire 20")
    assert worker.silent_for(1.0), "acquire was granted while paused"
    wait_for(lambda: serve.status()["waiting"] == 1, what="the acquire to queue")
    assert sp_json("resume", "demo", "--socket", serve.socket) == {"resource": "demo",
                                                                   "paused": False}
    assert worker.expect(10).startswith("got ")
    res = serve.status()
    assert (res["paused"], res["waiting"], res["leased"]) == (False, 0, 2)


def test_resize(serve: Serve, workers: list[Worker]) -> None:
    workers.append(worker := Worker(serve))
    out = sp("resize", "demo", "--max-size", "1", "--socket", serve.socket)
    assert out.returncode == 0 and "max_size=1" in out.stdout
    assert serve.status()["max_size"] == 1
    worker.send("acquire 0.5")
    assert worker.expect(10).startswith("error PoolTimeout")
    assert sp_json("resize", "demo", "--max-size", "4", "--socket", serve.socket)["max_size"] == 4
    worker.send("acquire 5")
    assert worker.expect(10).startswith("got ")
    assert (serve.status()["max_size"], serve.status()["leased"]) == (4, 2)


def test_drain_closes_idle_now_and_in_use_at_checkin(serve: Serve, workers: list[Worker]) -> None:
    workers.append(worker := Worker(serve, hold=2))
    wait_for(lambda: states_reported(serve, 1, 1), what="lease states reported")
    out = sp("drain", "demo", "--socket", serve.socket)
    assert out.returncode == 0 and "draining demo" in out.stdout
    wait_for(lambda: serve.status()["leased"] == 1, what="the idle connection's lease to return")
    assert serve.status()["draining"] is True
    worker.send("metrics")
    metrics = json.loads(worker.expect().removeprefix("metrics "))
    assert (metrics["status"], metrics["current_size"], metrics["in_use"]) == ("draining", 1, 1)
    worker.send("release")
    assert worker.expect() == "released"
    wait_for(lambda: serve.status()["leased"] == 0, what="the in-use lease to return at checkin")
    worker.send("acquire 1")
    assert worker.expect().startswith("error PoolClosed")


def test_end_session(serve: Serve, workers: list[Worker]) -> None:
    workers.append(worker := Worker(serve, hold=2))
    out = sp("end-session", str(worker.pid), "--socket", serve.socket)
    assert out.returncode == 0, out.stderr
    assert f"asked pid {worker.pid}" in out.stdout
    # Its pool closes: the idle connection now, the one in use when it comes back.
    wait_for(lambda: serve.status()["leased"] == 1, what="the idle connection's lease to return")
    worker.send("release")
    assert worker.expect() == "released"
    wait_for(lambda: serve.status()["leased"] == 0, what="the in-use lease to return")
    worker.send("acquire 1")
    assert worker.expect().startswith("error PoolClosed")
    out = sp("end-session", "1", "--socket", serve.socket)
    assert out.returncode == 1 and "no session with pid 1" in out.stderr


def test_admin_errors_are_one_line(serve: Serve) -> None:
    out = sp("pause", "nope", "--socket", serve.socket)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no resource 'nope'" in out.stderr
    out = sp("reload", "--socket", serve.socket)
    assert out.returncode == 1 and "--config" in out.stderr
    out = sp("leases", "--resource", "nope", "--socket", serve.socket)  # not an empty table
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no resource 'nope'" in out.stderr, out.stderr


@pytest.mark.parametrize(("args", "name"), [
    (["resize", "demo", "--max-size", "99999999999999999999999"], "--max-size"),
    (["resize", "demo", "--max-size", "0"], "--max-size"),
    (["end-session", "99999999999999999999999"], "PID"),
    (["end-session", "0"], "PID"),
    (["leases", "--pid", "99999999999999999999999"], "--pid"),
    (["leases", "--pid", "-1"], "--pid"),
])
def test_out_of_range_numbers_are_refused_at_once(serve: Serve, args: list[str], name: str) -> None:
    started = time.monotonic()
    out = sp(*args, "--socket", serve.socket)
    # Not sent: msgpack cannot carry it, and the request used to time out after 5 s.
    assert time.monotonic() - started < 4
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and name in out.stderr and "range" in out.stderr, out.stderr
    assert "no reply" not in out.stderr


def test_admin_refused_to_non_admin_uid(tmp_path: Path) -> None:
    server = Serve(tmp_path, "--admin-uid", "4242424")
    try:
        out = sp("pause", "demo", "--socket", server.socket)
        assert out.returncode == 1
        assert "access denied" in out.stderr and out.stderr.count("\n") == 1
        assert server.status()["paused"] is False  # inspection is still allowed
    finally:
        stop(server.proc)


def test_admitted_peers_that_cannot_reach_the_socket_are_warned_of(tmp_path: Path) -> None:
    # --allow-uid without --group: the socket is 0600, so that uid got
    # "Permission denied" at every connect, and the log said nothing.
    server = Serve(tmp_path, "--allow-uid", "4242424")
    try:
        line = wait_for(lambda: next((ln for ln in server.log().splitlines() if "cannot reach" in ln), None),
                        15, "the warning")
        assert "allowed_uids [4242424]" in line and "0600" in line and "set group" in line, line
    finally:
        stop(server.proc)
    (tmp_path / "g").mkdir()
    with_group = Serve(tmp_path / "g", "--allow-uid", "4242424", "--group", str(os.getgid()))
    stop(with_group.proc)  # its log complete
    assert "serving" in with_group.log() and "cannot reach" not in with_group.log(), with_group.log()


def test_reload_and_sighup(tmp_path: Path) -> None:
    config, server = serve_config(tmp_path, "[resources]\ndemo = 3\n")
    try:
        config.write_text("[resources]\ndemo = 5\nextra = { max_size = 2 }\n")
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 0, out.stderr
        assert "extra" in out.stdout
        assert server.status()["max_size"] == 5 and server.status("extra")["max_size"] == 2
        # A resource added is said so, its limits on record (before: only the list of names).
        assert "added: extra" in out.stdout.splitlines(), out.stdout
        assert "added extra: max_size=2, " in wait_for(lambda: server.log(), what="log"), server.log()
        config.write_text("[resources]\ndemo = 7\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: server.status()["max_size"] == 7, what="SIGHUP reload")
        # A live resize is replaced by the file's value at the next reload: said so.
        assert sp("resize", "demo", "--max-size", "9", "--socket", server.socket).returncode == 0
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 0, out.stderr
        assert "changed demo: max_size 9 -> 7" in out.stdout.splitlines()
        assert server.status()["max_size"] == 7
        data = sp_json("reload", "--socket", server.socket)
        assert (data["changed"], data["added"]) == ({}, [])
        config.write_text('[resources.demo]\nmax_size = 7\nmonitor_dsn = "postgresql://u:s3cret@h/db"\n')
        out = sp("reload", "--socket", server.socket)
        assert "changed demo: monitor_dsn (hidden) -> (hidden)" in out.stdout.splitlines()
        assert "s3cret" not in out.stdout + server.log()
    finally:
        stop(server.proc)


def test_a_sighup_reload_that_grants_is_on_the_restart_marker(tmp_path: Path) -> None:
    """A reload that raises a cap grants queued acquires at once: the marker
    kept for a SIGKILLed coordinator's successor must show those leases
    without waiting for some later message."""
    from sharedpool import Client
    from sharedpool.marker import marker_path, read_marker

    config, server = serve_config(tmp_path, "[resources]\ndemo = 1\n")
    holder, waiter = Client(server.socket), Client(server.socket)
    try:
        holder.acquire("demo", timeout=5)
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(waiter.acquire("demo", timeout=10)))
        thread.start()
        wait_for(lambda: server.status()["waiting"] == 1, what="the queued acquire")
        wait_for(lambda: len(read_marker(marker_path(server.socket))["held"]) == 1, 10,
                 "the marker to show the one lease")
        config.write_text("[resources]\ndemo = 2\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        thread.join(10)
        assert got, "the reload did not grant the queued acquire"
        # No message since the grant: only the reload can write it (within the
        # keeper's 20 ms, polled for: a fixed sleep lost to a loaded machine).
        wait_for(lambda: len(read_marker(marker_path(server.socket))["held"]) == 2, 10,
                 "the marker to show the lease the reload granted")
    finally:
        holder.close()
        waiter.close()
        stop(server.proc)


def test_a_reload_that_raises_acquire_timeout_reaches_sessions_already_open(tmp_path: Path) -> None:
    """Sessions learn the limits from their welcome. An acquire given no
    timeout by a process connected before a reload that raised the resource's
    acquire_timeout (1 -> 10) gave up on its own after 2.5 s, "no reply in
    time from the coordinator", while the coordinator still held it queued."""
    from sharedpool import Client

    config, server = serve_config(tmp_path, "[resources.demo]\nmax_size = 1\nacquire_timeout = 1.0\n")
    holder, waiter = Client(server.socket), Client(server.socket)
    try:
        lease = holder.acquire("demo", timeout=5)
        assert waiter.ensure_connected() and waiter.limits["demo"]["acquire_timeout"] == 1.0
        config.write_text("[resources.demo]\nmax_size = 1\nacquire_timeout = 10.0\n"
                          "[resources.extra]\nmax_size = 2\n")
        assert sp("reload", "--socket", server.socket).returncode == 0
        wait_for(lambda: waiter.limits["demo"]["acquire_timeout"] == 10.0, what="the new limits")
        assert waiter.limits["extra"]["max_size"] == 2 and waiter.limits["demo"]["draining"] is False
        release = threading.Timer(4.0, holder.release, [lease])
        release.start()
        t0 = time.monotonic()
        got = waiter.acquire("demo")  # the resource's default: now 10 s
        assert time.monotonic() - t0 >= 3.5
        waiter.release(got)
        release.join()
    finally:
        holder.close()
        waiter.close()
        stop(server.proc)

def test_a_reload_lowering_max_per_process_gets_the_excess_back(tmp_path: Path) -> None:
    # Before: a pool holding 3 idle connections kept all 3 under the new
    # max_per_process = 1 (until its idle_timeout, or for good if in use).
    from sharedpool import ConnectionPool, PoolConfig
    from sharedpool.testing import FakeFactory

    # A fixed quantum: under "auto", a cost report the coordinator took in
    # between the reload's ask and the pool's give-back moved the quantum, and
    # the count re-sent with it did not know of the releases on their way: the
    # pool gave back one more (0 leases, not 1: made to happen with report_now()
    # from a second thread; the likely cause of a failure in a full -n auto run).
    limits = "[resources.demo]\nmax_size = 4\nfairness_quantum = 0.05\n"
    config, server = serve_config(tmp_path, limits)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=4),
                          resource="demo", coordinator=server.socket)
    try:
        held = [pool.acquire(timeout=5) for _ in range(3)]
        for w in held:
            pool.release(w)
        assert pool.get_stats()["leases_held"] == 3
        config.write_text(limits + "max_per_process = 1\n")
        assert sp("reload", "--socket", server.socket).returncode == 0
        wait_for(lambda: pool.get_stats()["leases_held"] == 1, what="the excess given back")
        status = sp_json("status", "--socket", server.socket)["resources"]
        assert [r["leased"] for r in status] == [1]
    finally:
        pool.close()
        stop(server.proc)


def test_reload_keeps_flags_and_reports_what_it_did_not_apply(tmp_path: Path) -> None:
    config = tmp_path / "sp.toml"
    config.write_text("[resources.demo]\nmax_size = 20\nmax_per_process = 4\n"
                      "[resources.old]\nmax_size = 2\n")
    server = Serve(tmp_path, "--config", str(config), resource="demo=5")
    try:
        # The flag overrides max_size only; the file's other limits stay.
        assert server.status()["max_size"] == 5
        assert server.status()["limits"]["max_per_process"] == 4
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 0, out.stderr
        assert server.status()["max_size"] == 5  # not the file's 20: the flag is applied again
        assert "restart" not in out.stdout  # nothing changed that a reload cannot apply
        config.write_text(f"[coordinator]\nhello_timeout = 3\nadmin_uids = [{os.getuid()}, 4242]\n"
                          "max_frame = 2048\n[resources.demo]\nmax_size = 20\nmax_per_process = 3\n")
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 0, out.stderr
        said = {line.split(":")[0]: line for line in out.stdout.splitlines()}
        restart = said["not applied, changed [coordinator] settings take a restart"]
        assert restart.endswith(": max_frame")
        assert said["changed [coordinator]"] == (f"changed [coordinator]: admin_uids [] -> [{os.getuid()}, "
                                                 "4242], hello_timeout 10.0 -> 3")
        assert said["removed (no new leases; those held stay valid until released)"].endswith(": old")
        assert server.status()["max_size"] == 5 and server.status()["limits"]["max_per_process"] == 3
        # No lease held: gone at once (see test_a_reload_removes_a_resource_...).
        assert [r["name"] for r in sp_json("status", "--socket", server.socket)["resources"]] == ["demo"]
        data = sp_json("reload", "--socket", server.socket)
        assert (data["needs_restart"], data["settings"], data["removed"]) == (["max_frame"], {}, [])
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: server.log().count("take a restart") >= 3, what="SIGHUP's warning")
    finally:
        stop(server.proc)


def test_a_reload_removes_a_resource_once_its_last_lease_is_released(tmp_path: Path) -> None:
    """A resource dropped from the file stayed in the ledger, in status and in the
    metrics, granting new leases with its old limits, until a restart. Now a
    reload refuses new acquires of it, naming it; a lease held stays valid
    (its connection is never cut) and, once released, the resource is gone."""
    from sharedpool import Client
    from sharedpool.errors import UnknownResource

    config, server = serve_config(tmp_path, "[resources]\ndemo = 3\nold = 2\n")
    client = Client(server.socket)
    try:
        lease = client.acquire("old", timeout=5)
        config.write_text("[resources]\ndemo = 3\n")
        data = sp_json("reload", "--socket", server.socket)
        assert data["removed"] == ["old"] and data["resources"] == ["demo"]
        assert "removed old (1 lease(s) held)" in server.log()
        with pytest.raises(UnknownResource, match="'old' was removed from the configuration by a reload"):
            client.acquire("old", timeout=5)
        row = server.status("old")
        assert (row["leased"], row["removed"]) == (1, True)
        assert "removed" in sp("status", "--socket", server.socket).stdout  # the table's state column
        typo = sp("pause", "olf", "--socket", server.socket)  # the known list says which is removed
        assert "(known: demo, old (removed by a reload))" in typo.stderr, typo.stderr
        assert [x.id for x in client.held.values()] == [lease.id]  # still held, still counted
        client.release(lease)
        wait_for(lambda: [r["name"] for r in sp_json("status", "--socket", server.socket)["resources"]]
                 == ["demo"], what="the removed resource gone after its last release")
        assert client.acquire("demo", timeout=5)
    finally:
        client.close()
        stop(server.proc)


def test_a_reload_applies_access_lists_and_timeouts_at_once(tmp_path: Path) -> None:
    """A changed [coordinator] setting was only reported ("takes a restart"),
    even those the coordinator reads at each use. Now a reload (or SIGHUP)
    applies the access lists and timeouts; the socket, group, max_frame and
    metrics still take a restart, said so."""
    config, server = serve_config(tmp_path, "[resources]\ndemo = 3\n")
    try:
        config.write_text("[coordinator]\nhello_timeout = 0.5\n[resources]\ndemo = 3\n")
        data = sp_json("reload", "--socket", server.socket)
        assert (data["settings"], data["needs_restart"]) == ({"hello_timeout": [10.0, 0.5]}, [])
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.settimeout(8)  # the old hello_timeout, 10 s, would outlast it
        silent.connect(server.socket)
        try:
            while silent.recv(4096):
                pass  # the hello_timeout error, then the end
        finally:
            silent.close()
        assert "no hello within 0.5s" in server.log()
        # Not us: from now on our admin verbs are refused.
        config.write_text("[coordinator]\nadmin_uids = [4242424]\n[resources]\ndemo = 3\n")
        assert sp("reload", "--socket", server.socket).returncode == 0
        out = sp("pause", "demo", "--socket", server.socket)
        assert out.returncode == 1 and "access denied" in out.stderr, out.stderr
        config.write_text("[coordinator]\nmetrics_host = \"127.0.0.2\"\n[resources]\ndemo = 3\n")
        os.kill(server.proc.pid, signal.SIGHUP)  # admin_uids back to the default (us), at once
        wait_for(lambda: sp("pause", "demo", "--socket", server.socket).returncode == 0,
                 what="admin verbs allowed again after the SIGHUP")
        assert "changed [coordinator] admin_uids (4242424,) -> ()" in server.log()
        assert "take a restart: metrics_host" in server.log()
    finally:
        stop(server.proc)


def test_a_reload_admitting_peers_the_socket_shuts_out_says_so(tmp_path: Path) -> None:
    """A reload applies allowed_uids at once. Started with other uids allowed and
    no group, the coordinator warns that its 0600 socket shuts them out; a reload
    that allowed them said only "changed", as if they could now connect."""
    config, server = serve_config(tmp_path, "[resources]\ndemo = 3\n")
    try:
        config.write_text(f"[coordinator]\nallowed_uids = [{os.getuid()}, 4242]\n[resources]\ndemo = 3\n")
        data = sp_json("reload", "--socket", server.socket)
        assert data["settings"] == {"allowed_uids": [[], [os.getuid(), 4242]]}
        wait_for(lambda: "allowed_uids [4242] admit peers that cannot reach" in server.log(),
                 what="the warning that uid 4242 cannot reach the socket")
    finally:
        stop(server.proc)


def test_a_failed_reload_is_in_the_coordinators_log_and_says_nothing_changed(tmp_path: Path) -> None:
    """An operator's `sharedpool reload` of a broken file: the journal had no line
    for it (a SIGHUP's had one), and the reply did not say the running limits stay."""
    config, server = serve_config(tmp_path, "[resources.demo]\nmax_size = 3\n")
    try:
        config.write_text('[resources.demo]\nmax_size = "4"\n')
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 1, out
        assert "reload failed, limits unchanged: resources.demo.max_size: must be an integer" in out.stderr
        assert server.status()["max_size"] == 3
        line = wait_for(lambda: [ln for ln in server.log().splitlines() if "refused" in ln],
                        what="the failed reload's log line")[0]
        assert "ERROR" in line and "admin reload" in line and "by pid=" in line, line
        assert "limits unchanged: resources.demo.max_size" in line, line
        # Any other verb refused for bad input is logged too, once, at warning.
        assert sp("pause", "nosuch", "--socket", server.socket).returncode == 1
        line = wait_for(lambda: [ln for ln in server.log().splitlines() if "admin pause" in ln],
                        what="the refused pause's log line")[0]
        assert "WARNING" in line and "refused: no resource 'nosuch'" in line, line
    finally:
        stop(server.proc)


def test_the_commands_own_sessions_are_not_logged_at_info(tmp_path: Path, workers: list[Worker]) -> None:
    """A monitor running `sharedpool status` every few seconds put two info lines
    a run into the coordinator's log; a worker's session is still logged."""
    server = Serve(tmp_path)
    try:
        for _ in range(3):
            assert sp("status", "--socket", server.socket).returncode == 0
        assert sp("resize", "demo", "--max-size", "4", "--socket", server.socket).returncode == 0
        workers.append(worker := Worker(server))
        wait_for(lambda: f"connected: pid={worker.pid} " in server.log(), what="the worker's session")
        lines = [ln for ln in server.log().splitlines() if "session " in ln]
        assert len(lines) == 1 and "INFO" in lines[0], lines
        assert "admin resize" in server.log()  # the verb itself is still on record
    finally:
        stop(server.proc)


def test_reload_reads_the_path_given_when_a_symlink_on_it_moves(tmp_path: Path) -> None:
    """A release swapped in by a symlink (`current -> releases/2`, a Kubernetes
    ConfigMap's `..data`): a reload reads the new target, not the one at start."""
    for release, size in (("1", 5), ("2", 9)):
        (tmp_path / release).mkdir()
        (tmp_path / release / "sp.toml").write_text(f"[resources]\ndemo = {size}\n")
    (tmp_path / "current").symlink_to("1")
    server = Serve(tmp_path, "--config", str(tmp_path / "current" / "sp.toml"), resource="")
    try:
        assert server.status()["max_size"] == 5
        (tmp_path / "next").symlink_to("2")
        os.replace(tmp_path / "next", tmp_path / "current")
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"reloaded {tmp_path / 'current' / 'sp.toml'}:"), out.stdout
        assert server.status()["max_size"] == 9
    finally:
        stop(server.proc)


# ------------------------------------------------------------------ serve


@pytest.mark.parametrize(("args", "field"), [
    (["--resource", "demo=lots"], "--resource demo"),
    (["--resource", "demo=0"], "max_size"),
    (["--resource", "demo=2,max_waitng=3"], "max_waitng"),
    (["--resource", "demo=2", "--metrics-port", "99999"], "--metrics-port: must be <= 65535"),
    (["--resource", "demo=2", "--metrics-port", "many"], "--metrics-port"),
    (["--resource", "demo=2", "--allow-uid", "-1"], "--allow-uid: must be a list of ids from 0 to"),
    (["--resource", "demo=2", "--admin-uid", str(2**32)], "--admin-uid: "),
    (["--resource", "demo=2", "--metrics-host", ""], "--metrics-host: "),
    (["--resource", "demo=2", "--group", "sp-no-such-group"], "--group: no group named"),
    (["--resource", " demo=2"], "resource: must not begin or end with whitespace, got ' demo'"),
    (["--resource", "demo=2", "--bogus"], "--bogus"),
    (["--resource", "demo=2,monitor_dsn=host='x"], "resources.demo.monitor_dsn"),
    ([], "resources"),
])
def test_serve_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], field: str) -> None:
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), *args)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1, out.stderr
    assert field in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "sp.sock").exists()


def test_serve_names_the_flag_or_variable_a_bad_socket_came_from(tmp_path: Path) -> None:
    # Before: "socket: ..." for --socket (the flag is what was typed), "coordinator.socket"
    # for a $SHAREDPOOL_SOCKET with a config file that has no socket, and for a
    # --socket naming a directory in /tmp, "directory /tmp is writable by others".
    config = tmp_path / "sp.toml"
    config.write_text("[resources]\npg = 2\n")
    long = "/tmp/" + "x" * 120
    out = sp("serve", "--socket", long, "--config", str(config))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "serve: error: --socket: " in out.stderr and "too long" in out.stderr, out.stderr
    for args in (["--config", str(config)], ["--resource", "pg=2"]):
        out = subprocess.run([sys.executable, "-m", "sharedpool", "serve", *args], capture_output=True,
                             text=True, env={**ENV, "SHAREDPOOL_SOCKET": long}, timeout=30)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "serve: error: SHAREDPOOL_SOCKET: " in out.stderr and "too long" in out.stderr, out.stderr
    shared = Path(f"/tmp/sp-test-dir-{os.getpid()}-{time.monotonic_ns()}")
    shared.mkdir()
    try:
        out = sp("serve", "--socket", str(shared), "--resource", "pg=2")
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"--socket: {shared} is a directory; give the socket's own path" in out.stderr, out.stderr
    finally:
        shared.rmdir()


@pytest.mark.parametrize(("group", "file_says", "flag_says"), [
    ('""', 'coordinator.group: must be a group name or gid as a non-empty string', None),
    ("1000", 'coordinator.group: must be a group name or gid as a non-empty string (e.g. "www-data" '
             'or "1000"), got 1000', None),
    ('"sp-no-such-group"', "coordinator.group: no group named 'sp-no-such-group'",
     "--group: no group named 'sp-no-such-group'"),
])
def test_serve_names_a_bad_group_as_the_file_or_the_flag_wrote_it(
        tmp_path: Path, group: str, file_says: str, flag_says: str | None) -> None:
    """Before: a file's unknown group was "group: no group named ..." (its other
    keys are named coordinator.KEY), and `--group ""` or a file's `group = ""`
    said "must be a group name or None": neither can say None."""
    config = tmp_path / "sp.toml"
    config.write_text(f"[coordinator]\ngroup = {group}\n[resources]\npg = 2\n")
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--config", str(config))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"serve: error: {file_says}" in out.stderr and "None" not in out.stderr, out.stderr
    if flag_says is not None:  # the flag over the file's: named as the flag
        out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--config", str(config),
                 "--group", "sp-no-such-group")
        assert f"serve: error: {flag_says}" in out.stderr, out.stderr
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--resource", "pg=2", "--group", "")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "serve: error: --group: must be a group name or gid as a non-empty string" in out.stderr
    assert "None" not in out.stderr and not (tmp_path / "sp.sock").exists()


def test_serve_refuses_a_socket_path_with_a_tilde_and_makes_no_directory_for_it(tmp_path: Path) -> None:
    # Before: it served at ./~/run/sp.sock, a directory named "~" made in its cwd.
    (tmp_path / "sp.toml").write_text('[coordinator]\nsocket = "~/run/sp.sock"\n[resources]\npg = 2\n')
    out = subprocess.run([sys.executable, "-m", "sharedpool", "serve", "--config", "sp.toml"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "coordinator.socket: ~/run/sp.sock starts with ~, which is not expanded" in out.stderr
    assert not (tmp_path / "~").exists()


def test_demo_refuses_a_dsn_that_is_no_connection_string_before_it_runs(tmp_path: Path) -> None:
    # Before: the whole run, exit 1 "check --dsn", its sampler line quoting
    # libpq's parse error: 'missing "=" after "er2"', a piece of the password.
    pytest.importorskip("psycopg")
    start = time.monotonic()
    out = sp("demo", "--dsn", "host=127.0.0.1 password=s3cr et2", "--seconds", "5", timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stdout + out.stderr
    assert "demo: error: --dsn: not a valid PostgreSQL connection string" in out.stderr, out.stderr
    assert "et2" not in out.stdout + out.stderr and "s3cr" not in out.stdout + out.stderr
    assert time.monotonic() - start < 5  # refused at once, not after the run


def test_serve_bad_config_file_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "sp.toml"
    config.write_text("[resources]\npg = { max_size = -2 }\n")
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--config", str(config))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "resources.pg.max_size" in out.stderr
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--config", str(tmp_path / "no.toml"))
    assert out.returncode == 2 and "cannot read" in out.stderr


@pytest.mark.parametrize("toml", [
    "[resources]\npg = 2\nx = " + "[" * 3000 + "]" * 3000 + "\n",  # tomllib: RecursionError
    "[resources]\npg = " + "1" * 5000 + "\n",  # int(): past the 4,300 digits Python converts
])
def test_serve_a_config_file_tomllib_chokes_on_is_one_line(tmp_path: Path, toml: str) -> None:
    config = tmp_path / "sp.toml"
    config.write_text(toml)
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--config", str(config))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-500:]
    assert "is not valid TOML" in out.stderr


def test_serve_refuses_a_second_coordinator(serve: Serve, tmp_path: Path) -> None:
    out = sp("serve", "--socket", serve.socket, "--resource", "demo=1")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "already serving" in out.stderr


_SERVE_WAITING_LESS = """
import sys
import sharedpool.startlock
sharedpool.startlock.WAIT = 1.0
from sharedpool.cli import main
sys.argv[0] = "sharedpool"
main()
"""


def test_serve_gives_up_on_a_start_that_is_stuck(tmp_path: Path) -> None:
    """Before: a start stopped (SIGSTOP, a debugger) or stuck while it held the
    start lock made every later `serve` on that path wait for ever, with no
    word. Now it says whom it waits for, gives up (30 s; 1 s here) naming
    the holder, and starts once the lock is let go."""
    from sharedpool.startlock import start_lock

    sock = str(tmp_path / "sp.sock")
    argv = [sys.executable, "-c", _SERVE_WAITING_LESS, "serve", "--socket", sock, "--resource", "demo=1"]
    with start_lock(sock):  # a start of ours, stuck
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=ENV)
    assert out.returncode == 1, out.stderr
    assert f"waiting for another start on {sock} (held by pid {os.getpid()})" in out.stderr
    assert out.stderr.strip().endswith(f"another coordinator has been starting on {sock} for 1s (held by "
                                       f"pid {os.getpid()}, lock file {tmp_path}/.sp.sock.lock); "
                                       "is it stopped or stuck?"), out.stderr
    assert "Traceback" not in out.stderr and os.listdir(tmp_path) == []
    with start_lock(sock):  # let go in time: the start goes on
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        time.sleep(0.3)
    try:
        wait_for(lambda: coordinator_listening(sock) or proc.poll() is not None, 15, "serve")
        assert proc.poll() is None
    finally:
        stop(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT],
                         ids=["SIGTERM", "SIGINT", "SIGQUIT"])
def test_a_stop_signal_stops_serve_and_removes_socket(tmp_path: Path, workers: list[Worker],
                                                      sig: int) -> None:
    # SIGQUIT (gunicorn's quick shutdown, PgBouncer's immediate one) was left to
    # its default action: serve died (exit -3, a core dump where allowed) with its
    # socket left, and the next start took it for a crash. It is the same stop now.
    server = Serve(tmp_path)
    try:
        workers.append(worker := Worker(server))
        os.kill(server.proc.pid, sig)
        assert server.proc.wait(10) == 0, server.log()
        assert not os.path.exists(server.socket)
        # What the worker holds is handed on: the next start counts it.
        assert os.path.exists(server.socket + ".restart")
        log = server.log()
        assert "Traceback" not in log
        # The worker lives on with its connection (handed on to the next start):
        # the log must not call it dead, nor its lease returned and fenced.
        assert f"dead pid {worker.pid}" not in log and "1 lease(s) returned" not in log, log
        # ... and says so: before, "coordinator stopping" was its last line.
        assert f"handed on to the next start in {server.socket}.restart: 1 lease(s) of live " \
               "processes, 0 fenced" in log, log
    finally:
        stop(server.proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGQUIT", "SIGHUP"])
def test_a_signal_as_soon_as_serve_accepts_is_handled(tmp_path: Path, sig: int) -> None:
    """The socket accepts before the event loop's signal handlers exist: a
    SIGTERM in that window killed serve outright, and so did a SIGHUP (a
    reload, SIG_DFL then), its socket left behind (the next start took it for
    a crash: a restart, granting nothing for a while). A SIGTERM stops it
    cleanly; after a SIGHUP it serves on."""
    for _ in range(3):
        server = Serve(tmp_path)
        try:
            os.kill(server.proc.pid, sig)
            if sig == signal.SIGHUP:
                time.sleep(0.5)
                assert server.proc.poll() is None, server.log()
                os.kill(server.proc.pid, signal.SIGTERM)
            assert server.proc.wait(10) == 0, server.log()
            assert not os.path.exists(server.socket)
        finally:
            stop(server.proc)


#: Runs argv[1:] with the terminal on stdin as its controlling terminal, as a shell would.
_IN_A_TERMINAL = """
import fcntl, os, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_ctrl_c_pressed_until_serve_is_gone_stops_it_cleanly(tmp_path: Path) -> None:
    # Ctrl-C is SIGINT to the terminal's foreground processes. One more as serve
    # ended met Python's own SIGINT handler again: a KeyboardInterrupt traceback
    # at exit, or exit by SIGINT instead of 0.
    sock = str(tmp_path / "sp.sock")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _IN_A_TERMINAL, "-m", "sharedpool", "serve", "--socket", sock,
         "--resource", "demo=1"], stdin=slave, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    seen = bytearray()

    def screen() -> str:
        if select.select([master], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                seen.extend(os.read(master, 65536))
        return seen.decode("utf-8", "replace")

    try:
        wait_for(lambda: "serving" in screen() or proc.poll() is not None, 15, "serve")
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                os.write(master, b"\x03")
            screen()
            time.sleep(0.01)
        assert proc.returncode == 0, screen()
        assert "Traceback" not in screen() and "KeyboardInterrupt" not in screen()
        assert not os.path.exists(sock)
    finally:
        stop(proc)
        os.close(master)


def _serve_restarted(tmp_path: Path, grace: float) -> Serve:
    """``serve --config`` (resource demo=1, ``restart_grace``) started as a
    restart: a dead coordinator's socket is left at its path."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "sp.sock"))
    stale.close()
    (tmp_path / "sp.toml").write_text(f"[coordinator]\nrestart_grace = {grace}\n[resources]\ndemo = 1\n")
    return Serve(tmp_path, "--config", str(tmp_path / "sp.toml"), resource="")


def test_status_of_more_resources_than_one_reply_holds(start_coordinator: Any, sock_path: str) -> None:
    """Before: with some 1,900 resources (a config the coordinator accepts: its
    welcome fits) `status` and `top` failed with reply_too_large, whose hint
    (`leases --resource`) did not help. They ask for the rows in parts now."""
    names = [f"tenant-{i:04d}" for i in range(2100)]
    start_coordinator(dict.fromkeys(names, 2))
    client = Client(sock_path)
    try:
        with pytest.raises(SharedPoolError, match="reply_too_large"):
            client.inspect("resources")
        rows = client.inspect("resources", names=names[5:7])["resources"]
        assert [r["name"] for r in rows] == names[5:7]
    finally:
        client.close()
    rows = sp_json("status", "--socket", sock_path)["resources"]
    assert [r["name"] for r in rows] == names


class _ListingClient:
    """A Client's inspect("resources") as a coordinator answers it: a reply
    of more than ``fits`` rows is reply_too_large; ``names`` is taken only if
    ``takes_names`` (a coordinator older than that filter ignores it)."""

    def __init__(self, count: int, fits: int, takes_names: bool) -> None:
        self.limits = {f"tenant-{i:04d}": {} for i in range(count)}
        self.socket_path = "/run/sp.sock"
        self.fits, self.takes_names = fits, takes_names
        self.asked: list[int | None] = []

    def inspect(self, what: str, timeout: float, names: list[str] | None = None) -> dict[str, Any]:
        self.asked.append(None if names is None else len(names))
        rows = [{"name": n} for n in (names if self.takes_names and names is not None else self.limits)]
        if len(rows) > self.fits:
            raise SharedPoolError("reply_too_large: the reply is too large")
        return {"resources": rows}


def test_status_in_parts_against_an_older_coordinator_says_so() -> None:
    """Rolling upgrade: a coordinator from before the ``names`` filter ignores
    it, and the parts were all refused as the whole was, with the hint of the
    whole (``leases --resource``), which did not help. Each listing also asked
    first for every name at once: the very reply just refused."""
    from sharedpool.cli import get_resources

    older = _ListingClient(2100, 1900, takes_names=False)
    with pytest.raises(SharedPoolError, match="older than this client.*upgrade the coordinator"):
        get_resources(older)  # type: ignore[arg-type]
    assert 2100 not in older.asked and len(older.asked) <= 8, older.asked
    newer = _ListingClient(2100, 1900, takes_names=True)
    rows = get_resources(newer)  # type: ignore[arg-type]
    assert [r["name"] for r in rows] == list(newer.limits)
    assert newer.asked == [None, 1050, 1050], newer.asked


def test_status_shows_a_restart_hold(tmp_path: Path) -> None:
    """Inside a restart's grace nothing is granted; status said "active" (an
    operator could not tell why every acquire waited)."""
    server = _serve_restarted(tmp_path, 30)
    try:
        [row] = sp_json("status", "--socket", server.socket)["resources"]
        assert 25 < row["restart_hold_s"] <= 30, row
        out = sp("status", "--socket", server.socket)
        assert out.returncode == 0 and "restart hold" in out.stdout, out
    finally:
        stop(server.proc)
    # Stopped inside its grace, it handed that on: without the marker, not a restart.
    (tmp_path / "sp.sock.restart").unlink()
    server = Serve(tmp_path, "--config", str(tmp_path / "sp.toml"), resource="")
    try:
        [row] = sp_json("status", "--socket", server.socket)["resources"]
        assert row["restart_hold_s"] is None, row
        assert "restart hold" not in sp("status", "--socket", server.socket).stdout
    finally:
        stop(server.proc)


def test_a_restart_with_a_grace_below_the_reconnect_backoff_is_warned(tmp_path: Path) -> None:
    """A restart_grace shorter than the clients' 1 s longest backoff lets
    newcomers in before a process holding connections is back: said at start."""
    server = _serve_restarted(tmp_path, 0.2)
    try:
        # Past the grace (stopped inside it, the next start would be a restart too),
        # asked, not slept: the socket listens before the hold starts, which under
        # load came more than 0.5 s after the socket answered.
        wait_for(lambda: server.status().get("restart_hold_s", 0) is None, 15, "the hold's end")
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(10) == 0
        log = server.log()
        assert "restart_grace=0.2s is shorter than the clients' longest reconnect backoff" in log
    finally:
        stop(server.proc)
    server = Serve(tmp_path, "--config", str(tmp_path / "sp.toml"), resource="")  # not a restart
    try:
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert "reconnect backoff" not in server.log()
    finally:
        stop(server.proc)


# ------------------------------------------------------------------ top


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def _top_in_a_pty(serve: Serve) -> tuple[subprocess.Popen[bytes], int, int]:
    """`sharedpool top` on a 200x50 pseudo-terminal: the process, the master and slave fds."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedpool", "top", "--socket", serve.socket, "--interval", "0.2"],
        stdin=slave, stdout=slave, stderr=slave, env={**ENV, "TERM": "xterm-256color"},
        start_new_session=True)
    return proc, master, slave


def test_top_in_a_terminal_refreshes_and_quits_on_q(serve: Serve, workers: list[Worker]) -> None:
    workers.append(worker := Worker(serve))
    proc, master, slave = _top_in_a_pty(serve)
    os.close(slave)
    seen = bytearray()

    def screen() -> str:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                seen.extend(os.read(master, 65536))
        return ANSI.sub("", seen.decode("utf-8", "replace"))

    def leased_shown(n: int) -> bool:
        return re.search(rf"demo\s*│\s*3\s*│\s*{n}\s*│", screen()) is not None

    try:
        wait_for(lambda: leased_shown(1), 15, "top to show 1 lease")
        worker.send("acquire 5")
        assert worker.expect().startswith("got ")
        wait_for(lambda: leased_shown(2), 15, "top to refresh and show 2 leases")
        assert len(re.findall(r"sharedpool top", screen())) >= 2
        os.write(master, b"q")
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            screen()  # keep draining the terminal while it exits
        assert proc.returncode == 0, screen()[-2000:]
        assert "Traceback" not in screen()
    finally:
        stop(proc)
        os.close(master)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_top_stopped_by_a_signal_gives_the_terminal_back(serve: Serve, sig: int) -> None:
    """`timeout 60 sharedpool top`: it still dies of the signal, but echo, line
    mode and the cursor are back (by the default action they stayed off)."""
    proc, master, slave = _top_in_a_pty(serve)
    seen = bytearray()

    def read() -> bytes:
        if select.select([master], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                seen.extend(os.read(master, 65536))
        return bytes(seen)

    try:
        wait_for(lambda: b"sharedpool top" in read() and
                 not termios.tcgetattr(slave)[3] & termios.ICANON, 15, "top in cbreak mode")
        proc.send_signal(sig)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            read()  # keep draining the terminal while it exits
        read()
        assert proc.returncode == -sig
        lflag = termios.tcgetattr(slave)[3]
        assert lflag & termios.ECHO and lflag & termios.ICANON
        assert seen.rfind(b"\x1b[?25h") > seen.rfind(b"\x1b[?25l") >= 0, bytes(seen[-300:])
        assert b"Traceback" not in seen
    finally:
        stop(proc)
        os.close(master)
        os.close(slave)


def test_top_off_the_main_thread_runs(serve: Serve) -> None:
    """Its stop-signal handlers are the main thread's to set: off it (top invoked from
    a tool's thread), signal.signal() raised ValueError and top showed nothing."""
    from click.testing import CliRunner

    from sharedpool.cli import cli

    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(CliRunner().invoke(
        cli, ["top", "--socket", serve.socket, "--interval", "0.1", "--iterations", "2"])))
    thread.start()
    thread.join(30)
    assert got and got[0].exit_code == 0, got and got[0].exception
    assert got[0].output.count("sharedpool top") == 2
    # Its frames stand for the client's warnings only while it runs: the NullHandler
    # it set stayed, and the tool's own sharedpool warnings went unsaid from then on.
    assert not any(isinstance(h, logging.NullHandler) for h in logging.getLogger("sharedpool").handlers)


#: A shell's background job (`sharedpool top &`): the terminal on stdin becomes
#: this session's controlling terminal, its foreground group this one; argv[1:]
#: runs in a process group of its own, not the foreground one.
_IN_THE_BACKGROUND = """
import fcntl, os, subprocess, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
sys.exit(subprocess.Popen([sys.executable, *sys.argv[1:]], process_group=0).wait())
"""


def test_top_in_the_background_of_its_terminal_runs_not_stopped(serve: Serve) -> None:
    # Before: setting cbreak mode from a background process group raised SIGTTOU,
    # and top stayed stopped for ever (`timeout 5 sharedpool top` in a script).
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    job = subprocess.Popen(
        [sys.executable, "-c", _IN_THE_BACKGROUND, "-m", "sharedpool", "top", "--socket", serve.socket,
         "--interval", "0.1", "--iterations", "5"],
        stdin=slave, stdout=slave, stderr=slave, env={**ENV, "TERM": "xterm-256color"})
    seen = bytearray()
    top: psutil.Process | None = None

    def screen() -> str:
        if select.select([master], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):  # EIO: the terminal was closed
                seen.extend(os.read(master, 65536))
        return ANSI.sub("", seen.decode("utf-8", "replace"))

    try:
        wait_for(lambda: job.poll() is not None or bool(psutil.Process(job.pid).children()), 15, "top")
        with contextlib.suppress(psutil.Error, IndexError):  # gone already: it did not stop
            top = psutil.Process(job.pid).children()[0]
            assert os.getpgid(top.pid) != os.tcgetpgrp(master) == job.pid  # in the background
        deadline = time.monotonic() + 30
        while job.poll() is None and time.monotonic() < deadline:
            screen()
            with contextlib.suppress(psutil.NoSuchProcess):
                assert top is None or top.status() != psutil.STATUS_STOPPED, screen()[-2000:]
        screen()
        assert job.returncode == 0, screen()[-2000:]
        assert screen().count("sharedpool top") >= 5 and "Traceback" not in screen()
        lflag = termios.tcgetattr(slave)[3]  # the foreground's terminal modes, left alone
        assert lflag & termios.ECHO and lflag & termios.ICANON
    finally:
        if top is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                top.kill()
        stop(job)
        os.close(master)
        os.close(slave)


def test_top_without_a_terminal_runs_n_iterations(serve: Serve) -> None:
    out = sp("top", "--socket", serve.socket, "--interval", "0.1", "--iterations", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("sharedpool top") == 3
    assert any(r and r[0] == "demo" for r in table_rows(out.stdout))


def test_default_socket_falls_back_to_the_tmp_one_a_service_would_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A coordinator started without $XDG_RUNTIME_DIR (systemd, cron) listens on the
    # /tmp default; an operator's shell has XDG_RUNTIME_DIR set and looked elsewhere.
    from sharedpool import cli

    runtime, service = tmp_path / "run", tmp_path / "tmp" / "sharedpool.sock"
    runtime.mkdir()
    service.parent.mkdir()
    monkeypatch.delenv("SHAREDPOOL_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(cli, "tmp_socket_path", lambda: str(service))
    mine = str(runtime / "sharedpool" / "sharedpool.sock")
    assert cli._default_path() == mine  # neither exists: the usual default, named in errors
    service.touch()
    service.parent.chmod(0o777)  # anyone could have put a socket there: not trusted
    assert cli._default_path() == mine
    service.parent.chmod(0o700)
    assert cli._default_path() == str(service)
    (runtime / "sharedpool").mkdir()
    Path(mine).touch()
    assert cli._default_path() == mine  # ours exists: never second-guessed
    monkeypatch.setenv("SHAREDPOOL_SOCKET", str(tmp_path / "given.sock"))
    assert cli._default_path() == str(tmp_path / "given.sock")


def test_no_coordinator_at_the_default_path_names_those_listening_beside_it(
        tmp_path: Path, start_coordinator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A celery or gunicorn master's own coordinator is at a path of its making
    (celery-<pid>-<hex>.sock), logged at info only: celery's default log level
    leaves the line out, and `sharedpool status` said only that the default
    path had nothing (a trial user could not find it)."""
    from click.testing import CliRunner

    from sharedpool import cli as cli_module
    from sharedpool.cli import cli

    runtime = tmp_path / "r"  # short: a socket path has 107 bytes at most
    folder = runtime / "sharedpool"
    folder.mkdir(parents=True, mode=0o700)
    private = folder / "celery-9-ab.sock"
    start_coordinator({"pg": 2}, str(private))
    (folder / "dead-1-000000.sock").write_text("")  # not a socket: not named
    monkeypatch.delenv("SHAREDPOOL_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(cli_module, "tmp_socket_path", lambda: str(tmp_path / "none" / "sharedpool.sock"))
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 1, out.output
    assert f"no coordinator at {folder / 'sharedpool.sock'}" in out.output, out.output
    assert f"or give --socket: {private} accepts connections" in out.output, out.output
    assert "dead-1" not in out.output
    given = CliRunner().invoke(cli, ["status", "--socket", str(folder / "sharedpool.sock")])
    assert given.exit_code == 1 and str(private) not in given.output, given.output  # one given: only it


@pytest.mark.parametrize(("args", "name"), [
    (["demo", "--seconds", "nan"], "--seconds"),  # (inf would run for ever where it is taken)
    (["top", "--interval", "nan"], "--interval"),
    (["top", "--interval", "inf"], "--interval"),
])
def test_non_finite_seconds_are_refused(args: list[str], name: str) -> None:
    out = sp(*args)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and name in out.stderr and "finite" in out.stderr, out.stderr


@pytest.mark.parametrize(("args", "name"), [
    (["top", "--interval", "1e308"], "--interval"),  # an OverflowError traceback from time.sleep
    (["demo", "--pool-size", str(2**64), "--seconds", "0.1"], "--pool-size"),  # a traceback per worker
    (["demo", "--workers", str(10**23), "--seconds", "0.1"], "--workers"),  # OverflowError, deep inside
])
def test_numbers_too_large_to_use_are_refused(args: list[str], name: str) -> None:
    out = sp(*args)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and name in out.stderr and "range" in out.stderr, out.stderr


def test_a_reply_too_large_for_clients_is_one_error_not_a_reconnect_loop(
        start_coordinator: Any, sock_path: str) -> None:
    # max_frame raised to 4 MiB: the coordinator sent a 1.2 MB reply that every
    # client reads as a bad frame (they take 1 MiB at most), and the CLI
    # reconnected ~40 times a second for 5 s before failing with "unreachable".
    start_coordinator({"r": 400}, max_frame=4 << 20)
    holder = Client(sock_path)
    try:
        for _ in range(300):
            holder.acquire("r", 5, site="x" * 4000)  # ~1.2 MB of call sites in a leases listing
        t0 = time.monotonic()
        out = sp("leases", "--socket", sock_path, timeout=30)
        assert out.returncode == 1 and time.monotonic() - t0 < 10, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "reply_too_large" in lines[0], out.stderr[-2000:]
        sessions = Client(sock_path)
        try:
            assert len(sessions.inspect("sessions")["sessions"]) == 2  # the holder and us: no pile-up
        finally:
            sessions.close()
    finally:
        holder.close()


def test_table_cells_are_data_not_markup() -> None:
    # A process title "gunicorn: worker [myapp]" lost its "[myapp]"; an argument
    # "[/health]" made `sharedpool leases` fail with a rich MarkupError.
    from rich.console import Console

    from sharedpool.tables import Column, Sheet

    console = Console(record=True, width=200)
    sheet = Sheet("leases", (Column("process", "text"), Column("site", "long")),
                  [["gunicorn: worker [myapp]", "w = pools[i].acquire()"],
                   ["celery [/health]", "[bold]x[/bold]"]])
    console.print(*sheet.render(200, ""))
    text = console.export_text()
    for shown in ("gunicorn: worker [myapp]", "pools[i]", "celery [/health]", "[bold]x[/bold]"):
        assert shown in text, text


def test_an_empty_socket_setting_is_an_error_not_the_default_path(tmp_path: Path) -> None:
    # Before: $SHAREDPOOL_SOCKET="" and --socket '' quietly meant the default
    # path (another coordinator, perhaps), while pools refuse an empty variable.
    out = subprocess.run([sys.executable, "-m", "sharedpool", "status"], capture_output=True, text=True,
                         env={**ENV, "SHAREDPOOL_SOCKET": ""}, timeout=30)
    assert out.returncode == 2 and "SHAREDPOOL_SOCKET" in out.stderr and "empty" in out.stderr, out
    out = sp("status", "--socket", "")
    assert out.returncode == 2 and "--socket" in out.stderr, out


def test_output_that_cannot_be_written_is_one_line(start_coordinator: Any, sock_path: str) -> None:
    # Before: an OSError traceback (No space left on device).
    start_coordinator({"r": 1})
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "sharedpool", "status", "--json", "--socket", sock_path],
                             stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "cannot write" in lines[0], out.stderr


@pytest.mark.parametrize("columns", ["abc", "0", "-5", "\u00b2"])
def test_a_columns_variable_that_is_no_width_is_ignored(start_coordinator: Any, sock_path: str,
                                                         columns: str) -> None:
    # Before: "abc" was a ValueError traceback, "0" printed nothing at all (exit 0);
    # "²" (a digit to str.isdigit(), not to int()) a traceback until later.
    start_coordinator({"r": 1})
    out = subprocess.run([sys.executable, "-m", "sharedpool", "status", "--socket", sock_path],
                         capture_output=True, text=True, env={**ENV, "COLUMNS": columns}, timeout=30)
    assert out.returncode == 0 and not out.stderr, out
    assert [row[0] for row in table_rows(out.stdout)[1:]] == ["r"], out.stdout


def test_sizes_that_are_no_numbers_are_ignored_on_a_terminal_too(start_coordinator: Any,
                                                                 sock_path: str) -> None:
    # On a terminal rich reads COLUMNS and LINES itself: "²" was a traceback from inside it.
    start_coordinator({"r": 1})
    main, side = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "sharedpool", "status", "--socket", sock_path],
                              stdin=side, stdout=side, stderr=subprocess.PIPE, text=True, timeout=30,
                              env={**ENV, "COLUMNS": "\u00b2", "LINES": "\u00b3"})
        os.set_blocking(main, False)
        shown = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(main, 65536):
                shown += chunk
    finally:
        os.close(main)
        os.close(side)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert b"r" in shown and b"Traceback" not in shown, shown


def test_a_socket_path_through_a_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    # Before: "cannot serve: [Errno 17] File exists: '.../plain'".
    (tmp_path / "plain").write_text("")
    for path in (tmp_path / "plain" / "sp.sock", tmp_path / "plain" / "sub" / "sp.sock"):
        out = sp("serve", "--socket", str(path), "--resource", "demo=1")
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert "Not a directory: " in out.stderr and str(path.parent) in out.stderr


def test_a_reload_whose_welcome_would_not_fit_the_running_frame_size_is_refused(tmp_path: Path) -> None:
    """max_frame takes a restart: a reload that adds resources must fit the one in
    force, not the file's new one. Before, it was applied, and from then on every
    new session was refused ("could not send welcome")."""
    config, server = serve_config(tmp_path, "[coordinator]\nmax_frame = 1024\n[resources]\ndemo = 1\n")
    try:
        many = "".join(f"resource_number_{i} = {{ max_size = 5, acquire_timeout = 3.5 }}\n"
                       for i in range(40))
        config.write_text(f"[coordinator]\nmax_frame = 1048576\n[resources]\ndemo = 1\n{many}")
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 1 and "max_frame" in out.stderr and "restart" in out.stderr, out
        assert [r["name"] for r in sp_json("status", "--socket", server.socket)["resources"]] == ["demo"]
    finally:
        stop(server.proc)


def test_a_reload_with_a_monitor_dsn_the_fence_cannot_use_is_refused(tmp_path: Path) -> None:
    # Taken before, and found out only at the next dead worker: its slots then
    # stayed fenced for all of fence_timeout, the warning naming no field.
    config, server = serve_config(tmp_path, "[resources]\ndemo = 1\n")
    try:
        config.write_text("[resources]\ndemo = { max_size = 2, monitor_dsn = \"host='x password=s3cret\" }\n")
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 1 and "resources.demo.monitor_dsn" in out.stderr, out
        assert "s3cret" not in out.stderr
        assert [r["max_size"] for r in sp_json("status", "--socket", server.socket)["resources"]] == [1]
    finally:
        stop(server.proc)


def test_a_reload_quoting_a_misplaced_dsn_hides_its_password(tmp_path: Path) -> None:
    # The DSN written where the resource's table goes: the reply and the
    # coordinator's log (ERROR, "reload failed") quoted it, password and all.
    config, server = serve_config(tmp_path, "[resources]\ndemo = 1\n")
    try:
        config.write_text('[resources]\ndemo = "postgresql://u:hunter2@127.0.0.1:5432/test"\n')
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 1 and "resources.demo: must be a max_size integer" in out.stderr, out
        assert "'postgresql://u:***@127.0.0.1:5432/test'" in out.stderr and "hunter2" not in out.stderr, out
        config.write_text('[resources]\ndemo = { max_size = 2, monitor_dsn = ["host=h password=hunter3"] }\n')
        out = sp("reload", "--socket", server.socket)
        assert out.returncode == 1, out
        assert "monitor_dsn: must be a non-empty string or None, got a list" in out.stderr, out
        wait_for(lambda: server.log().count("reload failed") >= 2, what="both failed reloads logged")
        assert "hunter" not in server.log() and "hunter" not in out.stderr, server.log()
    finally:
        stop(server.proc)


@pytest.mark.parametrize("flag", ["demo=monitor_dsn=postgresql://u:hunter2@h/d",
                                  "demo=2,monitor_dsn=postgresql://u:hunter2@h/d,max_size=3",
                                  "demo=2,monitor_dsn=host=h password=hunter,2 dbname=d"])
def test_serve_refusing_a_resource_flag_hides_its_dsns_password(tmp_path: Path, flag: str) -> None:
    out = sp("serve", "--socket", str(tmp_path / "sp.sock"), "--resource", flag)
    assert out.returncode == 2 and "--resource demo" in out.stderr, out
    assert "hunter" not in out.stderr and "2 dbname" not in out.stderr, out.stderr


def test_a_socket_path_too_long_is_a_bad_flag_naming_where_it_came_from(tmp_path: Path) -> None:
    # Before: exit 1, "cannot use the coordinator at ...: AF_UNIX path too long", while
    # serve says exit 2 and names the flag for the same path.
    long = "/tmp/" + "x" * 120
    out = sp("status", "--socket", long)
    assert out.returncode == 2 and "--socket" in out.stderr and "too long" in out.stderr, out
    out = subprocess.run([sys.executable, "-m", "sharedpool", "leases"], capture_output=True, text=True,
                         env={**ENV, "SHAREDPOOL_SOCKET": long}, timeout=30)
    assert out.returncode == 2 and "SHAREDPOOL_SOCKET" in out.stderr and "too long" in out.stderr, out


def test_a_socket_where_something_else_listens_says_it_is_no_coordinator(tmp_path: Path) -> None:
    # Before: "frame of 1157627904 bytes exceeds the limit of 1048576" for
    # --socket naming PostgreSQL's socket (its error reply read as a frame header).
    path = str(tmp_path / "other.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)

    def answer_like_postgres() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                conn, _ = listener.accept()
                with conn, contextlib.suppress(OSError):  # the CLI's probe connects and hangs up
                    if conn.recv(1024):
                        conn.sendall(b"E\x00\x00\x00\x6bSFATAL\x00C08P01\x00Minvalid length\x00\x00")

    threading.Thread(target=answer_like_postgres, daemon=True).start()
    try:
        out = sp("status", "--socket", path)
    finally:
        listener.close()
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"at {path}: what answers there is no sharedpool coordinator" in out.stderr, out.stderr


def test_durations_take_the_unit_of_the_figure_as_printed() -> None:
    # Before: 0.9996 s read "1000ms", 59.96 s "60.0s" (a longest wait in `top`,
    # a lease's age), and 3599.6 s "59m59s" beside 3600 s "1h00m".
    from sharedpool.cli import duration

    cases = {0.0004: "0ms", 0.9994: "999ms", 0.9996: "1.0s", 12.34: "12.3s", 59.94: "59.9s",
             59.96: "1m00s", 245.2: "4m05s", 3599.4: "59m59s", 3599.6: "1h00m", 7800: "2h10m"}
    assert {s: duration(s) for s in cases} == cases
    assert duration(None) == "-"
