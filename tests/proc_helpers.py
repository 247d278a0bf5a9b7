"""Helpers shared by the integration tests: the coordinator's lease count,
running a function in forked children (multiprocessing, fork start method),
threads hammering a pool, a worker exiting mid-query, a thread whose
exception the test looks at, reading a raw socket until the peer closes it, a
SIGALRM that raises (a signal handler's exception, as celery's soft time
limit), an exception injected once where a signal could land, threads started
a moment apart, a server slow to let go of a closed client, an import
refused in a fresh interpreter, a garbage collection run where a logging
queue's lock is held, and a client that cannot start a thread to report a
failed connect."""

from __future__ import annotations

import gc
import logging
import logging.handlers
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sharedpool import Client


def start_recording(fn: Callable[[], object], errors: list[BaseException]) -> threading.Thread:
    """Start ``fn()`` in a thread; what it raises is appended to ``errors``."""
    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def exit_mid_query(checkout: Callable[[], AbstractContextManager[Any]],
                   query: Callable[[Any], Any]) -> dict[str, Any]:
    """A worker exiting (``release_process(5)``) while one of its threads runs
    ``query(conn)`` on a connection from ``checkout()``: what the query gave
    (``row``, or ``query_error``) and how long the exit ``took``."""
    from sharedpool.process import release_process

    out: dict[str, Any] = {}
    checked_out = threading.Event()

    def work() -> None:
        try:
            with checkout() as conn:
                checked_out.set()
                out["row"] = query(conn)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["query_error"] = repr(exc)

    thread = threading.Thread(target=work)
    thread.start()
    assert checked_out.wait(10)  # in use from here: the exit must wait for it
    t0 = time.monotonic()
    release_process(5.0)
    out["took"] = time.monotonic() - t0
    thread.join(5)
    return out


def leased(sock: str) -> int:
    c = Client(sock)
    try:
        return int(c.inspect("resources")["resources"][0]["leased"])
    finally:
        c.close()


def wait_leased(sock: str, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := leased(sock)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def other_sessions(sock: str) -> list[str]:
    """Names of the coordinator's sessions, less this look's own."""
    watch = Client(sock, name="watch")
    try:
        return [s["name"] for s in watch.inspect("sessions")["sessions"] if s["name"] != "watch"]
    finally:
        watch.close()


def wait_no_other_sessions(sock: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (names := other_sessions(sock)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return names


def no_leases_of(sock: str, pid: int, timeout: float = 3.0) -> bool:
    """Whether the coordinator holds no lease of ``pid`` (waiting up to ``timeout``)."""
    client = Client(sock)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if not [x for x in client.inspect("leases")["leases"] if x["pid"] == pid]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    finally:
        client.close()


def interrupt_once(monkeypatch: Any, owner: type, name: str, exc: BaseException, *,
                   after: bool = False, pause: float = 0.0) -> None:
    """Make ``owner.name`` raise ``exc`` at its next call, as a signal handler's
    exception would land there: before the real method runs (after ``pause``
    seconds), or just after it returned (``after``). Later calls are the real ones."""
    real = getattr(owner, name)
    fire = [True]

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not fire[0]:
            return real(self, *args, **kwargs)
        fire[0] = False
        if after:
            real(self, *args, **kwargs)
        time.sleep(pause)
        raise exc

    monkeypatch.setattr(owner, name, interrupted)


def run_staggered(target: Callable[[str], object], names: str, gap: float) -> None:
    """Run ``target(name)`` in a thread named ``name`` for each of ``names``,
    started ``gap`` seconds apart in that order; return once all have ended."""
    threads = [threading.Thread(target=target, args=(n,), name=n) for n in names]
    for i, thread in enumerate(threads):
        if i:
            time.sleep(gap)
        thread.start()
    for thread in threads:
        thread.join(10)


def run_in_child(fn: Callable[[], int]) -> int:
    """Fork; run ``fn`` in the child; its return value (0 = ok) is the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_forked(target: Callable[..., dict[str, Any]], *args: Any, n: int = 1) -> list[dict[str, Any]]:
    """Run ``target(*args)`` in ``n`` forked children; return what each returned."""
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(results, target, *args)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0] * n, out
    return out


def _child(results: Any, target: Callable[..., dict[str, Any]], *args: Any) -> None:
    try:
        results.put(target(*args))
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise


def resource_row(sock: str) -> dict[str, Any]:
    """The coordinator's row for its first resource."""
    c = Client(sock)
    try:
        return dict(c.inspect("resources")["resources"][0])
    finally:
        c.close()


def settled(sock: str) -> dict[str, Any] | None:
    """The resource row once no lease is in use, else None."""
    row = resource_row(sock)
    return row if row["in_use"] == 0 else None


def hammer(threads: int, iterations: int, op: Callable[[], object]) -> tuple[int, list[str]]:
    """Run ``op()`` ``iterations`` times in each of ``threads`` threads; return
    (how many succeeded, the first three errors)."""
    done, errors = [0], []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(iterations):
            try:
                op()
                with lock:
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(repr(exc))

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0], errors[:3]


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or resets, or goes quiet for ``timeout``)."""
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def held_once_confirmed(held: Callable[[], int], timeout: float = 10.0) -> int:
    """Leases a pool still holds after its close, once the server has confirmed
    the closes: a lease is held until the server lets go (I1), which on a loaded
    machine can outlast close() (the rest is confirmed in the background)."""
    deadline = time.monotonic() + timeout
    while (count := held()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


@contextmanager
def alarm_raises(exc: type[BaseException]) -> Iterator[None]:
    """Within: SIGALRM raises ``exc`` (arm it with ``signal.setitimer``); the
    timer and the old handler are put back at the end."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise exc

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class HoldingServer:
    """A TCP server on loopback that keeps its end of each connection open until
    the test lets go of it (``let_go()``): a close is not confirmed before then."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = self.listener.getsockname()
        self.ends: list[socket.socket] = []

    def connect(self) -> socket.socket:
        """The client side of a new connection (a pool's factory)."""
        return socket.create_connection(self.address)

    def accept(self) -> None:
        self.ends.append(self.listener.accept()[0])

    def accept_all(self) -> None:
        """Accept every connection from now on, in a thread (a server that
        never answers, as a stalled Redis), until :meth:`close`."""
        def run() -> None:
            while True:
                try:
                    self.accept()
                except OSError:
                    return  # closed

        threading.Thread(target=run, daemon=True).start()

    def let_go(self) -> None:
        while self.ends:
            self.ends.pop().close()

    def close(self) -> None:
        self.let_go()
        self.listener.close()


def import_refused(code: str) -> str:
    """Run ``code`` (it ends with an import, after faking an older library) in
    a fresh interpreter: the stderr of its exit with code 1."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    return out.stderr


@contextmanager
def sharedpool_logs_queued_gc_off() -> Iterator[queue.Queue[logging.LogRecord]]:
    """sharedpool's log records go to a queue (a logging.QueueHandler), and the
    garbage collector runs only when :func:`collect_inside_a_put` runs it."""
    q: queue.Queue[logging.LogRecord] = queue.Queue()
    handler = logging.handlers.QueueHandler(q)
    logging.getLogger("sharedpool").addHandler(handler)
    gc.disable()
    try:
        yield q
    finally:
        gc.enable()
        logging.getLogger("sharedpool").removeHandler(handler)


def collect_holding(lock: Any, timeout: float = 5.0) -> bool:
    """Collect garbage in a thread that holds ``lock``, as a collection inside
    one of the lock holder's own steps would; whether it returned within
    ``timeout`` (a finalizer that takes the lock again hangs it)."""
    collected = threading.Event()

    def collect() -> None:
        with lock:
            gc.collect()
        collected.set()

    threading.Thread(target=collect, daemon=True).start()
    return collected.wait(timeout)


def collect_inside_a_put(q: queue.Queue[Any], timeout: float = 5.0) -> bool:
    """As a collection inside a put() of another record would (the queue's
    plain Lock, taken again by a finalizer that logs)."""
    return collect_holding(q.mutex, timeout)


def reclaimed_at_release(sock_path: str, resource: str, reclaimed: Callable[[], int],
                         monkeypatch: Any) -> list[int]:
    """A core pool of another process's kind takes the one lease of
    ``resource``, which this process's integration pool holds idle: what
    ``reclaimed()`` (its leases_reclaimed) read as each lease was released."""
    from sharedpool import ConnectionPool, PoolConfig
    from sharedpool.testing import FakeFactory

    client = Client.for_path(sock_path)
    release = client.release
    seen: list[int] = []

    def spy(lease: Any) -> None:
        seen.append(reclaimed())
        release(lease)

    monkeypatch.setattr(client, "release", spy)
    waiter = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, test_on_acquire=False),
                            resource=resource, coordinator=sock_path)
    try:
        conn = waiter.acquire(timeout=5)  # served by the integration pool's idle one
        at_release = list(seen)
        waiter.release(conn)
    finally:
        waiter.close()
    return at_release


def no_thread_for_reports(monkeypatch: Any) -> None:
    """Clients cannot start a thread for a failed connect's report ("can't start
    new thread", as at a process's thread limit); their other calls are unchanged."""
    ensure = Client._ensure_thread

    def ensure_thread(self: Client) -> None:
        if sys._getframe(1).f_code.co_name == "report_failure":
            raise RuntimeError("can't start new thread")
        ensure(self)

    monkeypatch.setattr(Client, "_ensure_thread", ensure_thread)
