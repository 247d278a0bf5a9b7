"""What sharedpool does in a forked child, and what runs it there.

Python's ``os.fork()`` runs the at-fork hooks (``os.register_at_fork``). uWSGI
forks its workers in C, from a master that loaded the app, and runs them only
with ``py-call-osafterfork`` or ``py-call-uwsgi-fork-hooks``. Without them, every
worker took the master's pools and clients for its own: a connection the master
had opened (a query at import) served four workers at once, on one PostgreSQL
backend (I7). So, imported in a uWSGI master, this module also has uWSGI's
post-fork hook run the same hooks, once per child (not again where uWSGI ran
Python's own).

That does not make threads in such a master safe: uWSGI forks without the
interpreter lock unless ``py-call-uwsgi-fork-hooks``, and a worker forked while
a thread of the master (sharedpool's, once the master used a pool) takes or
drops it hangs for good. Said once, at warning, when sharedpool starts one there.
"""

from __future__ import annotations

import _signal  # signal.pthread_sigmask is a Python wrapper: see _let_through
import ctypes
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["in_child", "run_in_forked_child", "warn_thread_in_uwsgi_master"]

log = logging.getLogger("sharedpool")

_IN_CHILD: list[Callable[[], None]] = []
#: The pid the hooks last ran for (or this module was imported in).
_RAN_FOR = [os.getpid()]

#: Held back in the forking thread from just before a fork until the child has
#: run the hooks: a signal whose handler raises (Ctrl-C's KeyboardInterrupt,
#: celery's soft limit) landing in them cut them short, and Python prints and
#: ignores it there: a child left with the parent's pid as current_pid() and
#: its clients not reset used the parent's pooled connections and coordinator
#: session (I7; 9-12 of 300 children forked under a stream of SIGINT). Held
#: back, such a signal reaches the child's own code once the hooks ran. Not the
#: synchronous ones (a fault with its signal blocked kills the process).
_HELD = frozenset(signal.valid_signals()) - {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
    signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT}
#: Those of _HELD the forking thread had not blocked itself (a thread waiting in
#: sigwait() keeps its own): blocked by _hold, unblocked after the fork. One set
#: for the process: two threads forking at once with different masks of their
#: own may unblock each other's.
_UNBLOCK: set[int] = set()
#: Per thread: whether _hold ran for the fork under way (uWSGI's
#: py-call-osafterfork runs the child's hooks after a fork that ran none before).
_HOLDING = threading.local()


def _hold() -> None:
    # A handler may run (and fork: a SIGCHLD handler respawning) at each call here
    # and in the other hooks of this fork. A fork inside this thread's hold keeps
    # the set to let through: recomputed from a mask blocked here it would be
    # empty, and this fork's parent and child kept every signal blocked for good.
    if getattr(_HOLDING, "on", False):
        return
    unblock = _HELD - _signal.pthread_sigmask(signal.SIG_BLOCK, ())
    if unblock != _UNBLOCK:  # only when it changes (threads with masks of their own, see _UNBLOCK)
        _UNBLOCK.symmetric_difference_update(_UNBLOCK ^ unblock)
        _as_sigset(_UNBLOCK)
    for _ in range(8):
        _HOLDING.on = True
        _signal.pthread_sigmask(signal.SIG_BLOCK, _UNBLOCK)
        # A fork run by a handler in that call let it all through again and reset
        # the flag (its parent's hooks): block again, else this fork's child took
        # the flag unset for "nothing held" and kept the signals blocked.
        if _HOLDING.on:
            return


class _Sigset(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]  # glibc's


_libc = ctypes.CDLL(None, use_errno=True)
_libc.pthread_sigmask.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigset), ctypes.POINTER(_Sigset)]
#: _UNBLOCK as libc's sigset_t, for _let_through.
_UNBLOCK_SET = _Sigset()


def _as_sigset(signals: set[int]) -> None:
    _libc.sigemptyset(ctypes.byref(_UNBLOCK_SET))
    for signum in signals:
        _libc.sigaddset(ctypes.byref(_UNBLOCK_SET), int(signum))


#: libc's pthread_sigmask, called as is (no Python frame, and not Python's
#: signal.pthread_sigmask, which runs the handler of a signal it unblocks at
#: once: an exception raised there, in an at-fork hook, was printed and dropped,
#: Ctrl-C lost). The handler of a signal held back runs at the next Python code:
#: the process's own after os.fork() returns (or a later library's fork hook).
#: In the parent a Python function could also be cut short at its start and
#: leave the thread deaf to signals for good.
_let_through = functools.partial(_libc.pthread_sigmask, signal.SIG_UNBLOCK, ctypes.byref(_UNBLOCK_SET), None)


def _in_child() -> None:
    # Not cut short: this thread, the child's only one, holds the signals back,
    # and Python drops those the parent had not handled yet.
    if not getattr(_HOLDING, "on", False):
        _UNBLOCK.clear()  # nothing held for this fork: nothing (stale) to let through
        _as_sigset(_UNBLOCK)
    _HOLDING.on = False
    _RAN_FOR[0] = os.getpid()
    _run_hooks()


def _run_hooks() -> None:
    # Each runs even if one before it failed, as Python runs its own.
    for fn in list(_IN_CHILD):
        try:
            fn()
        except BaseException:  # noqa: BLE001 - the others must still run; said so
            log.exception("sharedpool: the after-fork hook %r failed", fn)


os.register_at_fork(before=_hold, after_in_parent=_let_through, after_in_child=_in_child)
# After those: the parent's flag reset by a C call too; the child's signals let through
# once _in_child ran.
os.register_at_fork(after_in_parent=functools.partial(setattr, _HOLDING, "on", False),
                    after_in_child=_let_through)


def in_child(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` in every forked child, first thing, with signals held back:
    at ``os.fork()`` (Python's at-fork hooks), and from uWSGI's post-fork hook."""
    _IN_CHILD.append(fn)
    return fn


def run_in_forked_child() -> None:
    """Run the hooks, if no fork ran them in this process yet (a uWSGI worker
    forked in C), with signals held back."""
    if _RAN_FOR[0] == os.getpid():
        return
    # No hold of ours is under way in this new process; a handler's exception in
    # _hold (a signal the master had not handled yet) leaves nothing blocked.
    try:
        _HOLDING.on = False
        _UNBLOCK.clear()
        _as_sigset(_UNBLOCK)
        _hold()
    finally:
        try:
            _in_child()
        finally:
            _let_through()


def _hook_uwsgi(uwsgi: Any) -> None:
    """Have uWSGI run :func:`run_in_forked_child` in each process it forks, first
    among its post-fork hooks (a ``@postfork`` function may use a pool).

    Through uwsgidecorators' chain when it loads: importing it later would
    replace a ``uwsgi.post_fork_hook`` set here (and it raises without a
    master process: then ``uwsgi.post_fork_hook`` itself, chained). Its import sets
    ``uwsgi.post_fork_hook``, ``spooler`` and ``mule_msg_hook``: ones the app
    had set itself before are kept."""
    names = ("post_fork_hook", "spooler", "mule_msg_hook")
    before = {name: getattr(uwsgi, name) for name in names if hasattr(uwsgi, name)}
    try:
        import uwsgidecorators

        chain = uwsgidecorators.postfork_chain
    except Exception:  # noqa: BLE001 - not installed, (no master process) it refuses to load,
        # or a stub of an app's tests has no chain
        earlier = before.get("post_fork_hook")

        def chained() -> None:
            run_in_forked_child()
            if earlier is not None:
                earlier()

        uwsgi.post_fork_hook = chained
        return
    if "post_fork_hook" in before and before["post_fork_hook"] is not uwsgidecorators.postfork_chain_hook:
        chain.append(before.pop("post_fork_hook"))  # the app's own, set before the import
        uwsgi.post_fork_hook = uwsgidecorators.postfork_chain_hook
    before.pop("post_fork_hook", None)
    for name, value in before.items():
        setattr(uwsgi, name, value)
    if run_in_forked_child not in chain:
        chain.insert(0, run_in_forked_child)


#: The pid of a uWSGI master that forks its workers without the interpreter
#: lock (no py-call-uwsgi-fork-hooks, no lazy-apps), or 0.
_UNSAFE_MASTER = [0]


def warn_thread_in_uwsgi_master() -> None:
    """Before sharedpool starts a thread: in a uWSGI master that forks without
    the interpreter lock, say once what to set."""
    if _UNSAFE_MASTER[0] != os.getpid():
        return
    _UNSAFE_MASTER[0] = 0
    if _in_uwsgi_master() is None:
        # No master process: the one that loaded the app is worker 1 now, and
        # forks no more (it forked the others before its first request).
        return
    log.warning("sharedpool: a pool is in use in the uWSGI master, whose workers are forked "
                "without Python's fork hooks: one forked while sharedpool's threads take the "
                "interpreter lock hangs for good. Set py-call-uwsgi-fork-hooks = true (or "
                "lazy-apps = true), or use the pools in the workers only (no query at import)")


def _option(uwsgi: Any, name: str) -> bool:
    """Whether uWSGI's boolean option ``name`` is on (given as a flag or a value)."""
    value = uwsgi.opt.get(name)
    if isinstance(value, bytes):
        return value.strip().lower() not in (b"", b"0", b"false", b"off", b"no")
    return bool(value)


def _in_uwsgi_master() -> Any:
    """The ``uwsgi`` module if this is a uWSGI process that has not forked off a
    worker yet (where the app is loaded unless ``lazy-apps``), else None."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or not callable(getattr(uwsgi, "worker_id", None)):
        return None
    try:
        if uwsgi.worker_id() != 0:
            return None
        # A mule or the spooler is worker 0 too, and forks no worker: sharedpool
        # imported there (mule = script.py, spooler-import) is no master's, and a
        # pool used there was warned of as if it were.
        mule, spooler = getattr(uwsgi, "mule_id", None), getattr(uwsgi, "i_am_the_spooler", None)
        if (callable(mule) and mule() != 0) or (callable(spooler) and spooler()):
            return None
        return uwsgi
    except Exception:  # noqa: BLE001 - some other module named uwsgi
        return None


if (_uwsgi := _in_uwsgi_master()) is not None:
    try:
        _hook_uwsgi(_uwsgi)
    except Exception as _exc:  # noqa: BLE001 - some other "uwsgi" (a test's fake): importing must not fail
        log.warning("sharedpool: uWSGI's post-fork hook could not be set (%r): a worker forked "
                    "without Python's fork hooks would use the master's sessions", _exc)
    try:
        _safe = any(_option(_uwsgi, name) for name in ("py-call-uwsgi-fork-hooks", "lazy-apps", "lazy"))
    except Exception:  # noqa: BLE001 - no options to read: nothing said
        _safe = True
    if not _safe:
        _UNSAFE_MASTER[0] = os.getpid()
