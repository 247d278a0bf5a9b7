"""Helpers shared by the benchmark modules: settings, statistics, tables, machine facts."""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the tables when the output is a file or a pipe (README, CI logs).
console = Console() if sys.stdout.isatty() else Console(width=130)


@dataclass(frozen=True)
class Settings:
    """What the command line asked for."""

    quick: bool
    rounds: int

    def pick(self, quick: float, full: float) -> float:
        return quick if self.quick else full


def sharedpool_missing() -> str | None:
    """None if the sharedpool API the benchmarks program against imports; else why not."""
    try:
        from sharedpool import ConnectionPool, Coordinator, PoolConfig, Resource  # noqa: F401
        from sharedpool.client import Client  # noqa: F401
    except Exception as exc:  # a package being written can fail in any way
        return f"{type(exc).__name__}: {exc}"
    return None


def child_pids() -> set[int]:
    """Pids of all processes descended from this one (empty if psutil is missing)."""
    try:
        import psutil
    except ImportError:
        return set()
    return {c.pid for c in psutil.Process().children(recursive=True)}


def pin(pids: Iterable[int], cpus: set[int]) -> bool:
    """Set the CPU affinity of every thread of ``pids``; False if that cannot be done."""
    try:
        import psutil

        for pid in pids:
            for thread in psutil.Process(pid).threads():
                os.sched_setaffinity(thread.id, cpus)
    except Exception:  # no psutil, no sched_setaffinity, a process gone: run unpinned
        return False
    return True


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values, q in (0, 1]."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def fmt_rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def verdict(met: bool | None) -> str:
    if met is None:
        return "[dim]info[/dim]"
    return "[green]met[/green]" if met else "[red]missed[/red]"


def table(title: str, columns: Sequence[str]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    return t


def report_skips(skipped: dict[str, str]) -> None:
    for name, why in skipped.items():
        console.print(f"[yellow]skipped[/yellow] {name}: {why}")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "versions": {
            d: _version(d)
            for d in ("sharedpool", "psycopg", "psycopg-pool", "SQLAlchemy", "msgpack", "uvloop")
        },
    }


# ------------------------------------------------------------ isolated contenders

Setup = Callable[[ExitStack, Any], Callable[..., Any]]


def _isolated_main(setup: Setup, arg: Any, conn: Any) -> None:
    """Child process: build the contender, then answer calls until told to stop."""
    try:
        with ExitStack() as stack:
            op = setup(stack, arg)
            conn.send(("ok", None))
            while conn.poll(600.0):  # bounded: a parent silent for 10 minutes is gone
                msg = conn.recv()
                if msg is None:
                    break
                conn.send(("ok", op(*msg)))
    except BaseException as exc:  # reported by the parent
        with suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Isolated:
    """One contender in its own (spawned) process, so that no contender's threads,
    garbage or imports tax another's figures. ``setup(stack, arg)`` runs there and
    returns the operation; :meth:`call` runs it there, one call at a time."""

    def __init__(self, setup: Setup, arg: Any = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_isolated_main, args=(setup, arg, theirs), daemon=True)
        self._proc.start()
        theirs.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def ready(self, timeout: float = 60.0) -> None:
        self._recv(timeout)

    def call(self, *args: Any, timeout: float) -> Any:
        self._conn.send(args)
        return self._recv(timeout)

    def _recv(self, timeout: float) -> Any:
        try:
            if not self._conn.poll(timeout):
                raise RuntimeError(f"contender process gave no answer within {timeout:.0f}s")
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("contender process died") from None
        if kind == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        with suppress(OSError):
            self._conn.send(None)
        self._proc.join(timeout=10.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5.0)
        self._conn.close()
