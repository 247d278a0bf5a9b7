"""sharedpool against PgBouncer and direct connections (issue 5.8, first bullet).

    python -m benchmarks.pgbouncer [--seconds 5] [--rounds 3] [--json PATH]

8 processes in ``SELECT 1`` loops: (a) 8 direct connections, (b) sharedpool with a
global cap of 4 (each process a local pool, 1 thread, max_size 4), (c) PgBouncer in
transaction mode with ``default_pool_size = max_db_connections = 4``, each process
holding one client connection to it; plus (d) 4 processes with 4 direct connections,
the reference for "as fast as the cap allows". PgBouncer is Debian's ``pgbouncer``,
started here on a free loopback port with a generated ini and userlist in a private
temporary directory (``auth_type = trust``; it connects to 127.0.0.1:5432), in the
foreground as our child, and stopped by pid. The system service is never touched.
As root it runs with ``-u postgres`` (PgBouncer refuses to run as root). If it is
not installed, its column is skipped with the install command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ._common import Settings, console, report_skips, sharedpool_missing
from ._fleet import DSN, Proc, alternate, new_app, pg_missing, ratios, run_fleet
from ._report import bounded_args, no_progress, ratio_table, summarize, write_json
from .fairness import direct_fleet, sharedpool_fleet

PROCS, CAP = 8, 4
DIRECT8, DIRECT4 = f"direct x{PROCS}", f"direct x{CAP}"
SP, PGB = f"sharedpool cap {CAP}", f"pgbouncer pool {CAP}"
INSTALL = "apt-get install pgbouncer"

INI = """\
[databases]
test = host=127.0.0.1 port=5432 dbname=test user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = transaction
default_pool_size = {pool}
max_db_connections = {pool}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 200
"""


def find_pgbouncer() -> str | None:
    """The pgbouncer executable (Debian puts it in /usr/sbin, often not on PATH)."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer") if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> list[str]:
    """PgBouncer will not run as root: ``-u USER`` makes it switch after reading its files."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["-u", user]
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user for pgbouncer -u")


@contextlib.contextmanager
def pgbouncer(exe: str, pool: int = CAP, timeout: float = 15.0) -> Iterator[str]:
    """Run our own PgBouncer (foreground child); yield a DSN to it; stop it by pid."""
    import psycopg

    tmp = tempfile.mkdtemp(prefix="sp-pgbouncer-")
    port = _free_port()
    with open(os.path.join(tmp, "pgbouncer.ini"), "w", encoding="utf-8") as f:
        f.write(INI.format(port=port, dir=tmp, pool=pool))
    with open(os.path.join(tmp, "userlist.txt"), "w", encoding="utf-8") as f:
        f.write('"postgres" ""\n')
    log = open(os.path.join(tmp, "pgbouncer.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, *_run_as(), os.path.join(tmp, "pgbouncer.ini")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    dsn = f"host=127.0.0.1 port={port} dbname=test user=postgres"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                with open(log.name, encoding="utf-8", errors="replace") as f:
                    raise RuntimeError(f"pgbouncer exited with {proc.returncode}: {f.read()[-500:]}")
            try:
                with psycopg.connect(dsn, connect_timeout=2, autocommit=True, prepare_threshold=None) as c:
                    c.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not accept connections within {timeout:g}s") from None
                time.sleep(0.05)
        yield dsn
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # "safe shutdown": closes its server connections
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5.0)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def measure(seconds: float, rounds: int, quiet: float, quantum: float | str | None = None) -> dict[str, Any]:
    console.rule("[bold]sharedpool vs PgBouncer vs direct (issue 5.8)")
    console.print(f"{PROCS} processes in SELECT 1 loops; sharedpool and PgBouncer (transaction mode) capped "
                  f"at {CAP} server connections; {rounds} rounds of {seconds:g}s windows; sharedpool "
                  f"fairness_quantum {'the default' if quantum is None else quantum}")
    if why := pg_missing():
        report_skips({"all": f"PostgreSQL not reachable: {why}"})
        return {"skipped": {"all": why}}
    skipped: dict[str, str] = {}
    if missing := sharedpool_missing():
        skipped[SP] = f"sharedpool not usable ({missing})"
    exe = find_pgbouncer()
    if exe is None:
        skipped[PGB] = f"pgbouncer is not installed; install it with `{INSTALL}` (Debian/Ubuntu)"
    with contextlib.ExitStack() as stack:
        pgb_dsn = None
        if exe is not None:
            try:
                pgb_dsn = stack.enter_context(pgbouncer(exe))
            except Exception as exc:
                skipped[PGB] = f"pgbouncer did not start: {exc}"
        contenders = {
            DIRECT8: lambda: direct_fleet(seconds, PROCS),
            DIRECT4: lambda: direct_fleet(seconds, CAP),
            SP: lambda: sharedpool_fleet(seconds, quantum, PROCS, CAP),
            PGB: lambda: run_fleet([Proc("direct", dsn=pgb_dsn or DSN)] * PROCS, seconds,
                                   app=new_app("pgbouncer")),
        }
        per_round = alternate(contenders, rounds, skipped,
                              progress=lambda m: console.print(f"[dim]{m}[/dim]"), quiet=quiet)
    summary = summarize(per_round, f"Queries/s, median of {rounds} rounds of {seconds:g}s")
    rows = ratio_table([
        (f"{SP} / {PGB}", ratios(per_round, SP, PGB), 1.3),
        (f"{SP} / {DIRECT4}", ratios(per_round, SP, DIRECT4), 0.9),
        (f"{PGB} / {DIRECT4}", ratios(per_round, PGB, DIRECT4), None),
        (f"{SP} / {DIRECT8}", ratios(per_round, SP, DIRECT8), None),
        (f"{DIRECT8} / {DIRECT4}", ratios(per_round, DIRECT8, DIRECT4), None),
    ])
    stalled = no_progress(per_round)
    report_skips(skipped)
    return {"unit": "queries per second (SELECT 1, autocommit)", "processes": PROCS, "cap": CAP,
            "seconds": seconds, "rounds": rounds, "quantum": quantum, "pgbouncer": exe, "contenders": summary,
            "ratios": rows, "no_progress": stalled, "skipped": skipped}


def run(settings: Settings) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks``."""
    return measure(settings.pick(2.0, 5.0), settings.rounds, settings.pick(0.0, 30.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantum", type=float, default=None,
                    help="sharedpool's fairness_quantum in seconds (default: the shipped default)")
    args = bounded_args(ap, argv, seconds=5.0, rounds=3)
    if args.quantum is not None and not 0 <= args.quantum <= 60:
        ap.error("--quantum: 0..60 seconds")
    res = measure(args.seconds, args.rounds, args.wait_quiet, args.quantum)
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
