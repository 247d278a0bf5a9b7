"""I6: only allowed peers get a session; admin verbs can be restricted further.

A real process running as another user (uid/gid 65534, via setpriv) talks to
the coordinator; the socket is group-accessible so that the kernel lets it
connect and the coordinator's SO_PEERCRED check is what decides."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from sharedpool import ConfigError

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run a peer as another user",
)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    # tmp_path's parents are 0700; this test needs a directory another user can
    # traverse (not write): 0711 under /tmp, removed afterwards.
    path = tempfile.mkdtemp(prefix="sp-access-", dir="/tmp")
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(sock: str, body: str, ids: tuple[str, ...] = (
        f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(f"""
        import sys
        from sharedpool import Client, AccessDenied, SharedPoolError
        c = Client({sock!r})
        try:
{textwrap.indent(textwrap.dedent(body), " " * 12)}
        except AccessDenied as exc:
            print("DENIED", exc)
        finally:
            c.close()
    """)
    return subprocess.run(
        ["setpriv", *ids, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )


def test_socket_mode_with_group(start_coordinator: Any, shared_dir: str) -> None:
    sock = os.path.join(shared_dir, "sp.sock")
    start_coordinator({"r": 1}, path=sock, group="nogroup")
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY


def test_a_group_given_by_its_gid(start_coordinator: Any, shared_dir: str) -> None:
    # As chown and setpriv take one; before: "no group named '65534'".
    import grp

    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import _group_id

    sock = os.path.join(shared_dir, "sp.sock")
    start_coordinator({"r": 1}, path=sock, group=str(NOBODY))
    assert os.stat(sock).st_gid == NOBODY
    unused = next(g for g in range(60000, 65000) if g not in {e.gr_gid for e in grp.getgrall()})
    for name in (str(unused), "99999999999999999999"):
        with pytest.raises(ConfigError, match="nor with that gid") as info:
            _group_id(CoordinatorConfig(socket_path=sock, resources={"r": 1}, group=name))  # type: ignore[dict-item]
        assert info.value.field == "group"


def test_peer_with_wrong_uid_is_refused(start_coordinator: Any, shared_dir: str) -> None:
    sock = os.path.join(shared_dir, "sp.sock")
    start_coordinator({"r": 1}, path=sock, group="nogroup")  # allowed: our own uid only
    out = run_as_nobody(sock, 'print("GRANTED", c.acquire("r", timeout=2))')
    assert "DENIED" in out.stdout, out.stdout + out.stderr
    assert "uid 65534" in out.stdout
    assert "GRANTED" not in out.stdout


def test_allowed_gid_is_admitted_but_not_admin(start_coordinator: Any, shared_dir: str) -> None:
    sock = os.path.join(shared_dir, "sp.sock")
    start_coordinator({"r": 1}, path=sock, group="nogroup", allowed_gids=[NOBODY])
    out = run_as_nobody(sock, """
        print("GRANTED", c.acquire("r", timeout=2).id)
        c.admin("pause", resource="r")
        print("PAUSED")
    """)
    assert "GRANTED" in out.stdout, out.stdout + out.stderr
    assert "DENIED" in out.stdout and "admin" in out.stdout
    assert "PAUSED" not in out.stdout


def test_an_allowed_gid_counts_as_a_supplementary_group_too(start_coordinator: Any, shared_dir: str) -> None:
    # Before, only the peer's primary gid was matched: a service user added to
    # the group (usermod -aG) reached the 0660 socket and was refused.
    sock = os.path.join(shared_dir, "sp.sock")
    start_coordinator({"r": 1}, path=sock, group="nogroup", allowed_gids=[NOBODY])
    out = run_as_nobody(sock, """
        print("GRANTED", c.acquire("r", timeout=2).id)
    """, ids=(f"--reuid={NOBODY - 1}", f"--regid={NOBODY - 1}", f"--groups={NOBODY}"))
    assert "GRANTED" in out.stdout, out.stdout + out.stderr


def test_an_allowed_gid_counts_among_hundreds_of_groups(start_coordinator: Any, shared_dir: str) -> None:
    # Before, a peer in more than 256 groups was read as in none (Python's
    # getsockopt() takes at most 1024 bytes: ERANGE) and refused.
    sock = os.path.join(shared_dir, "sp.sock")
    start_coordinator({"r": 1}, path=sock, group="nogroup", allowed_gids=[NOBODY])
    groups = ",".join(str(g) for g in [*range(20000, 20300), NOBODY])
    out = run_as_nobody(sock, """
        print("GRANTED", c.acquire("r", timeout=2).id)
    """, ids=(f"--reuid={NOBODY - 1}", f"--regid={NOBODY - 1}", f"--groups={groups}"))
    assert "GRANTED" in out.stdout, out.stdout + out.stderr


_FLOOD = """
import socket, sys
for _ in range(50):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.recv(4096)  # the error frame, then the close
    s.close()
print("DONE")
"""


def test_a_refused_peer_connecting_in_a_loop_is_logged_once(start_coordinator: Any, shared_dir: str,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    # Before, every refusal was a warning line: 50 connects, 50 lines (and a
    # peer in a loop filled the disk); each refused CLI command was two (its probe).
    sock = os.path.join(shared_dir, "sp.sock")
    coord = start_coordinator({"r": 1}, path=sock, group="nogroup")  # nobody reaches it, is refused
    out = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", _FLOOD, sock],
        capture_output=True, text=True, timeout=60,
    )
    assert "DONE" in out.stdout, out.stdout + out.stderr
    coord.stop()  # its stderr is ours: all written once it has exited
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "refused peer" in ln]
    assert len(lines) == 1 and "uid=65534" in lines[0], lines


_HOLD_DIR_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("LOCKED", flush=True)
time.sleep(20)
"""


def test_a_group_member_cannot_hold_up_a_start(start_coordinator: Any, shared_dir: str) -> None:
    # Before, a start locked the socket's directory, which anyone who may read
    # it can lock too (here a member of its group): the start waited as long as
    # they held it, for ever if they liked.
    run = os.path.join(shared_dir, "run")
    os.mkdir(run, 0o750)
    os.chown(run, -1, NOBODY)
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", _HOLD_DIR_LOCK, run],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "LOCKED"
        coord = start_coordinator({"r": 1}, path=os.path.join(run, "sp.sock"), group="nogroup")
        assert coord.pid is not None
        assert os.listdir(run) == ["sp.sock"]  # no lock file left behind
    finally:
        holder.kill()
        holder.wait(10)


_REACH = """
import os, sys
from sharedpool import Client
c = Client(sys.argv[1], connect_timeout=3)
try:
    print("GRANTED", c.acquire("r", timeout=2).id)
finally:
    c.close()
try:
    open(os.path.join(os.path.dirname(sys.argv[1]), "intruder"), "w")
    print("WROTE")
except PermissionError:
    print("NOT WRITABLE")
"""


def test_group_member_reaches_a_socket_in_a_directory_made_for_it(start_coordinator: Any,
                                                                   shared_dir: str) -> None:
    # The coordinator makes the socket's directory: with a group it must let the
    # group in (0750), or the 0660 socket is out of the members' reach.
    sock = os.path.join(shared_dir, "run", "sp.sock")
    start_coordinator({"r": 1}, path=sock, group="nogroup", allowed_gids=[NOBODY])
    st = os.stat(os.path.dirname(sock))
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == NOBODY and st.st_uid == os.getuid()
    out = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", _REACH, sock],
        capture_output=True, text=True, timeout=60,
    )
    assert "GRANTED" in out.stdout, out.stdout + out.stderr
    assert "NOT WRITABLE" in out.stdout, out.stdout + out.stderr


def test_without_a_group_the_directory_made_is_owner_only(start_coordinator: Any,
                                                          shared_dir: str) -> None:
    sock = os.path.join(shared_dir, "run", "sp.sock")
    start_coordinator({"r": 1}, path=sock)
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700


@pytest.mark.parametrize("made", ["directory", "socket"])
def test_a_group_the_user_cannot_give_files_to_is_a_config_error(shared_dir: str, made: str) -> None:
    # Before: "cannot serve: [Errno 1] Operation not permitted: '.../d'", exit 1,
    # and the directory made for the socket left behind (0700).
    home = os.path.join(shared_dir, "nb")
    os.mkdir(home, 0o700)
    os.chown(home, NOBODY, NOBODY)
    if made == "socket":  # the directory exists already: the socket's chown fails
        os.mkdir(os.path.join(home, "d"), 0o700)
        os.chown(os.path.join(home, "d"), NOBODY, NOBODY)
    sock = os.path.join(home, "d", "sp.sock")
    env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_SOCKET"}
    out = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "sharedpool", "serve", "--socket", sock, "--group", "root",
         "--resource", "r=1"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert out.returncode == 2, out
    assert "group" in out.stderr and "'root'" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert os.path.isdir(os.path.join(home, "d")) == (made == "socket")  # not left behind
    assert not os.path.exists(sock)


_POOL_AS_NOBODY = """
import sqlite3, sys
from sharedpool import ConnectionPool, PoolConfig, PoolTimeout
with ConnectionPool(lambda: sqlite3.connect(":memory:"), PoolConfig(min_size=0, acquire_timeout=1),
                    resource="r", coordinator=sys.argv[1]) as pool:
    try:
        pool.acquire()
    except PoolTimeout as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
"""


@pytest.mark.parametrize("command", ["status", "top", "serve", "pool"])
def test_a_permission_denied_says_on_what(start_coordinator: Any, shared_dir: str, command: str) -> None:
    # Before: "cannot use the coordinator at ...: [Errno 13] Permission denied", and
    # "cannot serve: [Errno 13] Permission denied: '.../run'": not which directory
    # refused, nor whose it was, nor its mode.
    private = os.path.join(shared_dir, "private")
    os.mkdir(private, 0o700)  # root's, as the coordinator running as root makes it
    sock = os.path.join(private, "sp.sock")
    start_coordinator({"r": 1}, path=sock)
    nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable)
    denied, mode = private, "drwx------ (mode 0700)"
    if command == "serve":  # a directory to be made in one it may not write (root's, 0711)
        argv = [*nobody, "-m", "sharedpool", "serve", "--socket", os.path.join(shared_dir, "run", "sp.sock"),
                "--resource", "r=1"]
        denied, mode = shared_dir, "drwx--x--x (mode 0711)"
    elif command == "pool":
        argv = [*nobody, "-c", _POOL_AS_NOBODY, sock]
    else:
        argv = [*nobody, "-m", "sharedpool", command, "--socket", sock, "--iterations", "1"][
            :None if command == "top" else -2]
    env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_SOCKET"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1, out
    assert f"directory {denied} is {mode} owned by root" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_peer_credentials_read_uid_and_gid_unsigned() -> None:
    # Before ("3i"), a uid or gid of 2**31 or more (user namespaces hand them
    # out) read as negative and could never match allowed_uids / allowed_gids.
    import struct

    from sharedpool.peers import peer_credentials

    class Peer:
        def getsockopt(self, level: int, option: int, size: int) -> bytes:
            return struct.pack("iII", 4242, 2**32 - 2, 2**31)

    assert peer_credentials(Peer()) == (4242, 2**32 - 2, 2**31)


def test_a_socket_directory_of_another_user_is_named_with_both_users(shared_dir: str) -> None:
    # Before: "directory D belongs to uid 0, not to us": neither user by name, nor the mode.
    theirs = os.path.join(shared_dir, "roots")
    os.mkdir(theirs, 0o755)
    argv = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
            "-m", "sharedpool", "serve", "--socket", os.path.join(theirs, "sp.sock"), "--resource", "r=1")
    env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_SOCKET"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0, out
    nobody = pwd.getpwuid(NOBODY).pw_name
    assert (f"directory {theirs} belongs to root, not to this coordinator's user {nobody} (mode 0755)"
            in out.stderr), out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
