"""Fairness at the cap (issue 3.7): 8 processes in tight ``SELECT 1`` loops through
sharedpool with a global cap of 4, against 4 direct psycopg connections.

    python -m benchmarks.fairness [--seconds 5] [--rounds 3] [--quanta 0.05,0.2,1.0] [--json PATH]

sharedpool: 8 processes, each a local pool (1 thread, max_size 4) under one
coordinator whose resource ``pg`` has ``max_size=4``. Direct: 4 processes, each one
psycopg connection, the same loop. Every process must make progress. When a process
waits at the cap, holders give a lease back at checkin once it is older than the
resource's ``fairness_quantum``: a close + reconnect per hand-off. The run is repeated
for each quantum in ``--quanta`` (the first is the headline, by default the shipped
default, ``auto``: 120 hand-off times, one figure set by the coordinator from what the
pools measure) to show what the quantum
trades: total throughput against evenness and the longest stall. Contenders alternate
within each round; ratios are taken per round, then the median.

A third peer, "turns by the clock", has no coordinator at all: the 8 processes form
2 groups that take 1 s turns by the clock, each turn a new connection. It is what
moving slots by reconnecting costs by itself on this machine, without messages,
waiting or confirmed closes; the gap between it and sharedpool at the same quantum
is sharedpool's own. The quantum the coordinator set for "auto" is printed per round.

"direct x4 (again)" is the direct peer once more in every round: its ratio to the
first is what the machine's noise alone does to a ratio in this run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from ._common import Settings, console, report_skips, sharedpool_missing
from ._fleet import (
    FleetResult,
    Proc,
    alternate,
    coordinator,
    new_app,
    pg_missing,
    ratios,
    resource_row,
    run_fleet,
)
from ._report import bounded_args, no_progress, ratio_table, summarize, write_json

PROCS, CAP = 8, 4
TARGET_TOTAL, TARGET_SPREAD = 0.9, 0.5
DIRECT = f"direct x{CAP}"
#: The same as DIRECT, run again in every round: how far two runs of one thing differ here.
AGAIN = f"{DIRECT} (again)"
#: The clock-driven turns peer: every process reconnects once per TURN seconds.
TURN = 1.0
TURNS = f"turns by the clock, {TURN:g}s (no coordinator)"
SWEEP: tuple[float | str, ...] = (0.2, 1.0)


def default_quantum() -> float | str:
    """The shipped ``Resource.fairness_quantum`` default ("auto" if sharedpool does not import)."""
    try:
        from sharedpool import Resource
    except Exception:  # a package being written can fail in any way
        return "auto"
    return next(f.default for f in fields(Resource) if f.name == "fairness_quantum")  # type: ignore[return-value]


def sp_name(quantum: float | str) -> str:
    return f"sharedpool q={quantum:g}s" if isinstance(quantum, int | float) else f"sharedpool q={quantum}"


def parse_quanta(text: str) -> list[float | str]:
    """``"auto,0.2,1"`` -> ``["auto", 0.2, 1.0]``; ValueError names what is wrong."""
    out: list[float | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "auto":
            out.append(part)
            continue
        value = float(part)
        if not 0 <= value <= 60:
            raise ValueError(f"{part}: seconds between 0 and 60")
        out.append(value)
    if not out:
        raise ValueError("no quantum given")
    return out


def direct_fleet(seconds: float, n: int = CAP) -> FleetResult:
    """``n`` processes, each one direct psycopg connection in a SELECT 1 loop."""
    return run_fleet([Proc("direct")] * n, seconds, app=new_app("direct"))


def sharedpool_fleet(seconds: float, quantum: float | str | None = None, procs: int = PROCS,
                     cap: int = CAP) -> FleetResult:
    """``procs`` processes, each a local pool (1 thread, max_size ``cap``) under one global ``cap``."""
    limits = {} if quantum is None else {"fairness_quantum": quantum}
    with coordinator(cap, **limits) as sock:
        return run_fleet([Proc("pool", max_size=cap)] * procs, seconds, app=new_app("sp"), sock=sock,
                         probe=lambda: resource_row(sock))


def turns_fleet(seconds: float, turn: float = TURN, procs: int = PROCS, cap: int = CAP) -> FleetResult:
    """No coordinator: ``procs`` processes in ``procs // cap`` groups take turns of ``turn``
    seconds by the clock, reconnecting each turn: ``cap`` connections at a time, give or take
    a backend still exiting at a turn's end."""
    groups = procs // cap
    return run_fleet([Proc("turns", turn=turn, group=i % groups, groups=groups) for i in range(procs)],
                     seconds, app=new_app("turns"))


def measure(seconds: float, rounds: int, quiet: float, quanta: list[float | str]) -> dict[str, Any]:
    console.rule("[bold]Fairness at the cap (issue 3.7)")
    console.print(f"{PROCS} processes x 1 thread in SELECT 1 loops, global cap {CAP} (local max_size {CAP}), "
                  f"against {CAP} direct connections; {rounds} rounds of {seconds:g}s windows; "
                  f"fairness_quantum {', '.join(sp_name(q)[len('sharedpool q='):] for q in quanta)} "
                  "(first: headline)")
    if seconds < 5 * TURN:
        console.print(f"[yellow]{seconds:g}s windows hold only a few turns of about {TURN:g}s: whichever "
                      "process gets one turn more than another sets slowest/fastest; take the "
                      "5 s default for that figure[/yellow]")
    if why := pg_missing():
        report_skips({"all": f"PostgreSQL not reachable: {why}"})
        return {"skipped": {"all": why}}
    skipped: dict[str, str] = {}
    if missing := sharedpool_missing():
        skipped.update({sp_name(q): f"sharedpool not usable ({missing})" for q in quanta})
    contenders = {DIRECT: lambda: direct_fleet(seconds), TURNS: lambda: turns_fleet(seconds)}
    for i, q in enumerate(quanta):
        contenders[sp_name(q)] = lambda q=q: sharedpool_fleet(seconds, q)  # type: ignore[misc]
        if i == 0:
            # After the headline, not next to DIRECT: as far from it as the runs it is
            # compared with, so the drift within a round shows in the noise too.
            contenders[AGAIN] = lambda: direct_fleet(seconds)
    per_round = alternate(contenders, rounds, skipped,
                          progress=lambda m: console.print(f"[dim]{m}[/dim]"), quiet=quiet)
    summary = summarize(per_round, f"Queries/s, median of {rounds} rounds of {seconds:g}s")
    checks: list[tuple[str, list[float], float | None]] = [
        (f"{AGAIN} / {DIRECT} queries/s (the noise)", ratios(per_round, AGAIN, DIRECT), None),
        (f"{TURNS} / {DIRECT} queries/s", ratios(per_round, TURNS, DIRECT), None)]
    for i, q in enumerate(quanta):
        name, tag = sp_name(q), " (headline)" if i == 0 else ""
        if name in per_round:
            checks += [(f"{name} / {DIRECT} queries/s{tag}", ratios(per_round, name, DIRECT), TARGET_TOTAL),
                       (f"{name} slowest / fastest process{tag}", [r.spread() for r in per_round[name]],
                        TARGET_SPREAD)]
    rows = ratio_table(checks)
    quanta_set = {}
    for q in quanta:
        seen = [r.resource.get("fairness_quantum_s") for r in per_round.get(sp_name(q), [])]
        if seen:
            quanta_set[sp_name(q)] = seen
            console.print(f"{sp_name(q)}: quantum the coordinator set, per round: "
                          + " ".join("-" if v is None else f"{v:.2f}s" for v in seen))
    stalled = no_progress(per_round)
    report_skips(skipped)
    return {"unit": "queries per second (SELECT 1, autocommit)", "processes": PROCS, "cap": CAP,
            "seconds": seconds, "rounds": rounds, "quanta": quanta, "contenders": summary,
            "ratios": rows, "no_progress": stalled, "skipped": skipped, "quantum_set_s": quanta_set}


def run(settings: Settings) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks``."""
    q = default_quantum()
    return measure(settings.pick(2.0, 5.0), settings.rounds, settings.pick(0.0, 30.0),
                   [q] + [s for s in SWEEP if s != q])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quanta", default=None,
                    help="comma-separated fairness quanta in seconds or 'auto'; the first is the "
                         "headline (default: the shipped default, then 0.2 and 1.0)")
    args = bounded_args(ap, argv, seconds=5.0, rounds=3)
    q = default_quantum()
    quanta = [q] + [s for s in SWEEP if s != q]
    if args.quanta:
        try:
            quanta = parse_quanta(args.quanta)
        except ValueError as exc:
            ap.error(f"--quanta: comma-separated seconds (0..60) or 'auto', got {args.quanta!r} ({exc})")
    res = measure(args.seconds, args.rounds, args.wait_quiet, quanta)
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
