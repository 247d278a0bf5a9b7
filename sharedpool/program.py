"""The coordinator as a separate program, owned by this process.

:meth:`sharedpool.Coordinator.start` and the gunicorn / celery integrations
run the coordinator this way, never as a forked copy of the caller: a process
with threads may hold a lock (a log stream's, say) at the moment it forks, and
the copy then waits on it forever; a gunicorn master's forked helpers would be
reaped by its ``waitpid(-1)`` and would inherit its exit handlers. So the
coordinator is ``python -c`` started with ``subprocess``:

* in its own session (terminal signals go to the owner only);
* with a *lifeline*: its stdin is a pipe whose write end only the owner keeps
  (forked children close their copy), so when the owner dies, even by SIGKILL,
  the coordinator sees EOF and stops - it never outlives its owner;
* optionally watched by a thread that restarts it if it dies unexpectedly
  (clients reconnect and re-register their leases, I4), whoever reaped it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .atfork import in_child
from .client import expect_end
from .config import (
    SOCKET_ENV,
    CoordinatorConfig,
    Resource,
    check_option_names,
    check_seconds,
    check_socket_path,
    config_from_parts,
    reread,
    runtime_socket_path,
)
from .coordinator import CoordinatorRunning
from .errors import ConfigError, SharedPoolError
from .marker import marker_path, remove_marker
from .peers import holder_alive
from .readable import cooperative

log = logging.getLogger("sharedpool.program")

#: Held while the program is spawned, and by every fork of this process (at-fork
#: hooks below): a child that another thread forked meanwhile (celery's prefork
#: pool replacing a child, a gunicorn master forking a worker) inherited the
#: spawn's pipes: subprocess's exec-status pipe, on which Popen then waited until
#: that child exited (a coordinator restart held up for the child's lifetime,
#: every checkout failing), and the lifeline's write end (the coordinator would
#: outlive its owner as long as that child). A spawn takes milliseconds.
#: Re-entrant: a signal handler that forks while its thread spawns must not hang.
_SPAWNING = threading.RLock()
#: Lifelines spawned and not yet an instance's: a forked child closes them too.
_UNOWNED_LIFELINES: set[int] = set()
# In the child too the forking thread, which took it, lets it go.
os.register_at_fork(before=_SPAWNING.acquire, after_in_parent=_SPAWNING.release,
                    after_in_child=_SPAWNING.release)

#: Restart back-off bounds (seconds) after an unexpected coordinator death.
RESTART_MIN, RESTART_MAX = 0.2, 30.0

_CHILD_CODE = "from sharedpool.program import _child_main; _child_main()"


class EmbeddedStartError(SharedPoolError, RuntimeError):
    """The embedded coordinator could not be started."""


class CoordinatorStartError(SharedPoolError, OSError):
    """The coordinator program met an OS error starting (bind, socket directory...):
    ``errno`` and ``strerror`` are the child's."""


#: Paths :func:`private_socket_path` made: no coordinator starts on one once its
#: owner is gone, so a restart marker left there would never be read.
_PRIVATE_PATHS: set[str] = set()


def hand_on_socket_path(path: str) -> None:
    """``path`` is given to a successor (a gunicorn USR2 master): no longer
    private, its restart marker stays for the successor's coordinator."""
    _PRIVATE_PATHS.discard(path)


def private_socket_path(prefix: str) -> str:
    """A fresh socket path for one server's coordinator, in the per-user runtime dir."""
    path = runtime_socket_path(f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}.sock")
    _PRIVATE_PATHS.add(path)
    return path


def coordinator_listening(path: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # gevent's and eventlet's connect, given a timeout, meets a full queue by
    # trying again until it runs out (an unconnected Unix socket is always
    # writable): a busy coordinator read as none. Without one it is the plain
    # connect, which never waits on a Unix socket (queued, refused or EAGAIN).
    probe.settimeout(0.0 if cooperative(probe) else timeout)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # its queue of new connections is full: a live listener (not accepting yet)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def check_embedded_options(options: Mapping[str, Any], keywords: tuple[str, ...] = ()) -> None:
    """The integrations' ``**options`` are CoordinatorConfig fields; the path is their
    ``socket=`` (else a TypeError from deep inside), and ``config=`` is not taken.
    ``keywords``: the integration's own, listed as allowed should a name be unknown."""
    for name, instead in (("socket_path", "give the path as socket="),
                          ("config", "give the resources and options themselves")):
        if name in options:
            raise ConfigError(name, f"not an option here: {instead}")
    # Checked even without resources= (nothing started then): a typo such as
    # resorces= was silently dropped, and read later as "got no resources".
    check_option_names(options, ("start_timeout", *keywords))


def check_unused_settings(options: Mapping[str, Any], *, restart: Any, log_level: Any) -> None:
    """An integration given no ``resources=`` starts no coordinator, so its
    settings were never looked at: ``metrics_port="9100"`` or ``restart="no"``
    passed without a word. Checked as they would be with resources, naming them."""
    settings = dict(options)
    start_timeout = settings.pop("start_timeout", 30.0)
    _run_settings(restart, log_level, start_timeout)
    CoordinatorConfig(socket_path="unused.sock", resources={"unused": Resource(1)}, **settings)


def integration_socket_path(given: str | None, prefix: str) -> str:
    """The socket an integration uses: ``given`` (checked by the caller), else
    ``$SHAREDPOOL_SOCKET`` if set (checked, named as the variable: one too long
    was said to be the ``socket`` argument, which nobody gave), else a fresh
    private path. Set but empty is an error naming it, as for a pool, ``serve``
    and the CLI: a blank left by a template that meant a shared coordinator's
    path started a private one instead, a second budget for the same database."""
    if given:
        return given
    env = os.environ.get(SOCKET_ENV)
    if env == "":
        raise ConfigError(SOCKET_ENV, f"is set but empty: set it to the coordinator's socket path, or "
                          f"unset it (given resources=, the {prefix} integration then starts a "
                          "coordinator of its own)")
    if env:
        return check_socket_path(SOCKET_ENV, env)
    return private_socket_path(prefix)


def _run_settings(restart: Any, log_level: Any, start_timeout: Any) -> tuple[bool, str, float]:
    """``restart``, ``log_level`` (as logging names it) and ``start_timeout``, checked."""
    level = logging.getLevelName(str(log_level).upper())
    if not isinstance(level, int):
        raise ConfigError("log_level", f"must be debug, info, warning or error, got {log_level!r}")
    if not isinstance(restart, bool):  # "no" would mean yes
        raise ConfigError("restart", f"must be True or False, got {restart!r}")
    return restart, str(log_level).upper(), check_seconds("start_timeout", start_timeout)


class EmbeddedCoordinator:
    """``sharedpool serve`` as a child program of this (owner) process.

    ``resources`` and ``options`` are :class:`~sharedpool.CoordinatorConfig`'s
    (or a whole ``config=``), checked here, in the caller, so that a bad limit
    fails where it was written. ``restart``: start it again if it dies.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 resources: Mapping[str, Any] | None = None,
                 *, config: CoordinatorConfig | None = None, restart: bool = True,
                 log_level: str = "warning", start_timeout: float = 30.0, **options: Any) -> None:
        self.config = config_from_parts(socket_path, resources, config, options)
        #: The config as made, in code; ``config`` is what it serves, which a
        #: restart reads from its file again (see :func:`~sharedpool.config.reread`).
        self.given = self.config
        self.restart, self.log_level, self.start_timeout = _run_settings(restart, log_level, start_timeout)
        self.restarts = 0
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # write end of the coordinator's stdin
        self._watcher: threading.Thread | None = None
        self._launched = False

    @property
    def socket_path(self) -> str:
        return self.config.socket_path

    @property
    def pid(self) -> int | None:
        """The coordinator's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def __repr__(self) -> str:
        return f"<EmbeddedCoordinator {self.socket_path} pid={self.pid} restarts={self.restarts}>"

    def move(self, socket_path: str) -> None:
        """Serve on another path (before :meth:`start`)."""
        if self._proc is not None:
            raise SharedPoolError("move() a coordinator before starting it")
        # Given here, in code: a re-read of a config file keeps it (see beside_file).
        self.config = self.given = dataclasses.replace(self.config, socket_path=socket_path,
                                                       beside_file=(*self.config.beside_file, "socket_path"))

    def start(self) -> EmbeddedCoordinator:
        """Start the coordinator; return once it accepts sessions. Started again
        after :meth:`stop`, it serves what its config file says now (a reload since
        changed what it served; see :func:`~sharedpool.config.reread`); a file that
        no longer loads raises its :class:`ConfigError`."""
        if os.getpid() != self._owner:
            raise SharedPoolError("an embedded coordinator belongs to the process that made it")
        if self._launched:
            self.config = reread(self.config, log, "starts again")
        self._stopping.clear()
        self._launch()
        self._launched = True
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """SIGTERM the coordinator (it closes its sessions and removes its socket) and
        wait (None: for as long as it takes); SIGKILL it if it does not go. A no-op
        in a forked child."""
        # Before it is signalled: a refused stop changes nothing. None is
        # Popen.wait's "no limit", as it always was here.
        timeout = check_seconds("timeout", timeout, optional=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher = self._watcher
        _end(*self._detach(), timeout)
        _join(watcher, deadline)

    def kill(self) -> None:
        """SIGKILL the coordinator at once and do not restart it; its socket file
        stays behind, as after a crash (for tests of recovery)."""
        proc, lifeline = self._detach()
        try:
            if proc is not None:
                _signal(proc, signal.SIGKILL)
                proc.wait(5)
        finally:
            _close_fd(lifeline)

    # ------------------------------------------------------------------ internals

    def _detach(self) -> tuple[subprocess.Popen[bytes] | None, int | None]:
        """Stop watching and take the process and its lifeline out (None, None in a
        forked child: never ours to signal)."""
        if os.getpid() != self._owner:
            return None, None
        self._stopping.set()
        with self._lock:
            proc, self._proc = self._proc, None
            lifeline, self._lifeline = self._lifeline, None
        _STARTED.discard(self)
        return proc, lifeline

    def _launch(self) -> None:
        proc, lifeline = self._spawn()
        _STARTED.add(self)  # first: an instance with a lifeline is one a forked child forgets
        with self._lock:
            self._proc, self._lifeline = proc, lifeline
        _UNOWNED_LIFELINES.discard(lifeline)
        if self.restart:
            self._watcher = threading.Thread(target=self._watch, args=(proc,), daemon=True,
                                             name="sharedpool-coordinator-watch")
            self._watcher.start()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        """Start the program; return it and the write end of its lifeline (raw fds
        only: a forked child closes its copy without touching any lock)."""
        payload = json.dumps({**dataclasses.asdict(self.config), "log_level": self.log_level,
                              "private": self.config.socket_path in _PRIVATE_PATHS})
        python = _python()
        with _SPAWNING:  # no fork of this process meanwhile: see _SPAWNING
            ready_r, ready_w = os.pipe()  # both close-on-exec; pass_fds hands ready_w over
            life_r, life_w = os.pipe()
            try:
                proc = subprocess.Popen(
                    [python, "-P", "-c", _CHILD_CODE, str(ready_w), "sharedpool-coordinator",
                     self.socket_path],
                    stdin=life_r, pass_fds=(ready_w,), start_new_session=True, env=_child_env(python),
                )
            except BaseException:
                for fd in (ready_r, life_w):
                    os.close(fd)
                raise
            finally:
                os.close(ready_w)
                os.close(life_r)
            _UNOWNED_LIFELINES.add(life_w)  # a child forked from now on closes its copy
        try:
            # A pipe buffer holds it. If the program died at once, the status says so.
            with contextlib.suppress(BrokenPipeError):
                os.write(life_w, payload.encode() + b"\n")
            deadline = time.monotonic() + self.start_timeout
            status = _read_status(ready_r, deadline)
        except BaseException:
            # (KeyboardInterrupt...) It may have bound its socket already: a
            # SIGTERM stops it cleanly (its socket removed) from before its bind
            # on; SIGKILL would leave the socket, and the next start would take
            # it for a crashed coordinator's (a restart, granting nothing for a while).
            _signal(proc, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait(5)
            finally:
                _close_fd(life_w)  # its lifeline ends: it stops even if we were cut short here
            raise
        finally:
            os.close(ready_r)
        timed_out = status is None and time.monotonic() >= deadline
        if status is not None and "ok" in _parse(status):
            log.info("coordinator pid %s serving %s", proc.pid, self.socket_path)
            return proc, life_w
        if status is None:
            _signal(proc, signal.SIGKILL)
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        _close_fd(life_w)
        if status is None:
            raise EmbeddedStartError(
                f"coordinator for {self.socket_path} did not start within {self.start_timeout:g}s"
                if timed_out or code is None else
                f"coordinator for {self.socket_path} exited (code {code}) before it was ready; "
                "its error is on stderr")
        raise _error_from_status(status)

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()  # whoever reaps it (gunicorn's waitpid(-1) too), this returns
        delay = RESTART_MIN
        while not self._stopping.is_set():
            with self._lock:
                if self._proc is not proc:
                    return
            log.error("coordinator pid %s for %s died (code %s); restarting it in %.1fs",
                      proc.pid, self.socket_path, code, delay)
            if self._stopping.wait(delay):
                return
            self._reread_config()
            try:
                new, lifeline = self._spawn()
            except (SharedPoolError, OSError) as exc:
                log.error("restarting the coordinator failed: %s", exc)
                delay = min(delay * 2, RESTART_MAX)
                continue
            old: int | None
            with self._lock:
                if self._stopping.is_set() or self._proc is not proc:
                    stale, old = True, lifeline
                else:
                    stale, old = False, self._lifeline
                    self._proc, self._lifeline = new, lifeline
                    _UNOWNED_LIFELINES.discard(lifeline)
            if stale:  # stop() ran meanwhile: do not leave it behind (its lifeline
                _end(new, lifeline, 10)  # ended after the SIGTERM: a stop, not an owner lost)
                return
            _close_fd(old)
            self.restarts += 1
            proc, delay = new, RESTART_MIN
            code = proc.wait()

    def _reread_config(self) -> None:
        """Before a restart: with a config file, what it says now (see
        :func:`~sharedpool.config.reread`), as ``serve --config`` restarted reads
        it: resources and ``[coordinator]`` settings, but for the socket. Settings
        given as keywords beside ``config_file=`` (``hooks(resources,
        config_file=..., group=...)``) are in no file nor override: a whole new
        config lost them (workers shut out of the socket, a resource
        gone whose leases were out). A resource a reload removed stays removed.
        Unreadable or invalid: the configuration held here, said so."""
        try:
            config = reread(self.config, log, "restarts")
        except Exception as exc:  # noqa: BLE001 - whatever it is, the restart must still happen
            log.error("coordinator for %s restarts with the configuration it started with: %s",
                      self.socket_path, exc)
            return
        self.config = config

    def _running(self) -> bool:
        """Whether this process owns the coordinator and it still runs (it did not
        die on its own; reaped here if it did)."""
        proc = self._proc
        return os.getpid() == self._owner and proc is not None and proc.poll() is None

    def _forget(self) -> None:
        """In a forked child: drop our copy of the lifeline; never touch the process."""
        if os.getpid() == self._owner:
            return
        proc, self._proc = self._proc, None
        lifeline, self._lifeline = self._lifeline, None
        self._watcher = None  # the parent's thread, not running here
        _close_fd(lifeline)
        if proc is not None:
            proc.returncode = 0  # not ours to wait for: no poll/kill from this process
        self._lock = threading.Lock()


def _end(proc: subprocess.Popen[bytes] | None, lifeline: int | None, timeout: float | None) -> None:
    """SIGTERM ``proc``, wait up to ``timeout`` (None: no limit), SIGKILL it if it
    is still there; end its lifeline in any case."""
    try:
        if proc is not None and proc.poll() is None:
            _signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("coordinator pid %s ignored SIGTERM; killing it", proc.pid)
                _signal(proc, signal.SIGKILL)
                proc.wait(5)
    finally:
        _close_fd(lifeline)  # EOF on its stdin: it stops even if the waits failed


def _join(watcher: threading.Thread | None, deadline: float | None) -> None:
    """Wait, up to ``deadline`` (None: no limit), for a watcher that may be
    starting a restart as it is stopped: it stops what it started, but stop()
    and the exit returned first, leaving a coordinator on the socket (the next
    start() refused) or one that outlived its owner, warning. One not started
    yet (a stop signal's handler, or another thread, stopping as start() starts
    it) is not waited for: join() refuses it, and it finds the stop when it runs."""
    if watcher is None or watcher is threading.current_thread() or not watcher.is_alive():
        return
    watcher.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """A Python SIGINT handler (KeyboardInterrupt's, or the program's own) that
    does nothing, meanwhile. Caught around the wait, a KeyboardInterrupt still
    landed elsewhere under a burst of them: out of the exit handler (the owner
    gone before its coordinator, which warned of it, its socket still there), or
    in Popen.wait between its lock's acquire and its try, the lock then held for
    good (every wait ran out its timeout, poll() said running: 5 s, a SIGKILL,
    5 s more and a TimeoutExpired printed). Only from the main thread
    (signal.signal refuses others); SIG_DFL and SIG_IGN raise nothing, kept."""
    previous: Any = None
    with contextlib.suppress(ValueError):  # not the main thread
        if callable(signal.getsignal(signal.SIGINT)):
            previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:  # never signal a pid that may already be reused
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        _UNOWNED_LIFELINES.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


def _python() -> str:
    """The interpreter that runs the program: ``sys.executable``, unless this is
    Python embedded in uWSGI, where that is the uwsgi binary (unless its option
    ``py-executable`` says otherwise), which took ``-P`` for an option of its own
    and exited: then this installation's ``pythonX.Y`` (a venv's, in a venv)."""
    if "uwsgi" not in sys.modules or os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    bindir = os.path.join(sys.exec_prefix, "bin")
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", f"python{sys.version_info[0]}"):
        path = os.path.join(bindir, name)
        if os.access(path, os.X_OK):
            return path
    return sys.executable


def _child_env(python: str = sys.executable) -> dict[str, str]:
    """The master's environment, with this copy of sharedpool importable first.

    Run by another interpreter than this process's (``python`` from
    :func:`_python`: Python embedded in uWSGI), the program is given this
    process's import path too: uWSGI's ``pythonpath`` (or an app's own
    ``sys.path``) is where sharedpool's dependencies may be, and that
    interpreter knew none of it (``No module named 'msgpack'``)."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [here]
    if python != sys.executable:
        # Absolute entries only, in order: "" and "." would be the program's cwd (-P).
        paths += [p for p in sys.path if isinstance(p, str) and os.path.isabs(p)]
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _read_status(fd: int, deadline: float) -> str | None:
    """One status line from the child, or None on EOF or timeout."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # In slices: select() raises OverflowError for a start_timeout of 300 years.
        if not select.select([fd], [], [], min(left, 3600.0))[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _parse(status: str) -> dict[str, Any]:
    try:
        info = json.loads(status)
    except ValueError:
        return {"error": status}
    return info if isinstance(info, dict) else {"error": status}


def _error_from_status(status: str) -> SharedPoolError:
    info = _parse(status)
    kind, message = info.get("type"), str(info.get("error"))
    if kind == "ConfigError":
        return ConfigError(str(info.get("field")), str(info.get("detail")))
    if kind == "CoordinatorRunning":
        return CoordinatorRunning(message)
    if kind == "MetricsUnavailable":
        from .metrics import MetricsUnavailable

        return MetricsUnavailable(message)
    if isinstance(info.get("errno"), int):
        text = message.split("] ", 1)[-1]  # str() of the child's OSError leads with its errno
        return CoordinatorStartError(info["errno"], f"coordinator failed to start: {text}")
    return EmbeddedStartError(f"coordinator failed to start: {message}")


# ---------------------------------------------------------------------- the child program


def _child_main() -> None:
    """Entry point of the coordinator program: config on stdin, then stdin is the lifeline."""
    from .coordinator import HANDLED_SIGNALS, run

    # Blocked before the lifeline thread starts (it inherits the mask): they go to
    # this thread alone, where run() takes them once it serves (caught by run()'s
    # handler in the lifeline thread while the loop saw it too, a SIGHUP was a
    # reload twice); before that, while the configuration is read, they wait
    # instead of killing us; after it, a second SIGTERM is no death by signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    ready_fd = int(sys.argv[1])
    # Raw reads on fd 0 only: a thread blocked in a buffered read would hold the
    # buffer's lock at interpreter exit (a fatal error). In chunks: read byte by
    # byte (and joined byte by byte), the line of 2,000 resources (500 kB) took
    # 5 s and of 3,000 18 s, past start_timeout. The owner writes nothing after
    # the line: what follows it on the lifeline is only its end.
    chunks: list[bytes] = []
    while not chunks or b"\n" not in chunks[-1]:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            sys.exit("sharedpool-coordinator: no configuration on stdin")
        chunks.append(chunk)
    data = json.loads(b"".join(chunks).partition(b"\n")[0])
    private, owner = data.pop("private", False), os.getppid()
    logging.basicConfig(
        level=data.pop("log_level", "WARNING"), stream=sys.stderr,
        format="%(asctime)s [%(process)d] [sharedpool-coordinator] %(levelname)s %(message)s")

    def report(status: dict[str, Any]) -> None:
        nonlocal ready_fd
        if ready_fd >= 0:
            fd, ready_fd = ready_fd, -1
            try:
                os.write(fd, json.dumps(status).encode() + b"\n")
            except BrokenPipeError:
                # The owner is gone (it died while we started): nobody to tell.
                # Its lifeline's SIGTERM stops us, cleanly, like any other stop.
                log.warning("the server process that started this coordinator is not "
                            "reading its status (gone?)")
            finally:
                os.close(fd)

    def lifeline() -> None:
        while os.read(0, 4096):
            pass
        log.warning("the server process that started this coordinator is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=lifeline, daemon=True, name="lifeline").start()
    try:
        config = CoordinatorConfig(**data)
        run(config, ready=lambda: report({"ok": os.getpid()}))
        # Its exit begun (PF_EXITING), the owner may not have handed us to init yet.
        if private and (os.getppid() != owner or not holder_alive(owner, time.time())):
            # Stopped because its owner died (a SIGKILLed celery or gunicorn
            # master): nothing starts on a private path again, and the marker
            # handing on what was still out would stay in the runtime dir for good.
            remove_marker(marker_path(config.socket_path))
            log.info("the owner of %s is gone: its restart marker removed (no coordinator "
                     "starts on this private path again)", config.socket_path)
    except ConfigError as exc:
        report({"type": "ConfigError", "field": exc.field, "detail": exc.detail,
                "error": str(exc)})
        sys.exit(2)
    except (SharedPoolError, OSError) as exc:
        report({"type": type(exc).__name__, "error": str(exc),
                "errno": exc.errno if isinstance(exc, OSError) else None})
        sys.exit(1)


# ---------------------------------------------------------------------- fork and exit

#: Started and not stopped: held here, as threading holds a started thread, so
#: that the exit stops them even when the caller kept no reference
#: (``Coordinator(...).start()``): else they only saw their lifeline end after
#: this process was gone, and stopped, warning, while their socket was still
#: there for whoever started the next one. The ones a forked child forgets too:
#: one never started or stopped holds no process nor lifeline.
_STARTED: set[EmbeddedCoordinator] = set()
#: How long the exit waits for each of its coordinators to stop.
EXIT_WAIT = 5.0


def _forget_in_child() -> None:
    unowned = set(_UNOWNED_LIFELINES)
    started = list(_STARTED)
    _STARTED.clear()  # the parent's to stop
    for inst in started:
        unowned.discard(inst._lifeline)  # closed once, by _forget
        inst._forget()
    for fd in unowned:
        _close_fd(fd)


def _stop_at_exit() -> None:
    # Pools may still be open (their client has no exit hook; its thread, a
    # daemon, runs through the exit handlers): each would see its session end
    # and warn of a lost coordinator at an exit that went well. Only for the
    # ones still running: one that died on its own before is a real loss.
    # A Ctrl-C now (the program ending, or ended by it) does not cut the wait
    # short: the socket would outlive this process, and Python print its
    # KeyboardInterrupt from here. The wait is bounded.
    started = list(_STARTED)
    if not started:  # SIGINT's handler left alone (a uWSGI worker's is uWSGI's own)
        return
    with _interrupts_ignored():
        for inst in started:
            if inst._running():
                expect_end(inst.socket_path)
        # All told to stop first, then waited for within one bound: one stuck
        # coordinator no longer holds the next one's stop back by its wait.
        deadline = time.monotonic() + EXIT_WAIT
        ending = [(inst._watcher, *inst._detach()) for inst in started]
        for _, proc, _ in ending:
            if proc is not None:
                _signal(proc, signal.SIGTERM)
        for watcher, proc, lifeline in ending:
            # One that outlived even its SIGKILL's wait leaves the others to stop.
            with contextlib.suppress(subprocess.TimeoutExpired):
                _end(proc, lifeline, max(0.0, deadline - time.monotonic()))
            _join(watcher, deadline)


in_child(_forget_in_child)
atexit.register(_stop_at_exit)
