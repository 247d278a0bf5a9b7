"""Run by tests/test_fork.py: a fork as uWSGI makes it, with a fake ``uwsgi``
module. uWSGI forks its workers in C: Python's at-fork hooks are not run (the
ones sharedpool registers are kept from os.register_at_fork here), and uWSGI
then calls ``uwsgi.post_fork_hook()`` in the child.

argv: socket path, application_name, masterpid (0: no master process, where
uwsgidecorators refuses to import), "hooks" if py-call-uwsgi-fork-hooks is set.
Prints one JSON line: the parent's and the child's backend pids, whether the
child's checkout failed; sharedpool's log goes to stderr."""

from __future__ import annotations

import json
import os
import sys
import types

import psycopg

sock, app_name, masterpid, hooks = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hooks"
uwsgi: types.ModuleType = types.ModuleType("uwsgi")
uwsgi.worker_id = lambda: 0  # type: ignore[attr-defined]
uwsgi.masterpid = lambda: masterpid  # type: ignore[attr-defined]
uwsgi.opt = {"py-call-uwsgi-fork-hooks": b"true"} if hooks else {}  # type: ignore[attr-defined]
sys.modules["uwsgi"] = uwsgi

register = os.register_at_fork
os.register_at_fork = lambda **hooks: None  # type: ignore[assignment]  # sharedpool's: never run
try:
    from sharedpool import ConnectionPool, PoolConfig
finally:
    os.register_at_fork = register

DSN = f"host=127.0.0.1 dbname=test user=postgres application_name={app_name}"
pool = ConnectionPool(lambda: psycopg.connect(DSN, autocommit=True),
                      PoolConfig(min_size=0, max_size=1, acquire_timeout=10), resource="pg",
                      coordinator=sock)
with pool.connection() as conn:
    parent_backend = conn.info.backend_pid

read, write = os.pipe()
pid = os.fork()
if pid == 0:
    hook = getattr(uwsgi, "post_fork_hook", None)
    if hook is not None:
        hook()
    out: dict[str, object] = {"hooked": hook is not None}
    try:
        with pool.connection() as conn:
            out["child_backend"] = conn.info.backend_pid
    except Exception as exc:  # noqa: BLE001 - reported
        out["error"] = repr(exc)
    os.write(write, json.dumps(out).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(read, 65536) or b"{}")
print(json.dumps({"parent_backend": parent_backend, **child}))
pool.close()
