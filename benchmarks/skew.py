"""Skewed load (issue 5.8, second bullet): one hot process and the rest nearly idle,
a global cap of 8, sharedpool against a static split of the cap.

    python -m benchmarks.skew [--seconds 5] [--rounds 3] [--procs 4] [--threads 4]
                              [--query-ms 1] [--think-ms 0.2] [--json PATH]

gthread-style processes (``--procs`` x ``--threads``). Process 0 is hot: every thread
loops checkout -> query -> checkin -> think ``--think-ms`` (jittered 0.5-1.5x). The
others are nearly idle: each thread runs one query every ~100 ms (jittered). The query
holds its connection ``--query-ms`` on the server (``SELECT pg_sleep(...)``, a stand-in
for a small real query; 0 means ``SELECT 1``). sharedpool: one coordinator with a cap
of 8, each process a local pool of max_size 8. Static split: each process its own pool
of cap/N = 2 connections (sharedpool's ConnectionPool standalone, no coordinator; and
psycopg_pool with min = max = 2 for reference). The cap is the same; only who may use
it differs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import Settings, console, report_skips, sharedpool_missing
from ._fleet import Proc, alternate, coordinator, new_app, pg_missing, ratios, run_fleet
from ._report import bounded_args, no_progress, ratio_table, summarize, write_json

CAP = 8
TARGET = 1.5
IDLE_EVERY = 0.1
SP, STATIC, PSYCOPG = f"sharedpool cap {CAP}", "static split (ConnectionPool)", "static split (psycopg_pool)"


def fleet(procs: int, threads: int, query_ms: float, think_ms: float, mode: str,
          max_size: int) -> list[Proc]:
    query = f"SELECT pg_sleep({query_ms / 1000:g})" if query_ms > 0 else "SELECT 1"
    hot = Proc(mode, threads=threads, max_size=max_size, think=think_ms / 1000, jitter=True,
               query=query, role="hot")
    idle = Proc(mode, threads=threads, max_size=max_size, think=IDLE_EVERY, jitter=True,
                query=query, role="idle")
    return [hot] + [idle] * (procs - 1)


def measure(seconds: float, rounds: int, quiet: float, procs: int, threads: int, query_ms: float,
            think_ms: float) -> dict[str, Any]:
    share = CAP // procs
    console.rule("[bold]Skewed load: sharedpool vs a static split of the cap (issue 5.8)")
    console.print(f"{procs} processes x {threads} threads, 1 hot (think {think_ms:g} ms) and {procs - 1} "
                  f"nearly idle (a query every ~{IDLE_EVERY * 1000:.0f} ms per thread); query holds its "
                  f"connection {query_ms:g} ms; global cap {CAP}: sharedpool (local max_size {CAP}) vs "
                  f"{share} per process; {rounds} rounds of {seconds:g}s windows")
    if why := pg_missing():
        report_skips({"all": f"PostgreSQL not reachable: {why}"})
        return {"skipped": {"all": why}}
    skipped: dict[str, str] = {}
    if missing := sharedpool_missing():
        skipped[SP] = skipped[STATIC] = f"sharedpool not usable ({missing})"

    def shared() -> Any:
        with coordinator(CAP) as sock:
            return run_fleet(fleet(procs, threads, query_ms, think_ms, "pool", CAP), seconds,
                             app=new_app("skew-sp"), sock=sock)

    contenders = {
        SP: shared,
        STATIC: lambda: run_fleet(fleet(procs, threads, query_ms, think_ms, "pool", share), seconds,
                                  app=new_app("skew-static")),
        PSYCOPG: lambda: run_fleet(fleet(procs, threads, query_ms, think_ms, "psycopg_pool", share),
                                   seconds, app=new_app("skew-psycopg")),
    }
    per_round = alternate(contenders, rounds, skipped, quiet=quiet,
                          progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    summary = summarize(per_round, f"Queries/s, median of {rounds} rounds of {seconds:g}s",
                        roles=("hot", "idle"))
    rows = ratio_table([
        (f"{SP} / {STATIC}", ratios(per_round, SP, STATIC), TARGET),
        (f"{SP} / {PSYCOPG}", ratios(per_round, SP, PSYCOPG), None),
        (f"{STATIC} / {PSYCOPG}", ratios(per_round, STATIC, PSYCOPG), None),
    ])
    over = {n: max(r.pg_peak for r in res) for n, res in per_round.items()
            if max(r.pg_peak for r in res) > CAP}
    if over:
        console.print(f"[red]PostgreSQL saw more than the cap of {CAP}: {over}[/red]")
    stalled = no_progress(per_round)
    report_skips(skipped)
    return {"unit": "queries per second", "cap": CAP, "processes": procs, "threads": threads,
            "query_ms": query_ms, "think_ms": think_ms, "idle_every_s": IDLE_EVERY, "seconds": seconds,
            "rounds": rounds, "contenders": summary, "ratios": rows, "over_cap": over,
            "no_progress": stalled, "skipped": skipped}


def run(settings: Settings) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks``."""
    return measure(settings.pick(2.0, 5.0), settings.rounds, settings.pick(0.0, 30.0), 4, 4, 1.0, 0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4, help="processes, 1 hot (default 4; must divide 8)")
    ap.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    ap.add_argument("--query-ms", type=float, default=1.0,
                    help="server time a query holds its connection (default 1; 0: SELECT 1)")
    ap.add_argument("--think-ms", type=float, default=0.2, help="hot threads' pause between queries")
    args = bounded_args(ap, argv, seconds=5.0, rounds=3)
    if args.procs < 2 or CAP % args.procs or not 1 <= args.threads <= 32:
        ap.error(f"--procs: 2..{CAP} dividing {CAP}; --threads: 1..32")
    if not 0 <= args.query_ms <= 1000 or not 0 <= args.think_ms <= 1000:
        ap.error("--query-ms and --think-ms: 0..1000")
    res = measure(args.seconds, args.rounds, args.wait_quiet, args.procs, args.threads, args.query_ms,
                  args.think_ms)
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
