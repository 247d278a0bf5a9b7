"""The CLI's tables (status, sessions, leases, top), fitted to the width at hand.

A column the width cannot hold is left out whole, the least important first,
and named under its table; the key ones stay down to some 70 columns. No
header or number is split across lines: only names and states wrap (at
spaces), and command lines and call sites are cut with "…". With no width
(``--wide``, or output that is not a terminal), every column is shown at its
full width.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from rich.cells import cell_len
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

#: number: right-justified, never wrapped; text: a name or state, wraps at spaces;
#: long: a command line or call site, cut with "…" to the room left.
Kind = Literal["number", "text", "long"]

#: A name or state longer than this wraps rather than crowd out a column.
TEXT_FIT = 16
#: A command line or call site is shown only with room for this much of it...
LONG_FIT = 20
#: ...and never wider than this.
LONG_MAX = 60


@dataclass(frozen=True)
class Column:
    """A column: its header, the layout of its cells, and when it is left out."""

    header: str
    kind: Kind = "number"
    #: Above 0: left out when the width cannot hold it, highest first; below 0: a key
    #: column, left out only when the key columns cannot fit even narrowed to their
    #: headers (under some 70 columns), -1 first; 0: always shown.
    drop: int = 0


@dataclass(frozen=True)
class Sheet:
    """A table's title, columns and cells, before it is fitted to a width."""

    title: str
    columns: tuple[Column, ...]
    rows: list[list[str]]

    def fit(self, width: int | None) -> tuple[Table, list[str]]:
        """The table for ``width`` columns (None: no limit) and the headers left out."""
        natural = [max([cell_len(c.header), *(cell_len(row[i]) for row in self.rows)])
                   for i, c in enumerate(self.columns)]
        # Widths: counted when choosing the columns, at most, and at least (the header).
        fit, full, floor = [], [], []
        for col, nat in zip(self.columns, natural, strict=True):
            head = cell_len(col.header)
            cap = {"number": nat, "text": max(TEXT_FIT, head), "long": max(LONG_FIT, head)}[col.kind]
            fit.append(min(nat, cap))
            full.append(min(nat, max(LONG_MAX, head)) if col.kind == "long" else nat)
            floor.append(nat if col.kind == "number" else head)
        shown = list(range(len(self.columns)))
        if width is None:
            widths = {i: full[i] for i in shown}
        else:
            for least, sign in ((fit, 1), (floor, -1)):
                for i in sorted((i for i in shown if self.columns[i].drop * sign > 0),
                                key=lambda i: -self.columns[i].drop):
                    if _table_width(least[j] for j in shown) <= width:
                        break
                    shown.remove(i)
            widths = _allot(shown, fit, full, floor, width)
        table = Table(title=self.title, title_justify="left", expand=False)
        for i in shown:
            col = self.columns[i]
            table.add_column(col.header, width=widths[i], no_wrap=col.kind != "text",
                             overflow="fold" if col.kind == "text" else "ellipsis",
                             justify="right" if col.kind == "number" else "left")
        for row in self.rows:
            table.add_row(*(Text(row[i]) for i in shown))  # data (process titles, call sites), not markup
        return table, [c.header for i, c in enumerate(self.columns) if i not in shown]

    def render(self, width: int | None, hint: str) -> list[RenderableType]:
        """The fitted table, and under it a line naming the columns left out and ``hint``."""
        table, hidden = self.fit(width)
        if not hidden:
            return [table]
        return [table, Text(f"hidden: {', '.join(hidden)} ({hint})", style="dim")]


def _table_width(widths: Iterable[int]) -> int:
    """A table's width from its columns' text widths: one space each side, and the rules."""
    listed = list(widths)
    return sum(listed) + 3 * len(listed) + 1


def _allot(shown: list[int], fit: list[int], full: list[int], floor: list[int],
           width: int) -> dict[int, int]:
    """Each shown column's text width: room left goes to names and long columns, in
    their order, up to their full width; when even the key columns do not fit, names
    and states are narrowed (they wrap) down to their headers, widest first."""
    widths = {i: fit[i] for i in shown}
    spare = width - _table_width(widths.values())
    for i in shown:
        grow = min(max(spare, 0), full[i] - widths[i])
        widths[i] += grow
        spare -= grow
    while spare < 0:
        narrower = [i for i in shown if widths[i] > floor[i]]
        if not narrower:
            break  # narrower than the columns always shown: rich crops what it must
        widest = max(narrower, key=lambda i: widths[i] - floor[i])
        widths[widest] -= 1
        spare += 1
    return widths


# ------------------------------------------------------------------ the tables


def duration(seconds: float | None) -> str:
    """``850ms``, ``12.3s``, ``4m05s``, ``2h10m``; ``-`` for None."""
    if seconds is None:
        return "-"
    # The unit is chosen for the figure as printed: 0.9996 s read "1000ms", 59.96 s "60.0s".
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f}ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    if (whole := round(seconds)) < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


#: Control characters in a cell, shown as "?" as ps shows them: a newline in a
#: ``python -c`` script drew one lease over 27 lines, and an escape sequence in a
#: process title would reach the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _sheet(title: str, columns: tuple[Column, ...], rows: list[list[Any]]) -> Sheet:
    return Sheet(title, columns, [[_CONTROL.sub("?", str(v)) for v in row] for row in rows])


#: Left out when narrow: the counters first, then the gauges fewer look at; under
#: some 70 columns, the key ones too, the figures derived from others first.
RESOURCE_COLUMNS = (
    Column("resource", "text"), Column("cap", drop=-7), Column("leased", drop=-6),
    Column("in use", drop=-3), Column("idle", drop=-2), Column("connecting", drop=3),
    Column("fenced", drop=-1), Column("waiting", drop=-4), Column("longest wait", drop=1),
    Column("grants", drop=5), Column("timeouts", drop=2), Column("reclaims", drop=4),
    Column("state", "text", drop=-5),
)
SESSION_COLUMNS = (
    Column("pid"), Column("name", "text", drop=-3), Column("leases", drop=-2), Column("waiters", drop=-1),
    Column("connected", drop=2), Column("last report", drop=1),
)
LEASE_COLUMNS = (
    Column("lease", drop=-1), Column("resource", "text", drop=-4), Column("pid"),
    Column("process", "text", drop=-3), Column("command", "long", drop=1), Column("state", "text", drop=-5),
    Column("age", drop=-2), Column("in state", drop=2), Column("site", "long", drop=3),
)


def _res_state(r: dict[str, Any]) -> str:
    flags = [f for f in ("removed", "paused", "draining", "failing") if r.get(f)]
    if r.get("restart_hold_s") is not None:  # granting nothing while processes re-register
        flags.append(f"restart hold {duration(r['restart_hold_s'])}")
    return ", ".join(flags) or "active"  # wraps at its spaces when narrow


def resources_sheet(resources: list[dict[str, Any]]) -> Sheet:
    """One row per resource."""
    return _sheet("resources", RESOURCE_COLUMNS, [
        [r["name"], r["max_size"], r["leased"], r["in_use"], r["idle"], r.get("connecting", 0),
         r.get("fenced", 0), r["waiting"], duration(r.get("longest_wait_s") or 0.0) if r["waiting"] else "-",
         r["grants"], r["timeouts"], r["reclaims"], _res_state(r)] for r in resources])


def sessions_sheet(sessions: list[dict[str, Any]]) -> Sheet:
    """One row per connected process."""
    return _sheet("sessions", SESSION_COLUMNS, [
        [s["pid"], s["name"], s["leases"], s["waiters"], duration(s["connected_s"]) + " ago",
         "-" if s["last_report_s"] is None else duration(s["last_report_s"]) + " ago"] for s in sessions])


def _lease_state(lease: dict[str, Any]) -> str:
    if lease.get("ends_in_s") is not None:  # fenced: the longest its slot stays taken
        return f"{lease['state']} <={duration(lease['ends_in_s'])}"
    return str(lease["state"]) + (" (leak?)" if lease.get("suspected_leak") else "")


def leases_sheet(leases: list[dict[str, Any]]) -> Sheet:
    """One row per lease."""
    return _sheet("leases", LEASE_COLUMNS, [
        [lease["id"], lease["resource"], lease["pid"], lease["process_name"] or "?",
         shlex.join(lease["cmdline"]) if lease["cmdline"] else "?",
         _lease_state(lease), duration(lease["age_s"]),
         duration(lease["state_s"]), lease.get("site") or "-"]
        for lease in leases])
