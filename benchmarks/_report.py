"""Reporting for fleet benchmarks (``fairness``, ``pgbouncer``, ``skew``): the tables of
medians and of per-round ratios, the bounded command line, JSON without NaN."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import console, fmt_rate, fmt_ratio, median, table, verdict
from ._fleet import FleetResult


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON at ``path`` (a pathlib.Path); NaN becomes null."""
    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and math.isnan(obj):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")


def summarize(per_round: dict[str, list[FleetResult]], title: str,
              roles: Sequence[str] = ()) -> dict[str, Any]:
    """Print one row per contender (medians over rounds); return the figures."""
    cols = ["contender", "procs", "queries/s", *(f"{r} q/s" for r in roles),
            "slowest/fastest", "longest stall", "reconnects/s", "PG peak"]
    t = table(title, cols)
    out: dict[str, Any] = {}
    for name, res in per_round.items():
        row: dict[str, Any] = {
            "processes": len(res[0].procs),
            "queries_per_s": median([r.rate() for r in res]),
            **{f"{role}_queries_per_s": median([r.rate(role) for r in res]) for role in roles},
            "slowest_over_fastest": median([r.spread() for r in res]),
            "longest_stall_ms": median([r.max_gap() * 1000 for r in res]),
            "reconnects_per_s": median([r.connects() / r.seconds for r in res]),
            "pg_peak": max(r.pg_peak for r in res),
            "load_avg": median([r.load for r in res]),
            "others_runnable_before": [r.busy_before for r in res],
            "errors": dict(sum((Counter(r.errors) for r in res), Counter())),
            "per_round_qps": [r.rate() for r in res],
            "per_process_counts": [[p["count"] for p in r.procs] for r in res],
        }
        out[name] = row
        t.add_row(name, str(row["processes"]), fmt_rate(row["queries_per_s"]),
                  *(fmt_rate(row[f"{role}_queries_per_s"]) for role in roles),
                  f"{row['slowest_over_fastest']:.2f}", f"{row['longest_stall_ms']:.0f} ms",
                  fmt_rate(row["reconnects_per_s"]), str(row["pg_peak"]))
    if out:
        console.print(t)
        busy = max(max(r["others_runnable_before"]) for r in out.values())
        if busy > 0.5:
            console.print(f"[yellow]other processes were running before some runs (up to {busy:.1f} "
                          f"runnable on {os.cpu_count()} CPUs): absolute figures are noisy, the per-round "
                          "ratios less so[/yellow]")
    return out


Check = tuple[str, list[float], float | None]


def ratio_table(checks: Sequence[Check]) -> list[dict[str, Any]]:
    """Print ``(label, per-round values, target or None)`` rows; return them as dicts."""
    t = table("Ratios, computed within each round", ["ratio", "per round", "median", "target", ""])
    rows: list[dict[str, Any]] = []
    for label, values, target in checks:
        if not values:
            continue
        med = median(values)
        met = None if target is None else med >= target
        rows.append({"ratio": label, "per_round": values, "median": med, "target": target, "met": met})
        t.add_row(label, " ".join(f"{v:.2f}" for v in values), fmt_ratio(med),
                  "-" if target is None else f">= {target}x", verdict(met))
    if rows:
        console.print(t)
    return rows


def no_progress(per_round: dict[str, list[FleetResult]]) -> list[str]:
    """Contenders in which some process completed no query in some window (printed in red)."""
    stalled = [n for n, res in per_round.items() if any(p["count"] == 0 for r in res for p in r.procs)]
    if stalled:
        console.print(f"[red]a process made no progress in a window: {', '.join(stalled)}[/red]")
    return stalled


def bounded_args(ap: Any, argv: list[str] | None, seconds: float, rounds: int) -> Any:
    """Add --seconds/--rounds/--json to ``ap``, parse, and keep them bounded."""
    ap.add_argument("--seconds", type=float, default=seconds, help=f"counted window per run ({seconds:g})")
    ap.add_argument("--rounds", type=int, default=rounds, help=f"rounds of alternating contenders ({rounds})")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    ap.add_argument("--wait-quiet", type=float, default=30.0, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave the "
                         "CPUs (default 30; 0: never wait)")
    args = ap.parse_args(argv)
    if not 0 < args.seconds <= 120 or not 1 <= args.rounds <= 20 or not 0 <= args.wait_quiet <= 600:
        ap.error("keep it bounded: 0 < --seconds <= 120, 1 <= --rounds <= 20, 0 <= --wait-quiet <= 600")
    return args
