"""``python -m benchmarks``: run the benchmark modules, print tables, optionally write JSON."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from ._common import Settings, console, machine_info, sharedpool_missing

MODULES = ("checkout", "roundtrip", "lease_ops", "fairness", "pgbouncer", "skew")


def _runner(name: str) -> Callable[[Settings], dict[str, Any]]:
    run: Callable[[Settings], dict[str, Any]] = import_module(f"benchmarks.{name}").run
    return run


def _clean(obj: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _modules(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in MODULES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(MODULES)}; got {value!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, 3 rounds by default")
    parser.add_argument("--rounds", type=int, help="rounds of alternating contenders (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument("--only", type=_modules, default=list(MODULES),
                        help=f"comma-separated subset of: {', '.join(MODULES)}")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    settings = Settings(quick=args.quick, rounds=rounds)

    machine = machine_info()
    console.print(
        f"[bold]sharedpool benchmarks[/bold]  {machine['cpu_model']} x{machine['cpus']}, "
        f"Python {machine['python']}, {machine['platform']}"
    )
    if missing := sharedpool_missing():
        console.print(f"[yellow]sharedpool is not importable ({missing}): "
                      "its contenders are skipped, the peers still run[/yellow]")
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {"quick": settings.quick, "rounds": settings.rounds},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name in args.only:
        results[name] = _runner(name)(settings)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(results), indent=2) + "\n", encoding="utf-8")
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
