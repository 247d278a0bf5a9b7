"""The coordinator: binds the socket safely and runs the server, in the
foreground (``sharedpool serve``) or as a child program (:meth:`Coordinator.start`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .background import BACKOFF_MAX
from .config import (
    CoordinatorConfig,
    Resource,
    check_seconds,
    config_from_parts,
    explain_denied,
    reread,
    user_name,
)
from .errors import ConfigError, CoordinatorRunning, SharedPoolError
from .fence import MonitorConnections
from .listener import listener_for
from .marker import (
    MarkerKeeper,
    forget_backends,
    forget_reused,
    from_another_boot,
    handed_on,
    marker_path,
    read_marker,
    time_left_now,
    write_marker,
)
from .startlock import start_lock

if TYPE_CHECKING:
    from .program import EmbeddedCoordinator

log = logging.getLogger("sharedpool.coordinator")


#: Each stops a coordinator the same way: sessions closed, what processes still
#: hold handed on in the restart marker, the socket removed; exit code 0. SIGQUIT
#: too, gunicorn's "quick" and PgBouncer's "immediate" shutdown: ours is already
#: immediate (processes keep their connections, nothing is waited for), and left
#: to its default action it killed the coordinator with its socket left behind.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: What a coordinator takes over from the default actions: the stops and SIGHUP (a reload).
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


class CoordinatorFailed(SharedPoolError, RuntimeError):
    """The coordinator stopped on its own: it could not go on safely (out of memory)."""


#: Connections queued for accept(): a gunicorn or celery fleet starting, or
#: reconnecting after a restart, connects all at once. The event loop listened
#: again with its default of 100: past that, a worker's connect failed at once
#: (EAGAIN on a Unix socket, no wait as with TCP).
LISTEN_BACKLOG = 512

#: What asyncio's own accept loop (no uvloop) reports when accept() fails for
#: want of descriptors or memory.
_ACCEPT_FAILED = "socket.accept() out of system resource"


def _on_loop_error(server: Any, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler. Out of memory in a callback (a
    session's end, a timer, a fence) may have left the ledger half-changed:
    the coordinator stops, rather than serve on half-alive. A failed accept()
    is the server's to say (rate-limited). Anything else is logged as asyncio does."""
    exc = context.get("exception")
    if isinstance(exc, MemoryError):
        server.fail_hard(f"out of memory ({context.get('message') or 'in a callback'})")
    elif isinstance(exc, OSError) and context.get("message") == _ACCEPT_FAILED:
        server.accept_failed(exc)
        return
    with contextlib.suppress(MemoryError):
        loop.default_exception_handler(context)


def _private_dir(path: str, gid: int | None = None, group: str = "group") -> None:
    """Make sure the socket's directory exists and only its owner can write it (I6).

    With a group (``gid``), a directory made here is 0750 and that group's:
    its members must be able to reach the 0660 socket in it, and still may not
    write there (replace the socket, say)."""
    directory = os.path.dirname(os.path.abspath(path))
    created = _make_missing(directory)
    # Another user who can swap a component of the path (its own symlink in a
    # sticky /tmp, a directory it owns or can write above ours) can move the
    # socket out from under us later: check the path as spelled and as resolved.
    _check_chain(directory)
    _check_chain(os.path.realpath(directory))
    st = os.stat(directory)
    if st.st_uid != os.getuid():
        # Said by name, both: "uid 0, not to us" left the operator to look up who "us" was.
        raise ConfigError("socket", f"directory {directory} belongs to {user_name(st.st_uid)}, not to "
                          f"this coordinator's user {user_name(os.getuid())} (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): the socket's directory must be its own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            "socket",
            f"directory {directory} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            "put the socket in a directory only its owner can write",
        )
    if gid is None:
        return
    if created:
        try:
            _give_to_group(directory, gid, group)
        except ConfigError:
            os.rmdir(directory)  # made here a moment ago: not left behind
            raise
        os.chmod(directory, 0o750)  # explicit: mkdir's mode is cut by the umask
    elif not (st.st_mode & stat.S_IXOTH or (st.st_gid == gid and st.st_mode & stat.S_IXGRP)):
        log.warning("socket directory %s (mode %o, gid %d) cannot be entered by group %d: "
                    "its members will not reach the socket", directory,
                    stat.S_IMODE(st.st_mode), st.st_gid, gid)


def _make_missing(directory: str) -> bool:
    """Create what does not exist of ``directory`` (True if it did not), once the
    part that exists has passed :func:`_check_chain`: made before the checks, a
    root coordinator followed another user's symlink and left directories
    wherever it pointed, then refused. Directories above it are 0755, never
    writable by others whatever the umask (makedirs made them 0777 & ~umask)."""
    missing = []
    existing = directory
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not missing:
        if not os.path.isdir(directory):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
        return False
    _check_chain(existing)
    _check_chain(os.path.realpath(existing))
    _check_parent(existing)  # where the first mkdir goes
    for part in reversed(missing):
        try:
            os.mkdir(part, 0o700 if part == directory else 0o755)
            if part != directory:  # explicit: under umask 027 a group's members could not reach its socket
                os.chmod(part, 0o755)
        except FileExistsError:  # made meanwhile: by a racing starter, or by another user
            if not os.path.isdir(part):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), part) from None
        if part != directory:  # checked again before the next mkdir goes into it
            _check_chain(part)
            _check_chain(os.path.realpath(part))
            _check_parent(part)
    return True


def _check_chain(directory: str) -> None:
    """Every entry on the way to ``directory`` is ours or root's, or sits in a
    directory that nobody else can write (sticky: only the entry's owner may
    rename it)."""
    trusted = (0, os.getuid())
    parent = "/"
    for part in [p for p in directory.split("/") if p]:
        entry = os.path.join(parent, part)
        st_entry = os.lstat(entry)
        open_parent = _check_parent(parent)
        if stat.S_ISLNK(st_entry.st_mode) and st_entry.st_uid not in trusted:
            raise ConfigError("socket", f"{entry} is a symlink of {user_name(st_entry.st_uid)}, not ours")
        if open_parent and st_entry.st_uid not in trusted:
            raise ConfigError("socket", f"{entry} belongs to {user_name(st_entry.st_uid)} in a shared "
                              f"directory {parent}")
        parent = entry


def _check_parent(parent: str) -> int:
    """``parent`` is ours or root's, and sticky if others may write it: no one
    else can rename what is in it. Returns its group/other write bits."""
    st = os.stat(parent)
    open_parent = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if st.st_uid not in (0, os.getuid()) or (open_parent and not st.st_mode & stat.S_ISVTX):
        raise ConfigError("socket", f"{parent} can be changed by others; "
                          f"put the socket where only its owner and root can change the path")
    return open_parent


def _group_field(config: CoordinatorConfig) -> str:
    """``group`` as the user wrote it: the file's ``coordinator.group`` when it came
    from a TOML file (as the load names its other keys), else ``group`` (a keyword,
    or ``--group``, which the CLI names as its flag)."""
    from_file = config.config_file is not None and "group" not in config.overrides
    return "coordinator.group" if from_file else "group"


def _group_id(config: CoordinatorConfig) -> int | None:
    if config.group is None:
        return None
    try:
        return grp.getgrnam(config.group).gr_gid
    except KeyError:
        pass
    if config.group.isdigit():  # a gid, as chown and setpriv take one
        try:
            return grp.getgrgid(int(config.group)).gr_gid
        except (KeyError, OverflowError):
            raise ConfigError(_group_field(config), f"no group named {config.group!r}, "
                              "nor with that gid") from None
    raise ConfigError(_group_field(config), f"no group named {config.group!r}")


def _clear_stale(path: str) -> bool:
    """Remove a dead coordinator's socket file (True if there was one); never
    steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("socket", f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.warning("removing the socket of a dead coordinator: %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        if exc.errno == errno.EAGAIN:  # its queue of connections is full: alive, not accepting
            raise CoordinatorRunning(f"a coordinator is already serving {path} (not accepting: its "
                                     "queue of new connections is full, is it stopped or stuck?); "
                                     "refusing to start a second one") from None
        raise
    finally:
        probe.close()
    raise CoordinatorRunning(f"a coordinator is already serving {path}; refusing to start a second one")


def restart_marker(config: CoordinatorConfig) -> str:
    """Kept while serving, left by a stop while leases were out: the next start is a restart."""
    return marker_path(config.socket_path)


def _give_to_group(path: str, gid: int, field: str) -> None:
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        try:
            name = repr(grp.getgrgid(gid).gr_name)
        except KeyError:
            name = "that group"
        raise ConfigError(field, f"cannot give {path} to group {name} (gid {gid}): only root or a "
                          f"member of it can, and uid {os.getuid()} is not one") from None


def unreachable_peers(config: CoordinatorConfig) -> str | None:
    """Why peers the configuration admits cannot reach its socket, or None:
    without ``group`` it is 0600, ours, so another uid (root aside) is refused
    "Permission denied" at connect, before its credentials are even read."""
    if config.group is not None:
        return None
    others = [uid for uid in config.allowed_uids if uid not in (os.getuid(), 0)]
    if not others and not config.allowed_gids:
        return None
    admitted = " and ".join(f"{name} {values}" for name, values in
                            (("allowed_uids", others), ("allowed_gids", list(config.allowed_gids))) if values)
    return (f"{admitted} admit peers that cannot reach {config.socket_path}: with no group "
            f"the socket is 0600, uid {os.getuid()}'s; set group to a group of theirs")


def bind_socket(config: CoordinatorConfig) -> tuple[socket.socket, bool, dict[str, list[Any]]]:
    """A listening Unix socket, 0600 (0660 with a group), in a private directory,
    whether this start is a restart (processes may still hold leases), and what
    the previous coordinator handed on when it stopped (see :func:`~sharedpool.marker.read_marker`).
    A "Permission denied" on the way says which directory (or socket) denied it,
    its mode and its owner."""
    try:
        return _bind_socket(config)
    except PermissionError as exc:
        raise explain_denied(exc) from None


def _bind_socket(config: CoordinatorConfig) -> tuple[socket.socket, bool, dict[str, list[Any]]]:
    path = config.socket_path
    gid = _group_id(config)
    if os.path.isdir(path) and not os.path.islink(path):
        # Said before the directory checks: `--socket /tmp/x`, a directory, was told
        # that /tmp is writable by others, a reason that hid the mistake.
        raise ConfigError("socket", f"{path} is a directory; give the socket's own path, "
                          f"e.g. {os.path.join(path, 'sharedpool.sock')}")
    _private_dir(path, gid, _group_field(config))
    # Probe, unlink and bind under one lock: two starters that both found a dead
    # coordinator's socket must not both bind (the second unlinking the first's).
    with start_lock(path):
        restarted = _clear_stale(path)
        marker = restart_marker(config)
        handed: dict[str, list[Any]] = {}
        if os.path.exists(marker):
            restarted = True
            # Left in place: our keeper replaces it (atomically) once the
            # restored state is in our ledger. Removed here, a SIGKILL (or a
            # SIGTERM before the handlers are in) during the start would hand
            # nothing on: neither the fences nor even that this is a restart.
            handed = read_marker(marker)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window in which the socket is more open than 0600
        try:
            sock.bind(path)
        except OSError as exc:  # bind's own error names no path ("[Errno 13] Permission denied")
            sock.close()
            if exc.errno is None or exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, path) from None
        finally:
            os.umask(old)
        try:
            if gid is not None:
                _give_to_group(path, gid, _group_field(config))
                os.chmod(path, 0o660)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            # Bound but never served: left there, it would pass for a dead
            # coordinator's socket and make the next start hold its grants.
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if restarted:  # this start took the evidence of a restart away: put it back
                write_marker(marker, handed)
            raise
    sock.setblocking(False)
    return sock, restarted, handed


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _serve(config: CoordinatorConfig, sock: socket.socket, restarted: bool,
                 ready: Any = None, handed: dict[str, list[Any]] | None = None,
                 early: list[int] | None = None) -> None:
    from .server import Server, SessionProtocol

    loop = asyncio.get_running_loop()
    own = _file_id(config.socket_path)  # just bound: the file we may remove at the end
    server = Server(config, hold=config.restart_grace if restarted else 0.0)
    if restarted and config.restart_grace:
        log.warning("coordinator restarted: granting nothing for %.1fs while processes "
                    "re-register the leases they hold", config.restart_grace)
    if restarted and config.restart_grace < BACKOFF_MAX:
        log.warning("restart_grace=%gs is shorter than the clients' longest reconnect backoff "
                    "(%gs): a process still holding connections may re-register them only after "
                    "newcomers were granted theirs (over the cap meanwhile)",
                    config.restart_grace, BACKOFF_MAX)
    metrics = None
    served = False
    try:
        if config.metrics_port is not None:  # before accepting anyone: a busy port fails the start
            from .metrics import serve_metrics

            # Inside the try: a start that fails here must not leave its socket
            # behind, or the next start takes it for a dead coordinator's.
            metrics = serve_metrics(server, config.metrics_host, config.metrics_port)
        stop = asyncio.Event()
        server.on_fatal.append(stop.set)
        loop.set_exception_handler(functools.partial(_on_loop_error, server))
        handed = handed or {}
        if from_another_boot(handed):
            log.info("the restart marker was written before this host rebooted: its leases "
                     "count through the hold, without their backends' pids (maybe others' now)")
            handed = forget_backends(handed)
        elif handed:
            # Before accepting: with no hold (restart_grace=0) a newcomer could
            # otherwise be granted before the fences below count.
            server.monitors = server.monitors or MonitorConnections()
            handed = time_left_now(await forget_reused(handed, config.resources, server.monitors))
        # backlog= too: the loop listens again, with its own default of 100. On
        # asyncio's own loop, one retry a second at the open-file limit, not a
        # multiplying storm.
        aserver = await loop.create_unix_server(lambda: SessionProtocol(server),
                                                sock=listener_for(sock, loop), backlog=LISTEN_BACKLOG)
        server.warm_monitors()
        if handed.get("held"):  # live processes' leases: counted until re-registered
            server.apply(server.ledger.restore_held(handed["held"], loop.time(),
                                                    handed.get("started", []), handed.get("dropped", [])))
        if handed.get("fenced"):  # a dead process's backend may still count on the server
            server.apply(server.ledger.restore_fenced(handed["fenced"], loop.time(),
                                                      handed.get("late", []), handed.get("started", [])))
        # Kept current from here on: a SIGKILL hands on nearly what a clean stop would.
        keeper = MarkerKeeper(restart_marker(config), loop)
        keeper.write(handed_on(server, loop.time()))
        server.on_change.append(keeper.changed)
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(server))
        if early:  # caught by run()'s handlers, in a thread that did not block them
            if any(sig in early for sig in STOP_SIGNALS):
                stop.set()
            elif signal.SIGHUP in early:
                loop.call_soon(_reload, server)  # once serving, as a SIGHUP from now on
        # Blocked by run() since before the bind: one sent meanwhile is handled
        # now, once, by the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        log.info("coordinator pid=%s serving %s: %s", os.getpid(), config.socket_path,
                 ", ".join(f"{n}={r.max_size}" for n, r in config.resources.items()))
        if (shut_out := unreachable_peers(config)) is not None:
            log.warning("%s", shut_out)
        if ready is not None:
            ready()
        served = True
        await stop.wait()
        # Blocked again for the rest of the stop: a second one changes nothing
        # (nor does a reload now) and waits, pending, for run() to leave it to the caller.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        log.info("coordinator stopping: %d session(s) open", len(server.sessions))
        # Processes keep their connections: the next coordinator must wait for
        # them. Dead ones' fenced slots are handed over: their backends may
        # still be on the server (a query running on), and count there. So are
        # live ones' leases: one that dies before re-registering them may leave
        # a query running too. Before we stop accepting: a coordinator that
        # takes the path over after that owns the marker.
        # Stopped by fail_hard(): the ledger may have lost a lease it holds no
        # trace of; the restart must hold its grants as after a crash, not
        # start afresh because the ledger looks empty.
        keeper.stop(server, restart=server.fatal is not None)
        server.stopping = True
        aserver.close()
        for session in list(server.sessions.values()):
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0)
    finally:
        await server.cancel_tasks()  # before the monitors they may be using close
        if server.monitors is not None:
            await server.monitors.aclose()
        if metrics is not None:
            metrics.shutdown()
        # Only our own socket file: a coordinator that took over may have bound
        # the path since we stopped accepting (gunicorn USR2).
        if _file_id(config.socket_path) == own:
            if restarted and not served:  # a failed start hands the restart on
                # Before the socket goes: once it has, another start may bind
                # the path and its keeper write the marker (the same .tmp file).
                write_marker(restart_marker(config), handed or {})
            try:
                os.unlink(config.socket_path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a disk gone read-only: the stop itself went fine
                log.warning("cannot remove the socket %s: %s; the next start takes it for a "
                            "dead coordinator's", config.socket_path, exc)
    if server.fatal is not None:
        raise CoordinatorFailed(f"coordinator stopped: {server.fatal}")


def _file_id(path: str) -> tuple[int, int, int] | None:
    # With the change time: a file made right after ours was removed may reuse its inode.
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _reload(server: Any) -> None:
    from .admin import reload_config

    try:
        data, effects = reload_config(server, server.loop.time())
    except (ValueError, OSError) as exc:
        log.error("reload failed, limits unchanged: %s", exc)
        return
    server.apply(effects)
    server.flush()
    server._changed()  # as after any message: the marker shows what a raised cap granted
    log.warning("reloaded %s: resources %s", data["reloaded"], ", ".join(data["resources"]))


def raise_fd_limit() -> int:
    """Make the hard limit of open files ours too; return the limit in force.
    A session is an open file: past the soft limit (1024 under systemd by
    default), libuv accepts each new session and closes it at once, with no
    error and no log line, and those processes cannot lease."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # above the kernel's nr_open: keep ours
            pass
    return soft


def run(config: CoordinatorConfig, ready: Any = None) -> None:
    """Bind and serve in this process until SIGTERM, SIGINT or SIGQUIT; SIGHUP reloads."""
    raise_fd_limit()
    # The socket is connectable from bind_socket() on, before the loop's own
    # handlers exist: a stop signal then must still stop us cleanly (socket
    # removed, marker written), not kill us with the socket left behind (the
    # next start took it for a crash: a restart, granting nothing for a while),
    # and a SIGHUP reload once we serve. The signals are blocked in this thread
    # until the loop's handlers are in, then taken by them alone: caught by a
    # handler here while uvloop (listening from the moment it runs) saw it too,
    # a SIGHUP was a reload twice. The handlers here catch what goes to a thread
    # of the caller's that does not block them. The caller's handlers and mask
    # are back at the end, the signals blocked in between (else a SIGINT there
    # met Python's own handler: a KeyboardInterrupt): what is still pending
    # then is the caller's (`sharedpool serve` keeps them blocked: exit 0).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    early: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    try:
        # Inside the try: signal.signal() refuses a thread other than the main
        # one (ValueError), and that thread must not be left with the signals
        # blocked (a subprocess it starts inherits the mask: SIGTERM-proof).
        for sig in HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: early.append(signum))
        if any(sig in signal.sigpending() for sig in STOP_SIGNALS):
            # Sent while `sharedpool serve` loaded its configuration: nothing bound yet.
            log.info("stop signal before the coordinator served: not started")
            return
        sock, restarted, handed = bind_socket(config)
        loop = _new_loop()
        try:
            loop.run_until_complete(_serve(config, sock, restarted, ready, handed, early))
        finally:
            loop.close()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class Coordinator:
    """Owns the global budget of one host's resources.

    ``Coordinator(path, resources={"pg": 20})`` then :meth:`start` (a child
    process) or :meth:`serve_forever` (this process). As a context manager it
    starts and stops the child.

    The child is a separate program (:mod:`sharedpool.program`), not a fork
    of this process: safe from a process with threads, or one that forks
    workers later. It stops with this process, even one killed by SIGKILL. Its
    log goes to stderr at the level of this process's ``sharedpool`` logger.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        resources: Mapping[str, int | Resource | dict[str, Any]] | None = None,
        *,
        config: CoordinatorConfig | None = None,
        **options: Any,
    ) -> None:
        self.config = config_from_parts(socket_path, resources, config, options)
        self._program: EmbeddedCoordinator | None = None
        self._started = False

    @property
    def socket_path(self) -> str:
        return self.config.socket_path

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return None if self._program is None else self._program.pid

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.pid is not None else "stopped"
        res = ", ".join(f"{n}={r.max_size}" for n, r in self.config.resources.items())
        return f"<Coordinator {self.socket_path} {state} | {res}>"

    def start(self, timeout: float = 10.0) -> Coordinator:
        """Run the coordinator in a child process; return once it accepts sessions.

        Raises :class:`CoordinatorRunning` if a live coordinator has the path,
        :class:`ConfigError` for a bad socket directory, an error that is both a
        :class:`SharedPoolError` and an :class:`OSError` (with the child's
        ``errno``) if binding fails, and :class:`SharedPoolError` if it does not
        start within ``timeout`` seconds.

        Started again after a stop, it serves what its config file says now (a
        reload since changed what it served), as ``serve --config`` restarted
        does; keyword overrides stay, and so does the socket (logged if the file
        names another). A file that no longer loads raises its
        :class:`ConfigError`."""
        from .program import EmbeddedCoordinator

        if self._started and self._program is None:
            self.config = reread(self.config, log, "starts again")

        level = logging.getLevelName(logging.getLogger("sharedpool").getEffectiveLevel())
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            level = "WARNING"  # a custom level number: the program knows only the standard ones
        program = EmbeddedCoordinator(config=self.config, restart=False, log_level=level,
                                      start_timeout=timeout)
        program.start()
        self._program = program
        self._started = True
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """SIGTERM the child and wait (None: for as long as it takes); SIGKILL it
        if it does not go."""
        # Before the child is let go: a refused stop changes nothing.
        timeout = check_seconds("timeout", timeout, optional=True)
        program, self._program = self._program, None
        if program is not None:
            program.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the child at once (for tests of recovery)."""
        program, self._program = self._program, None
        if program is not None:
            program.kill()

    def serve_forever(self) -> None:
        """Serve in this process until SIGTERM, SIGINT or SIGQUIT (SIGHUP reloads)."""
        run(self.config)

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
