"""Servers the integration tests run as real programs (gunicorn, uWSGI, celery,
`sharedpool serve`): a free loopback port, waiting for a condition, a child
that dies with the test process, whether a pid still runs, and a base for a
program started in its own session with its output in one log file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sharedpool.program import coordinator_listening


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             every: float = 0.05) -> Any:
    """``cond()``'s first true value, polled every ``every`` seconds; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """preexec_fn: ``signum`` to this child when the test process dies (no orphaned servers)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class SessionServer:
    """A program under test in its own session (so :meth:`kill_group` reaches
    every process it forked), killed with the test process, its output in
    ``log_path``. Subclasses build the command and say how it is stopped."""

    #: The signal :meth:`stop` sends the main process.
    stop_signal = signal.SIGTERM
    #: Whether :meth:`stop` sends it to the whole process group instead, as a terminal's Ctrl-C does.
    stop_group = False
    #: What the main process gets when the test process dies (a timeout's kill): one that stops it.
    death_signal = signal.SIGTERM
    name = "the server"

    def __init__(self, log_path: Path, argv: list[str], env: dict[str, str],
                 cwd: Path | None = None) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=lambda: die_with_parent(self.death_signal))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """:attr:`stop_signal` to the main process (by pid), or its group
        (:attr:`stop_group`); its exit code."""
        if self.proc.poll() is None:
            (os.killpg if self.stop_group else os.kill)(self.proc.pid, self.stop_signal)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            left = [f"{p.pid} {p.name()} {p.status()}" for p in psutil.Process(self.proc.pid).children(True)]
            raise AssertionError(f"{self.name} did not stop in {timeout} s; its processes left: "
                                 f"{left}\n{self.log()[-4000:]}") from None

    def kill_group(self, timeout: float = 10.0) -> None:
        """Teardown: SIGKILL what is left of the program's process group, and
        wait (at most ``timeout``) until it is gone. Its main process may have
        exited and left children behind (a uWSGI stop that timed out, a master
        killed): they are killed too, by the group its pid still names."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout)
        elif pid_alive(pgid):
            return  # reaped, and its pid reused since: that group is not this server's
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # Linux reuses no pid that is still a group's id: while one of its
                # processes is left, this group is this server's.
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            if not _group_alive(pgid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (zombies, awaiting their reaper, do not)."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class Serve(SessionServer):
    """``sharedpool serve`` as a user runs it, on ``tmp_path/sp.sock`` with
    ``--resource resource`` (none if empty) and ``args``; its log in
    ``tmp_path/serve.log``."""

    name = "sharedpool serve"

    def __init__(self, tmp_path: Path, *args: str, resource: str = "demo=3",
                 env: dict[str, str] | None = None) -> None:
        self.socket = str(tmp_path / "sp.sock")
        extra = ["--resource", resource] if resource else []
        argv = [sys.executable, "-m", "sharedpool", "serve", "--socket", self.socket, *extra, *args]
        super().__init__(tmp_path / "serve.log", argv, dict(os.environ) if env is None else env)
        wait_for(lambda: self.proc.poll() is not None or coordinator_listening(self.socket), 15,
                 "sharedpool serve to listen")
        assert self.proc.poll() is None, self.log()
