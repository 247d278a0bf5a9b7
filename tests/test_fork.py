"""I7: a pool or client inherited across fork() never uses the parent's socket
or connections; the child starts its own session lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_helpers import pg_dsn
from proc_helpers import run_in_child, run_staggered

from sharedpool import Client, ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory


def test_forked_client_starts_its_own_session(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 4})
    parent = Client(sock_path)
    lease = parent.acquire("r", timeout=2)
    parent_session = parent.session_id

    def child() -> int:
        got = parent.acquire("r", timeout=2)  # the same object, now in the child
        sessions = parent.inspect("sessions")["sessions"]
        mine = [s for s in sessions if s["pid"] == os.getpid()]
        ok = parent.session_id != parent_session and len(mine) == 1 and lease.id not in parent.held
        parent.release(got)
        return 0 if ok else 3

    try:
        assert run_in_child(child) == 0
        # The parent's session and lease are untouched by the child's life and death.
        rows = parent.inspect("leases")["leases"]
        assert [r["id"] for r in rows] == [lease.id]
        assert parent.session_id == parent_session
    finally:
        parent.close()


def test_forked_pool_never_touches_parent_connections(pg: str, start_coordinator: Any,
                                                      sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": 4})
    pool = ConnectionPool(
        lambda: psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True),
        PoolConfig(min_size=0, max_size=2), resource="pg", coordinator=sock_path,
    )
    with pool.connection() as conn:
        parent_backend = conn.info.backend_pid

    def child() -> int:
        with pool.connection() as conn:  # a new connection, its own lease
            mine = conn.info.backend_pid
        pool.close()  # closes only the child's connections
        return 0 if mine != parent_backend else 4

    try:
        assert run_in_child(child) == 0
        with pool.connection() as conn:  # the parent's connection still works
            assert conn.info.backend_pid == parent_backend
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.get_metrics()["total_created"] == 1
    finally:
        pool.close()


def test_two_threads_of_a_child_reset_the_pool_once(start_coordinator: Any, sock_path: str) -> None:
    import threading

    from sharedpool.testing import FakeFactory

    start_coordinator({"r": 4})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=4), resource="r",
                          coordinator=sock_path)
    with pool.connection():
        pass

    def child() -> int:
        barrier = threading.Barrier(2)
        got: list[Any] = []

        def take() -> None:
            barrier.wait()
            got.append(pool.acquire(timeout=5))

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        ok = len(got) == 2 and pool.get_size() == 2 and pool.get_metrics()["opening"] == 0
        for w in got:
            pool.release(w)
        pool.close()
        return 0 if ok else 5

    try:
        assert run_in_child(child) == 0
        assert pool.get_size() == 1  # the parent's pool is untouched
    finally:
        pool.close()


def _sockets_open() -> set[int]:
    """Inodes of this process's open sockets (fd numbers get reused; inodes do not)."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        inodes.add(st.st_ino)
    return inodes


def test_client_fds_are_closed_in_a_child_and_at_close(start_coordinator: Any,
                                                       sock_path: str) -> None:
    # The background thread's wake-up pair is per process: a child closes the
    # parent's copies (a forking server would otherwise gather them), and
    # close() leaves no fd behind.
    start_coordinator({"r": 1})
    client = Client(sock_path)
    client.release(client.acquire("r", timeout=2))  # the background thread runs
    pair = {os.fstat(client._wake_r.fileno()).st_ino, os.fstat(client._wake_w.fileno()).st_ino}

    def child() -> int:
        return 0 if not pair & _sockets_open() else 5

    assert run_in_child(child) == 0
    assert pair <= _sockets_open()  # the parent's own are untouched
    thread = client._thread
    client.close()
    assert thread is not None
    thread.join(5)
    assert not pair & _sockets_open()


def _backends(app_name: str) -> int:
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (app_name,)).fetchone()
    return int(row[0]) if row else -1


_PARENT_DIES = """
import os, sys, time
import psycopg
from sharedpool import ConnectionPool, PoolConfig
dsn, app, sock = sys.argv[1:4]
pool = ConnectionPool(lambda: psycopg.connect(dsn, application_name=app, autocommit=True),
                      PoolConfig(min_size=0, max_size=2), resource="pg", coordinator=sock)
a, b = pool.acquire(), pool.acquire()
pool.release(a); pool.release(b)
child = os.fork()
if child == 0:  # a long-lived helper that never uses the pool
    os.close(1)  # the test reads the parent's stdout to its end
    os.close(2)
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
os._exit(0)  # the parent dies without closing anything
"""


def test_a_child_holds_no_copy_of_the_parents_database_sockets(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """The parent dies, its forked child lives on: the parent's backends must go
    with the parent (its leases are freed at once). A child holding copies of
    the parent's sockets kept them open, and PostgreSQL went over the cap."""
    import signal
    import subprocess
    import sys
    import time

    start_coordinator({"pg": 2})
    proc = subprocess.run([sys.executable, "-c", _PARENT_DIES, pg_dsn(), app_name, sock_path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    helper = int(proc.stdout.split()[0])
    try:
        assert os.path.exists(f"/proc/{helper}")
        deadline = time.monotonic() + 5
        while (count := _backends(app_name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count == 0, f"{count} backend(s) of the dead parent still there while its child lives"
        assert os.path.exists(f"/proc/{helper}")  # the child was alive all along
        assert _backends(app_name) == 0
    finally:
        os.kill(helper, signal.SIGKILL)


def test_a_childs_stray_use_of_an_inherited_connection_cannot_reach_the_parents_session(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """SQLAlchemy's reset-on-return (a ROLLBACK) ran in the child on the parent's
    socket, and the parent silently lost its open transaction."""
    import sqlalchemy as sa

    from sharedpool.contrib.sqlalchemy import create_engine

    start_coordinator({"pg": 3})
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/test?application_name={app_name}",
                           resource="pg", coordinator=sock_path, pool_size=2, max_overflow=0)
    try:
        fairy = engine.raw_connection()
        cur = fairy.cursor()
        cur.execute("CREATE TEMP TABLE t (x int)")
        cur.execute("INSERT INTO t VALUES (1)")  # a transaction open at the fork

        def child() -> int:
            fairy.close()  # checks the inherited checkout in: SQLAlchemy resets it
            return 0

        assert run_in_child(child) == 0
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone() == (1,)  # still in the parent's transaction
        fairy.commit()
        fairy.close()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_a_pool_or_client_closed_before_the_fork_stays_closed_in_the_child(
        start_coordinator: Any, sock_path: str) -> None:
    from sharedpool import PoolClosed, SharedPoolError
    from sharedpool.testing import FakeFactory

    start_coordinator({"r": 4})
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=2, max_size=4), resource="r",
                          coordinator=sock_path)
    pool.close()  # waits for the top-up connections under way, and closes them
    calls = factory.calls
    client = Client(sock_path)
    client.inspect("server")
    client.close()

    def child() -> int:
        import time

        size = pool.get_size()  # a read-only look used to reopen it
        try:
            pool.acquire(timeout=1)
            return 5
        except PoolClosed:
            pass
        time.sleep(0.5)  # a revived pool's maintenance topped up to min_size by now
        if size or pool.get_size() or factory.calls != calls or pool.status.value != "closed":
            return 6
        try:
            client.inspect("server", timeout=1)
            return 7
        except SharedPoolError:
            return 0 if client.closed else 8

    assert run_in_child(child) == 0


def test_a_child_never_lets_the_parents_connection_objects_be_collected(
        start_coordinator: Any, sock_path: str) -> None:
    # A driver that closes its connection when collected (psycopg2, sqlite3)
    # would close the parent's connection from the child once the pool forgot it.
    import gc
    import weakref

    from sharedpool.testing import FakeConnection

    start_coordinator({"r": 2})
    # FakeConnection itself, not a FakeFactory: that would keep a reference of its own.
    pool = ConnectionPool(FakeConnection, PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    with pool.connection() as conn:
        parents = weakref.ref(conn)
    del conn

    def child() -> int:
        with pool.connection() as mine:  # the reset: the pool starts empty here
            fresh = mine is not parents()
        gc.collect()
        pool.close()
        return 0 if fresh and parents() is not None else 5

    try:
        assert run_in_child(child) == 0
    finally:
        pool.close()


def test_a_child_that_only_releases_at_exit_opens_nothing(start_coordinator: Any,
                                                          sock_path: str) -> None:
    """A worker's exit hook (release_process) in a child that never used the
    inherited pool: its maintenance used to start and top up to min_size first."""
    from sharedpool import release_process
    from sharedpool.testing import FakeFactory

    start_coordinator({"r": 8})
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=3, max_size=4), resource="r",
                          coordinator=sock_path)
    try:
        import time

        deadline = time.monotonic() + 5
        while pool.get_size() < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        calls_in_parent = factory.calls

        def child() -> int:
            pool.get_size()  # noticed the fork
            time.sleep(0.3)
            release_process(1.0)
            return 0 if factory.calls == calls_in_parent else 9

        assert run_in_child(child) == 0
    finally:
        pool.close()


_FORK_IN_HANDSHAKE = """
import os, sys, threading, time
from sharedpool import Client
client = Client(sys.argv[1])
got = []
thread = threading.Thread(target=lambda: got.append(client.acquire("r", 10)))
thread.start()
time.sleep(0.5)  # the handshake is under way: the coordinator is stopped
child = os.fork()
if child == 0:  # a long-lived helper that never uses sharedpool
    os.close(1)
    os.close(2)
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
thread.join(15)
print(len(got), flush=True)
os._exit(0)  # the parent dies holding its lease
"""


def test_a_fork_during_the_handshake_leaves_the_child_no_copy_of_the_parents_session(
        start_coordinator: Any, sock_path: str) -> None:
    """The child closed only the session socket already made: one still in its
    handshake at the fork stayed open in the child, and the dead parent's
    session and lease lived on for as long as the child did."""
    import signal
    import subprocess
    import sys
    import time

    coord = start_coordinator({"r": 2})
    os.kill(coord.pid, signal.SIGSTOP)  # accepts, but does not answer the hello yet
    helper = None
    try:
        proc = subprocess.Popen([sys.executable, "-c", _FORK_IN_HANDSHAKE, sock_path],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        helper = int(proc.stdout.readline())
        os.kill(coord.pid, signal.SIGCONT)
        assert proc.stdout.readline().strip() == "1"  # the parent got its lease
        assert proc.wait(15) == 0
        watcher = Client(sock_path)
        try:
            deadline = time.monotonic() + 5
            while ((rows := watcher.inspect("leases")["leases"]) or any(
                    s["pid"] == proc.pid for s in watcher.inspect("sessions")["sessions"])) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rows == [], "the dead parent's lease lives on in its child"
            assert os.path.exists(f"/proc/{helper}")  # the child was alive all along
        finally:
            watcher.close()
    finally:
        os.kill(coord.pid, signal.SIGCONT)
        if helper is not None:
            os.kill(helper, signal.SIGKILL)


def test_a_thread_that_finds_the_fork_reset_begun_waits_for_it_to_end() -> None:
    # A forked child's thread A resets the pool; _init_state set the pid first,
    # so thread B, arriving a moment later, saw it current, skipped the reset
    # and checked out the parent's idle connection (I7), then could not check
    # it in. A pause inside the reset stands in for the thread switch.
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2))
    pool.release(pool.acquire(timeout=5))  # the parent's: idle
    parents = {id(c) for c in factory.made}

    def child() -> int:
        real = pool.config
        paused: list[int] = []

        class SlowConfig:
            def __getattr__(self, name: str) -> Any:
                if name == "validation_bypass" and threading.current_thread().name == "A" and not paused:
                    paused.append(1)
                    time.sleep(0.5)  # A: inside the reset
                return getattr(real, name)

        pool.config = SlowConfig()  # type: ignore[assignment]
        got: dict[str, Any] = {}

        def run(name: str) -> None:
            try:
                got[name] = pool.acquire(timeout=3)
            except Exception as exc:  # noqa: BLE001 - judged below
                got[name] = exc

        run_staggered(run, "AB", 0.1)
        pool.config = real
        for w in got.values():
            if isinstance(w, Exception) or id(w.conn) in parents:
                return 7
            pool.release(w)
        return 0

    try:
        assert run_in_child(child) == 0  # 7: the parent's connection was handed out here
    finally:
        pool.close()


@pytest.mark.parametrize(("masterpid", "hooks"), [(1, ""), (0, "hooks")],
                         ids=["uwsgidecorators", "no-master-fork-hooks"])
def test_a_fork_without_pythons_hooks_is_reset_by_uwsgis_post_fork_hook(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, masterpid: int,
        hooks: str) -> None:
    # uWSGI forks its workers in C, without Python's at-fork hooks, from a master
    # whose pool holds a connection (a query at import): the child used it (and
    # the master's session) as its own. sharedpool has uWSGI's post-fork hook run
    # its hooks: through uwsgidecorators' chain, or (no master process, where
    # uwsgidecorators refuses to import) uwsgi.post_fork_hook itself. The pool's
    # threads in such a master are a hazard unless py-call-uwsgi-fork-hooks: said once.
    start_coordinator({"pg": 2})
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "uwsgi_fork_script.py"),
                           sock_path, app_name, str(masterpid), hooks],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    assert out["child_backend"] != out["parent_backend"], f"the child used the parent's connection: {out}"
    assert proc.stderr.count("Set py-call-uwsgi-fork-hooks = true") == (0 if hooks else 1), proc.stderr


_FAKE_UWSGI = {
    # An app's tests stub uwsgidecorators (``postfork`` only, no chain).
    "stub-uwsgidecorators": "m = types.ModuleType('uwsgi'); m.worker_id = lambda: 0\n"
                            "sys.modules['uwsgidecorators'] = types.ModuleType('uwsgidecorators')\n",
    # Some other object named uwsgi, which takes no new attribute.
    "no-setattr": "class F:\n    __slots__ = ()\n    def worker_id(self): return 0\nm = F()\n",
}


@pytest.mark.parametrize("fake", list(_FAKE_UWSGI))
def test_some_other_uwsgi_module_does_not_fail_the_import(fake: str) -> None:
    # Not a uWSGI process, but a "uwsgi" in sys.modules that looks like a master's:
    # hooking its post-fork raised out of the import of sharedpool (AttributeError).
    code = f"import sys, types\n{_FAKE_UWSGI[fake]}sys.modules['uwsgi'] = m\nimport sharedpool\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("role", ["uwsgi.mule_id = lambda: 1", "uwsgi.i_am_the_spooler = lambda: True"],
                         ids=["mule", "spooler"])
def test_a_uwsgi_mule_or_spooler_is_not_warned_of_as_a_master(tmp_path: Path, role: str) -> None:
    # A mule (mule = script.py) or the spooler (spooler-import) imports sharedpool
    # itself; uWSGI says worker_id() 0 there too. A client's thread started there
    # was warned of as a pool in a master whose workers would hang (measured under
    # uWSGI 2.0: a mule script's client logged it). No worker is forked from either.
    code = ("import sys, types\nuwsgi = types.ModuleType('uwsgi')\nuwsgi.worker_id = lambda: 0\n"
            f"uwsgi.opt = {{}}\n{role}\nsys.modules['uwsgi'] = uwsgi\n"
            "from sharedpool import Client\n"
            f"Client({str(tmp_path / 'none.sock')!r}).call_later(0.0, lambda: None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "py-call-uwsgi-fork-hooks" not in out.stderr, out.stderr
