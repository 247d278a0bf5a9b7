"""A ``with`` on the conditions of a client, a pool and a lease book, cut
short by a signal handler's exception at any instant: the lock must not stay
held (threading.Condition's Python __enter__/__exit__ left it held at three
instants: every later lease call, checkout or checkin of the process hung)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from test_pool_edges import _HANDLER_POINTS, run_traced

from sharedpool import Client, ConnectionPool, PoolConfig
from sharedpool.contrib._leases import LeaseBook
from sharedpool.testing import FakeFactory
from sharedpool.waiting import _Waiter


def _at_instant(instant: int) -> tuple[Any, list[int]]:
    """A tracer raising KeyboardInterrupt at the ``instant``-th place a signal
    handler can run: a function's entry, or just after a call or a backward
    jump (not at a tracer's line events elsewhere, where none can)."""
    import dis

    points: dict[Any, set[int]] = {}
    seen, last = [0], {}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event != "opcode":
            return local
        code = frame.f_code
        if code not in points:
            points[code] = {i.offset for i in dis.get_instructions(code) if i.opname in _HANDLER_POINTS}
        prev, last[id(frame)] = last.get(id(frame)), frame.f_lasti
        if prev in points[code]:
            seen[0] += 1
            if seen[0] == instant:
                raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            seen[0] += 1  # its entry
            if seen[0] == instant:
                raise KeyboardInterrupt
        frame.f_trace_opcodes = True
        return local

    return tracer, seen


def _held_after_cut(cond: Any, instant: int) -> tuple[bool, bool]:
    """Cut ``with cond: pass`` short at the ``instant``-th place a handler can
    run. Whether it was reached, and whether the lock is left held."""
    tracer, seen = _at_instant(instant)

    def enter() -> None:
        with cond:
            pass

    run_traced(tracer, enter, catch=(KeyboardInterrupt,))
    free = cond.acquire(timeout=0.5)
    if free:
        cond.release()
    return seen[0] >= instant, not free


def _cut_everywhere(cond: Any) -> list[int]:
    """The instants at which a cut-short ``with cond`` leaves its lock held."""
    stuck = []
    for instant in range(1, 50):
        fired, held = _held_after_cut(cond, instant)
        if not fired:
            break
        if held:
            stuck.append(instant)
            cond.release()
    return stuck


@contextlib.contextmanager
def _conditions(start_coordinator: Any, sock_path: str) -> Iterator[list[tuple[str, Any]]]:
    """The conditions of a client, a pool and a lease book, by name; after the
    test's look at them, all must still be usable."""
    start_coordinator({"r": 1})
    client = Client(sock_path)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    book = LeaseBook("r", sock_path)
    try:
        yield [("client", client._cond), ("pool", pool._returned),
               ("book returned", book._returned), ("book closing", book._none_closing)]
        with pool.connection(timeout=1):  # all still usable
            pass
        client.release(client.acquire("r", timeout=5))
    finally:
        pool.close()
        book.shutdown()
        client.close()


def test_no_signal_leaves_a_condition_held(start_coordinator: Any, sock_path: str) -> None:
    with _conditions(start_coordinator, sock_path) as conditions:
        for name, cond in conditions:
            assert _cut_everywhere(cond) == [], name


def test_no_signal_in_a_waiters_wait_leaves_its_event_locked() -> None:
    """A checkout's wait cut short at any instant inside Event.wait: the
    event's lock must be free, so the set() of a hand-over (made under the
    pool's lock) cannot block for ever, and with it every thread of the pool."""
    for instant in range(1, 200):
        event = _Waiter().event
        tracer, seen = _at_instant(instant)
        # RuntimeError: threading's own, lock released twice
        run_traced(tracer, event.wait, 0.001, catch=(KeyboardInterrupt, RuntimeError))
        if seen[0] < instant:
            break
        setter = threading.Thread(target=event.set, daemon=True)
        setter.start()
        setter.join(2)
        assert not setter.is_alive(), f"set() blocked: cut at instant {instant}"
    assert instant > 5  # the instants were reached


def _wait_cut_while_taking_back(cond: Any) -> tuple[BaseException | None, list[BaseException]]:
    """``with cond: cond.wait()`` in the main thread, notified by another thread
    that then holds the lock; a signal handler raises while the wait takes the
    lock back (blocked on that hold). What the wait raised, and what the other
    thread's ``with`` raised."""
    import signal
    import time

    def alarm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    errors: list[BaseException] = []
    main = threading.get_ident()

    def notifier() -> None:
        try:
            with cond:
                cond.notify_all()
                time.sleep(0.5)  # the waiter, woken, now blocks taking the lock back
                signal.pthread_kill(main, signal.SIGALRM)
                time.sleep(0.5)  # still ours: a wait cut short must not have let it go
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            errors.append(exc)

    before = signal.signal(signal.SIGALRM, alarm)
    thread = threading.Thread(target=notifier, daemon=True)
    raised = None
    try:
        with cond:
            thread.start()
            cond.wait(10)
    except KeyboardInterrupt as exc:
        raised = exc
    finally:
        thread.join(10)
        signal.signal(signal.SIGALRM, before)
    return raised, errors


def test_a_wait_cut_short_taking_its_lock_back_leaves_no_other_hold_released(
        start_coordinator: Any, sock_path: str) -> None:
    """A signal handler's exception while a wait() takes its lock back: over a
    Lock, the wait gave up unheld and its ``with`` released the notifier's hold
    (which raised "release unlocked lock" at its own exit: a lease call, a
    pool's checkin or an opener, unguarded meanwhile). Over an RLock the lock
    is taken back whatever the handler does."""
    with _conditions(start_coordinator, sock_path) as conditions:
        event = _Waiter().event._cond  # type: ignore[attr-defined]
        for name, cond in [*conditions, ("waiter's event", event)]:
            raised, errors = _wait_cut_while_taking_back(cond)
            assert errors == [], name
            assert isinstance(raised, KeyboardInterrupt), name


def _wait_briefly(cond: Any) -> None:
    with cond:
        cond.wait(0.001)


def test_a_wait_cut_short_anywhere_raises_the_handlers_exception_and_holds_nothing() -> None:
    """``with cond: cond.wait()`` cut short at any instant (a waiter's event,
    the pool's, the client's and the lease book's conditions are all this
    class): the handler's exception comes out, and the lock is free after.
    Before, at the instant just after threading's wait() let go of the lock
    (ahead of its try), the wait left it let go and the ``with`` raised
    "cannot release un-acquired lock" in place of KeyboardInterrupt (celery's
    soft time limit, a SIGTERM handler's SystemExit became a RuntimeError)."""
    from sharedpool.condition import Condition

    wrong = []
    for instant in range(1, 100):
        cond = Condition()
        tracer, seen = _at_instant(instant)
        raised = run_traced(tracer, _wait_briefly, cond, catch=(BaseException,))
        if seen[0] < instant:
            break
        free = cond.acquire(timeout=0.5)
        if free:
            cond.release()
        if not isinstance(raised, KeyboardInterrupt) or not free:
            wrong.append((instant, repr(raised), free))
    assert wrong == []
    assert instant > 5  # the instants were reached


class _RLockOf311_2:
    """An RLock as early 3.11 releases have it: no _recursion_count()."""

    def __init__(self) -> None:
        self._real = threading.RLock()
        for name in ("acquire", "release", "_is_owned", "_release_save", "_acquire_restore",
                     "__enter__", "__exit__"):
            setattr(self, name, getattr(self._real, name))

    def __repr__(self) -> str:
        return repr(self._real)


def test_a_wait_on_an_rlock_without_recursion_count_works() -> None:
    """Debian's Python 3.11.2: every wait() raised AttributeError
    ('_thread.RLock' object has no attribute '_recursion_count'): a peer run
    as another user (test_access, by that Python) failed its admin call."""
    from sharedpool.condition import Condition

    lock = _RLockOf311_2()
    cond = Condition(lock)
    with cond, cond:
        assert cond.wait(0.01) is False
        assert " count=2 " in repr(lock)  # held twice again, as before the wait
    assert not lock._is_owned()

