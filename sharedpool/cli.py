"""The ``sharedpool`` command: serve | status | leases | sessions | top | admin verbs | demo.

Every error a user can cause ends in one line on stderr and an exit code:
2 for bad flags or configuration (the line names the field), 1 for a
coordinator that is not there, refuses us, or refuses the request.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import select
import signal
import socket
import stat
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click
import psutil
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from .client import Client
from .config import (
    SOCKET_ENV,
    CoordinatorConfig,
    check_socket_path,
    default_socket_path,
    denied_at,
    not_a_socket,
    parse_resource_flags,
    tmp_socket_path,
)
from .errors import AccessDenied, ConfigError, CoordinatorUnavailable, SharedPoolError
from .protocol import CLI_NAME
from .redact import redact_argv
from .tables import Sheet, duration, leases_sheet, resources_sheet, sessions_sheet

#: Lease states as the CLI shows them (the wire says busy / new).
STATE_NAMES = {"busy": "in_use", "new": "connecting"}


class Failed(click.ClickException):
    """A runtime failure: one line, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ctx = click.get_current_context(silent=True)
        self.where = ctx.command_path if ctx is not None else "sharedpool"


class BadConfig(Failed):
    """A bad flag or configuration value: one line naming the field, exit code 2."""

    exit_code = 2


#: At most this many other coordinators are named when the default path has none.
_NEARBY_NAMED = 5


def _unavailable(path: str, why: object, default: bool = False) -> NoReturn:
    """``default``: ``path`` is the default one (no --socket, no $SHAREDPOOL_SOCKET):
    the coordinators listening beside it are named (a gunicorn or celery master's
    own, ``celery-<pid>-<hex>.sock``, logged at info only, which celery's default
    log level leaves out)."""
    nearby = _listening_beside(path) if default else []
    also = f", or give --socket: {', '.join(nearby)} accepts connections" if nearby else ""
    raise Failed(f"no coordinator at {path}: {why}; start one with `sharedpool serve`{also}")


def _listening_beside(path: str) -> list[str]:
    """Other sockets in ``path``'s directory that accept connections (a few)."""
    from .program import coordinator_listening

    folder = os.path.dirname(path)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    found = []
    for name in names:
        other = os.path.join(folder, name)
        try:
            if other == path or not stat.S_ISSOCK(os.lstat(other).st_mode):
                continue
        except OSError:
            continue
        if coordinator_listening(other, timeout=0.5):
            found.append(other)
            if len(found) == _NEARBY_NAMED:
                break
    return found


def _unusable(path: str, exc: Exception) -> NoReturn:
    """Something listens at ``path`` but no session could be had with it."""
    why = str(exc).removeprefix(f"no coordinator at {path}: ")
    raise Failed(f"cannot use the coordinator at {path}: {why}")


def _default_path() -> str:
    """The default socket path; if it does not exist, the one a coordinator started
    without ``$XDG_RUNTIME_DIR`` (a systemd service, cron) would have used, if that exists."""
    path = default_socket_path()
    if os.environ.get(SOCKET_ENV) or os.path.exists(path):
        return path
    fallback = tmp_socket_path()
    try:  # only a directory of our own that nobody else can write to (no squatter's socket)
        info = os.stat(os.path.dirname(fallback))
    except OSError:
        return path
    mine = info.st_uid == os.getuid() and not info.st_mode & 0o022
    return fallback if mine and os.path.exists(fallback) else path


@contextlib.contextmanager
def connect(socket_path: str | None) -> Iterator[Client]:
    """A client session for one command; coordinator errors become one-line failures."""
    if socket_path == "":
        raise BadConfig("--socket: must be the coordinator's socket path, got ''")
    try:
        path = _default_path() if socket_path is None else socket_path
        # As serve checks it: a path no socket can have is a bad flag (exit 2), not "cannot use".
        check_socket_path("--socket" if socket_path is not None else
                          SOCKET_ENV if os.environ.get(SOCKET_ENV) else "socket", path)
    except ConfigError as exc:  # $SHAREDPOOL_SOCKET set but empty, a path too long
        raise BadConfig(str(exc)) from None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:  # fail fast: the client itself would retry until its timeout
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        if (kind := not_a_socket(path)) is not None:  # a --socket naming the config file, its directory
            raise Failed(f"no coordinator at {path}: it is {kind}, not a socket; give the "
                         "coordinator's socket path") from None
        default = socket_path is None and not os.environ.get(SOCKET_ENV)
        _unavailable(path, exc.strerror or exc, default)
    except BlockingIOError:
        pass  # its queue of new connections is full: the client waits for room, within its timeout
    except PermissionError as exc:  # a directory on the way, or the socket, is not ours to use
        if exc.errno != errno.EACCES:
            _unusable(path, exc)
        raise Failed(f"cannot use the coordinator socket {path}: permission denied "
                     f"({denied_at(path)})") from None
    except OSError as exc:  # there is something, but not for us (not a socket...)
        _unusable(path, exc)
    finally:
        probe.close()
    client = Client(path, name=CLI_NAME, connect_timeout=2.0)
    try:
        yield client
    except AccessDenied as exc:
        raise Failed(f"access denied by the coordinator at {path}: {exc}") from None
    except CoordinatorUnavailable as exc:
        _unusable(path, exc)
    except SharedPoolError as exc:
        raise Failed(str(exc)) from None
    finally:
        client.close()


# ------------------------------------------------------------------ data


_ProcInfo = tuple[str | None, list[str] | None]


def _process(pid: int, cache: dict[int, _ProcInfo]) -> _ProcInfo:
    if pid not in cache:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                # Passwords hidden: `rq worker --url redis://:pw@host` is a common one,
                # and this table is pasted into tickets (ps shows it only to this host).
                cache[pid] = (proc.name(), redact_argv(proc.cmdline()))
        except psutil.Error:
            cache[pid] = (None, None)
    return cache[pid]


def get_resources(client: Client, timeout: float = 5.0) -> list[dict[str, Any]]:
    """``status`` rows, as the coordinator reports them: in parts when they do
    not fit in one reply (some 1,900 resources), named by the welcome.
    ``timeout``: of each request."""
    try:
        return list(client.inspect("resources", timeout)["resources"])
    except SharedPoolError as exc:
        if not str(exc).startswith("reply_too_large:") or not client.limits:
            raise
    # In halves at once: all the names in one request is the reply just refused.
    return _in_halves(client, list(client.limits), timeout)


def _in_halves(client: Client, names: list[str], timeout: float) -> list[dict[str, Any]]:
    half = len(names) // 2
    if not half:
        return _resources_in_parts(client, names, timeout)
    return (_resources_in_parts(client, names[:half], timeout)
            + _resources_in_parts(client, names[half:], timeout))


def _resources_in_parts(client: Client, names: list[str], timeout: float) -> list[dict[str, Any]]:
    try:
        return list(client.inspect("resources", timeout, names=names)["resources"])
    except SharedPoolError as exc:
        if not str(exc).startswith("reply_too_large:"):
            raise
        if len(names) <= 64:
            # 64 rows fit many times over: the coordinator ignores ``names``
            # (one older than this client, as during a rolling upgrade), and
            # halving again would never end better.
            raise SharedPoolError(
                f"reply_too_large: the {len(client.limits)} resources of the coordinator at "
                f"{client.socket_path} do not fit in one reply, and it does not list them in "
                "parts (it is older than this client): upgrade the coordinator") from None
    return _in_halves(client, names, timeout)


def get_sessions(client: Client) -> list[dict[str, Any]]:
    """Connected processes, leaving out this command's own session."""
    rows = client.inspect("sessions")["sessions"]
    return [s for s in rows if s["session"] != client.session_id]


def get_leases(client: Client, resource: str | None = None, pid: int | None = None) -> list[dict[str, Any]]:
    """Leases with the holder's process name and command line (looked up locally),
    then the fenced ones (``status`` counts them: their slots are not free yet)."""
    filters: dict[str, Any] = {k: v for k, v in (("resource", resource), ("pid", pid)) if v is not None}
    cache: dict[int, _ProcInfo] = {}
    rows = []
    try:
        fenced = client.inspect("fenced", **filters)["fenced"]
    except SharedPoolError as exc:  # a coordinator older than the view
        if "cannot inspect" not in str(exc):
            raise
        fenced = []
    for lease in client.inspect("leases", **filters)["leases"] + fenced:
        name, cmdline = _process(int(lease["pid"]), cache)
        state = STATE_NAMES.get(lease["state"], lease["state"])
        rows.append({**lease, "state": state, "process_name": name, "cmdline": cmdline})
    return rows


# ------------------------------------------------------------------ output


def make_console() -> Console:
    """A console for stdout; when not a terminal, $COLUMNS wide, else 200 (``show()``
    widens it further for a table that needs it)."""
    # A size that is no positive number ("abc", 0, "²", which str.isdigit() takes
    # for one) is ignored, not a traceback from inside rich, which reads both
    # itself, nor a table cut down to nothing.
    sizes = {name: _positive_int(os.environ.get(name, "")) for name in ("COLUMNS", "LINES")}
    for name, size in sizes.items():
        if size is None:
            os.environ.pop(name, None)
    if sys.stdout.isatty():
        return Console()
    return Console(width=sizes["COLUMNS"] or 200, soft_wrap=False)


def _positive_int(text: str) -> int | None:
    try:
        value = int(text) if text.strip().isascii() else 0
    except ValueError:
        return None
    return value if value > 0 else None


def fit_width(console: Console, wide: bool = False) -> int | None:
    """The width tables are fitted to; None: every column at its full width.

    A terminal's own width (rich reads $COLUMNS first); not a terminal, $COLUMNS
    if set (`watch` sets it to its screen's), else none: one line per row with
    every column, for grep, awk and ``less -S``."""
    if wide:
        return None
    return console.width if console.is_terminal or _positive_int(os.environ.get("COLUMNS", "")) else None


def show(console: Console, width: int | None, *parts: RenderableType) -> None:
    """Print ``parts``; with no width to fit, on lines as long as the widest needs."""
    if width is None:  # not cut or folded to the console's width
        unbounded = console.options.update_width(1 << 20)
        console.width = max(console.width, *(console.measure(p, options=unbounded).maximum for p in parts))
    console.print(*parts)


def _emit(as_json: bool, wide: bool, data: dict[str, Any], head: list[RenderableType],
          *sheets: Sheet) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = make_console()
    width = fit_width(console, wide)
    show(console, width, *head, *(part for sheet in sheets for part in sheet.render(width, WIDE_HINT)))


#: Said under a table some columns of which did not fit.
WIDE_HINT = "--wide shows all"
#: ``top``'s: it has no --wide (a live view wider than its terminal would scroll away).
TOP_HINT = "widen to see"


# ------------------------------------------------------------------ commands


#: Bounds of integer arguments: a value the wire (msgpack, int64) or the OS (pid_t)
#: cannot hold is refused here, at once, not sent to time out.
INT64_MAX = 2**63 - 1
PID_MAX = 2**31 - 1
#: Each demo worker is a process with a few threads: more is a fork bomb, not a demo
#: (and 10**23 was an OverflowError from inside multiprocessing).
DEMO_WORKERS_MAX = 1024
_pid_type = click.IntRange(min=1, max=PID_MAX)


class _Seconds(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which compare false to any bound)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):  # said before the range: "inf is not in the range" hides why
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return super().convert(rv, param, ctx)

#: The default socket path, as the README gives it (serve --config: the file's first).
_SOCKET_DEFAULT = ("$SHAREDPOOL_SOCKET, else $XDG_RUNTIME_DIR/sharedpool/sharedpool.sock, "
                   "else /tmp/sharedpool-<uid>/sharedpool.sock")
_socket_option = click.option(
    "--socket", "socket_path", metavar="PATH", default=None,
    help=f"Coordinator socket (default: {_SOCKET_DEFAULT}).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_wide_option = click.option(
    "--wide", is_flag=True,
    help="Every column, however wide the table (narrower terminals wrap it: pipe into `less -S`).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sharedpool")
def cli() -> None:
    """One global connection cap across many worker processes."""


#: A ConfigError's field -> the serve flag that sets it, and its key in serve's options.
_SERVE_FLAGS = {
    "socket": ("--socket", "socket_path"), "group": ("--group", "group"),
    "allowed_uids": ("--allow-uid", "allowed_uids"), "allowed_gids": ("--allow-gid", "allowed_gids"),
    "admin_uids": ("--admin-uid", "admin_uids"), "metrics_port": ("--metrics-port", "metrics_port"),
    "metrics_host": ("--metrics-host", "metrics_host"),
}


@cli.command()
@click.option("--socket", "socket_path", metavar="PATH", default=None,
              help=f"Socket to serve on (default: with --config, the file's socket; else {_SOCKET_DEFAULT}).")
@click.option("--resource", "resource_flags", multiple=True, metavar="NAME=MAX[,key=value...]",
              help="A resource and its limits (repeatable); with --config, the fields given "
                   "override that resource's table and the rest come from the file.")
@click.option("--config", "config_file", metavar="FILE.toml", help="TOML file; flags override it.")
@click.option("--group", help="Make the socket 0660, owned by this group (a name or a gid).")
@click.option("--allow-uid", multiple=True, type=int, help="Admit peers with this uid (repeatable).")
@click.option("--allow-gid", multiple=True, type=int, help="Admit peers with this gid (repeatable).")
@click.option("--admin-uid", multiple=True, type=int, help="Allow admin verbs to this uid (repeatable).")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", help="Metrics address (default 127.0.0.1).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def serve(socket_path: str | None, resource_flags: tuple[str, ...], config_file: str | None,
          group: str | None, allow_uid: tuple[int, ...], allow_gid: tuple[int, ...],
          admin_uid: tuple[int, ...], metrics_port: int | None, metrics_host: str | None,
          log_level: str) -> None:
    """Run the coordinator in the foreground (SIGTERM, SIGINT or SIGQUIT stops it, exit
    code 0; SIGHUP reloads --config)."""
    from .coordinator import HANDLED_SIGNALS, CoordinatorFailed, CoordinatorRunning, run

    # Blocked from here to the exit, except while run() serves (it takes them
    # then): one sent while the configuration loads is handled once serving (a
    # stop: not started at all) instead of by its default action (SIGHUP's killed
    # serve, SIGINT's was a KeyboardInterrupt), and a second stop signal as serve
    # ends (a supervisor's, a second Ctrl-C) no longer kills it on its way out
    # (exit -15 or a KeyboardInterrupt traceback instead of 0).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {
        "socket_path": socket_path, "group": group, "allowed_uids": list(allow_uid) or None,
        "allowed_gids": list(allow_gid) or None, "admin_uids": list(admin_uid) or None,
        "metrics_port": metrics_port, "metrics_host": metrics_host,
    }
    options = {k: v for k, v in options.items() if v is not None}
    try:
        resources = parse_resource_flags(resource_flags)
        if config_file is not None:
            config = CoordinatorConfig.load(config_file, resources=resources, **options)
        elif not resources:
            raise ConfigError("resources", "none given; pass --resource NAME=MAX (repeatable) "
                              "or --config FILE.toml with a [resources] table")
        else:
            config = CoordinatorConfig(resources=resources, **options)  # type: ignore[arg-type]
        run(config)
    except ConfigError as exc:
        flag = _SERVE_FLAGS.get(exc.field)
        if flag is not None and flag[1] in options:  # a flag's value: named as typed, not as its field
            raise BadConfig(f"{flag[0]}: {exc.detail}") from None
        raise BadConfig(str(exc)) from None
    except (CoordinatorRunning, CoordinatorFailed) as exc:
        raise Failed(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.EACCES and isinstance(exc.filename, str):
            # Its strerror names what denied it (bind_socket): said without "[Errno 13]".
            raise Failed(f"cannot serve: {exc.filename}: {exc.strerror}") from None
        raise Failed(f"cannot serve: {exc}") from None


@cli.command()
@_socket_option
@_json_option
@_wide_option
def status(socket_path: str | None, as_json: bool, wide: bool) -> None:
    """One row per resource: cap, leased, in use, idle, waiting, counters."""
    with connect(socket_path) as client:
        info = client.inspect("server")
        resources = get_resources(client)
    # The server counts this command's own session too; `sessions` and the
    # sharedpool_sessions metric do not.
    info = {**info, "sessions": max(0, int(info["sessions"]) - 1)}
    title = Text(f"coordinator pid {info['pid']} at {info['socket']}, up {duration(info['uptime_s'])}")
    _emit(as_json, wide, {"coordinator": info, "resources": resources}, [title], resources_sheet(resources))


@cli.command()
@_socket_option
@_json_option
@_wide_option
@click.option("--resource", help="Only leases of this resource.")
@click.option("--pid", type=_pid_type, help="Only leases held by this process.")
def leases(socket_path: str | None, as_json: bool, wide: bool, resource: str | None,
           pid: int | None) -> None:
    """One row per lease, with the holding process's name and command line."""
    with connect(socket_path) as client:
        rows = get_leases(client, resource, pid)
    _emit(as_json, wide, {"leases": rows}, [], leases_sheet(rows))


@cli.command()
@_socket_option
@_json_option
@_wide_option
def sessions(socket_path: str | None, as_json: bool, wide: bool) -> None:
    """One row per connected process."""
    with connect(socket_path) as client:
        rows = get_sessions(client)
    _emit(as_json, wide, {"sessions": rows}, [], sessions_sheet(rows))


@cli.command()
@_socket_option
@click.option("--interval", type=_Seconds(min=0.05, max=86400), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--iterations", type=click.IntRange(min=1), help="Stop after this many refreshes.")
def top(socket_path: str | None, interval: float, iterations: int | None) -> None:
    """A live view of resources and sessions; q or Ctrl-C quits."""
    # Its frames say when the coordinator is unreachable; the client's own warnings
    # of it (lost, reconnected) went to stderr too, printed over the live view. Only
    # while it runs: top run from a tool's thread left the tool's own warnings unsaid.
    logger, quiet = logging.getLogger("sharedpool"), logging.NullHandler()
    logger.addHandler(quiet)
    try:
        with (_unwind_on_stop_signals(), connect(socket_path) as client,
              contextlib.suppress(KeyboardInterrupt)):
            run_top(client, interval, iterations)
    finally:
        logger.removeHandler(quiet)


class _StopSignal(BaseException):
    """SIGTERM or SIGHUP in ``top``: unwinds as Ctrl-C does."""


@contextlib.contextmanager
def _unwind_on_stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (`timeout 60 sharedpool top`, a closed tmux pane) unwind
    the view first, then the process dies of the signal as before: by their default
    action it died at once, its terminal left in cbreak mode, no echo, cursor hidden."""
    # One ignored (nohup) stays so. Off the main thread (top invoked from a tool's
    # thread) no handler can be set: signal.signal() raised, and top ran no more.
    caught = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) == signal.SIG_DFL] \
        if threading.current_thread() is threading.main_thread() else []

    def unwind(signum: int, frame: Any) -> None:
        for sig in caught:  # a second one, while it unwinds, kills it at once
            signal.signal(sig, signal.SIG_DFL)
        raise _StopSignal(signum)

    try:
        for sig in caught:
            signal.signal(sig, unwind)
        yield
    except _StopSignal as exc:
        sys.stdout.flush()
        os.kill(os.getpid(), exc.args[0])
    finally:
        for sig in caught:
            signal.signal(sig, signal.SIG_DFL)


def _frame(client: Client, interval: float, width: int | None) -> tuple[list[RenderableType],
                                                                        SharedPoolError | None]:
    """One refresh fitted to ``width``, and the error if the coordinator did not answer it."""
    stamp = time.strftime("%H:%M:%S")
    try:
        res, ses = get_resources(client), get_sessions(client)
    except AccessDenied:
        raise  # not a state to watch: it will not change while we look
    except SharedPoolError as exc:
        return [Text(f"sharedpool top  {stamp}  {client.socket_path}  coordinator unreachable: {exc}")], exc
    # The path last: a long one wraps, not the time and the keys.
    head = Text(f"sharedpool top  {stamp}  every {interval:g}s  (q quits)  {client.socket_path}")
    sheets = (resources_sheet(res), sessions_sheet(ses))
    return [head, *(part for sheet in sheets for part in sheet.render(width, TOP_HINT))], None


#: How often a ``top`` in the background of its terminal looks whether it has come to the foreground.
_BACKGROUND_LOOK = 0.25


def _in_the_foreground(fd: int) -> bool:
    """Whether the terminal ``fd`` is ours to set modes of and read: we are in its
    foreground process group. From the background (`sharedpool top &`, a script's
    `timeout 5 sharedpool top`) setting a mode stops the process (SIGTTOU), and so
    does a read (SIGTTIN), for ever. A terminal that is not our controlling one
    sends neither (ENOTTY)."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError as exc:
        return exc.errno == errno.ENOTTY


def run_top(client: Client, interval: float, iterations: int | None) -> None:
    """Refresh until q, Ctrl-C or ``iterations``; keys are read only from a terminal,
    while in its foreground (in the background it only refreshes).

    With ``iterations`` (a script's use), a last refresh the coordinator did not
    answer raises it, so the exit code says so."""
    console = make_console()
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved: list[Any] | None = None  # the modes cbreak replaced, once set
    count = 0
    failed: SharedPoolError | None = None

    def keyboard() -> int | None:
        """The terminal to read keys from now, in cbreak mode (set the first time);
        None while there is none, or it is not ours to read (in the background)."""
        nonlocal saved
        if fd is None or not _in_the_foreground(fd):
            return None
        if saved is None:  # the modes of when it came to the foreground, not of its start
            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        return fd

    def wait() -> bool:  # False: quit
        deadline = time.monotonic() + interval
        while (left := deadline - time.monotonic()) > 0:
            keys = keyboard()
            if keys is None:  # in the background looked at again shortly: `fg` brings it forward
                time.sleep(left if fd is None else min(left, _BACKGROUND_LOOK))
            elif (select.select([keys], [], [], left)[0] and _in_the_foreground(keys)
                  and os.read(keys, 64).lower().count(b"q")):
                return False
        return True

    def step(put: Callable[[list[RenderableType], int | None], None]) -> bool:
        nonlocal count, failed
        width = fit_width(console)  # at each refresh: a resized terminal is fitted anew
        view, failed = _frame(client, interval, width)
        put(view, width)
        count += 1
        return (iterations is None or count < iterations) and wait()

    try:
        keyboard()
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while step(lambda view, _: live.update(Group(*view), refresh=True)):
                    pass
        else:
            while step(lambda view, width: show(console, width, *view)):
                pass
    finally:
        if fd is not None and saved is not None:
            # Put back even if sent to the background since (Ctrl-Z, bg): SIGTTOU
            # blocked, which would stop it there for good.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
            try:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if iterations is not None and count == iterations and failed is not None:
        raise failed


def _admin_command(name: str, verb: str, doc: str, say: str | Callable[[dict[str, Any]], str],
                   *params: Callable[[Any], Any]) -> None:
    """Define ``sharedpool NAME`` running admin ``verb``; ``say`` formats the reply
    (a format string over its fields, lists joined, or a function of it)."""

    def command(socket_path: str | None, as_json: bool, **args: Any) -> None:
        with connect(socket_path) as client:
            data = client.admin(verb, **args)
        if as_json:
            click.echo(json.dumps(data, indent=2))
        elif callable(say):
            click.echo(say(data))
        else:
            click.echo(say.format_map({k: ", ".join(v) if isinstance(v, list) else v
                                       for k, v in data.items()}))

    command.__doc__ = doc
    for param in reversed((_socket_option, _json_option, *params)):
        command = param(command)
    cli.command(name)(command)


_resource_arg = click.argument("resource")
_admin_command("pause", "pause", "No new grants for RESOURCE; waiters wait.",
               "paused {resource}: no new grants, waiters wait", _resource_arg)
_admin_command("resume", "resume", "Grant leases of RESOURCE again (undoes pause and drain).",
               "resumed {resource}", _resource_arg)
_admin_command("drain", "drain", "No new grants: checkouts in every pool fail at once (PoolClosed) "
               "until resume; idle connections close now, in-use ones at checkin.",
               "draining {resource}: idle connections close now, in-use ones at checkin", _resource_arg)
_admin_command("resize", "resize", "Change RESOURCE's cap live; shrinking reclaims down to it.",
               "resized {resource}: max_size={max_size}", _resource_arg,
               click.option("--max-size", type=click.IntRange(min=1, max=INT64_MAX), required=True,
                            help="The new cap."))
_admin_command("end-session", "end_session", "Close process PID's pools for good and give their "
               "leases back: the process's later checkouts fail (PoolClosed) until it is restarted.",
               "asked pid {pid} to end {sessions} session(s)",
               click.argument("pid", type=_pid_type))


def _said_reload(data: dict[str, Any]) -> str:
    """The reload's reply, with what it did not apply on lines of their own."""
    lines = [f"reloaded {data['reloaded']}: resources {', '.join(data['resources'])}"]
    if data.get("added"):  # absent from a coordinator older than this CLI
        lines.append("added: " + ", ".join(data["added"]))
    for name, diff in sorted((data.get("changed") or {}).items()):
        lines.append(f"changed {name}: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in diff.items()))
    if data.get("settings"):
        lines.append("changed [coordinator]: " + ", ".join(
            f"{k} {old} -> {new}" for k, (old, new) in sorted(data["settings"].items())))
    if data.get("needs_restart"):
        lines.append("not applied, changed [coordinator] settings take a restart: "
                     + ", ".join(data["needs_restart"]))
    if data.get("removed"):
        lines.append("removed (no new leases; those held stay valid until released): "
                     + ", ".join(data["removed"]))
    return "\n".join(lines)


_admin_command("reload", "reload", "Re-read the coordinator's --config file, with its --resource and "
               "other flags laid over it again (as SIGHUP does). Resource limits, access lists and "
               "timeouts change live; the socket, group, max_frame and metrics take a restart.",
               _said_reload)


@cli.command()
@click.option("--workers", type=click.IntRange(min=1, max=DEMO_WORKERS_MAX), default=8, show_default=True)
@click.option("--max-size", type=click.IntRange(min=1, max=INT64_MAX), default=3, show_default=True,
              help="The global cap on leases of resource 'demo'.")
@click.option("--seconds", type=_Seconds(min=0.1), default=5.0, show_default=True)
@click.option("--pool-size", type=click.IntRange(min=1, max=INT64_MAX), default=4, show_default=True,
              help="Each worker's local pool max_size.")
@click.option("--dsn", help="Use PostgreSQL (psycopg) instead of SQLite.")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Socket for the embedded coordinator (default: a fresh private temp dir).")
@click.pass_context
def demo(ctx: click.Context, workers: int, max_size: int, seconds: float, pool_size: int,
         dsn: str | None, socket_path: str | None) -> None:
    """N worker processes share a cap of M leases; prove the cap held."""
    from .demo import run_demo

    try:
        code = run_demo(workers=workers, max_size=max_size, seconds=seconds, pool_size=pool_size,
                        dsn=dsn, socket_path=socket_path, console=make_console())
    except ConfigError as exc:
        raise BadConfig(str(exc)) from None
    except (SharedPoolError, OSError) as exc:
        raise Failed(str(exc)) from None
    ctx.exit(code)


#: click >= 8.2 raises it for a bare ``sharedpool`` (the help, exit 2); 8.1 prints the
#: help and exits 0 by itself. Looked up once: an ``except`` naming a missing attribute
#: turns every error into a traceback.
_NoArgsIsHelp: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors in one line, never a traceback for them."""
    try:
        code = cli.main(args=argv, prog_name="sharedpool", standalone_mode=False)
    except _NoArgsIsHelp as exc:
        exc.show()
        code = exc.exit_code
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        where = getattr(exc, "where", ctx.command_path if ctx is not None else "sharedpool")
        click.echo(f"{where}: error: {exc.format_message()}", err=True)
        code = exc.exit_code
    except click.Abort:
        code = 130
    except BrokenPipeError:  # `sharedpool leases | head`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 1
    except OSError as exc:  # the output could not be written (a full disk, /dev/full)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        click.echo(f"sharedpool: error: cannot write the output: {exc}", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
