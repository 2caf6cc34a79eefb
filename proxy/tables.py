"""How the report's views look: a table drawn by rich for a terminal (narrowed to its
width), aligned plain text for a pipe, and CSV.

Names in the rows were chosen by clients (models, keys, sessions): they are rich Text,
never markup, in a terminal, and made inert for a spreadsheet in CSV.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from .views import STAT_FIELDS

_VIEW_LABELS = {"daily": ("day", "day"), "monthly": ("month", "month"),
                "session": ("session", "session"), "blocks": ("block_start", "block (UTC)"),
                "models": ("model", "model"), "keys": ("key", "proxy key")}
WIDE = 140  # columns a terminal needs for the whole table
_VIEW_TITLES = {"daily": "Usage per day", "monthly": "Usage per month",
                "session": "Usage per session", "blocks": "Usage per 5-hour block",
                "models": "Usage per model", "keys": "Usage per proxy key"}
_VIEW_COLUMNS = (("requests", "requests"), ("input_tokens", "input"),
                 ("output_tokens", "output"), ("cache_write_tokens", "cache write"),
                 ("cache_read_tokens", "cache read"), ("cache_hit_ratio", "cache hit"),
                 ("cost_usd", "cost USD"), ("ttft_p50_ms", "TTFT p50"),
                 ("failed_requests", "failed"))


def _view_cells(report: dict, row: dict, label: str, compact: bool = False) -> list[str]:
    first = "-" if row.get(label) is None else str(row[label])
    if report["view"] == "blocks":
        first = row[label][:16].replace("T", " ") + (" (active)" if row["active"] else "")
    cells = [first]
    if "models" in row and not compact:
        cells.append(", ".join(row["models"]) or "-")
    return cells + [_view_cell(column, row[column], compact) for column, _ in _VIEW_COLUMNS]


def _view_cell(column: str, value: Any, compact: bool = False) -> str:
    if value is None:
        return "-"
    if compact and column.endswith("_tokens") and value >= 10_000:
        return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if column == "cache_hit_ratio":
        return f"{value:.1%}"
    if column == "cost_usd":
        return f"{value:,.2f}" if compact else f"{value:,.4f}"
    if column == "ttft_p50_ms":
        return f"{value:,.0f}" if compact else f"{value:,.0f} ms"
    return f"{value:,}"


def render_view(report: dict, rich_terminal: bool = False, width: int | None = None) -> str:
    """A view as a table: drawn by rich for a terminal, plain aligned text when piped.  A
    terminal narrower than WIDE gets token counts in k/M and no models column."""
    label, title = _VIEW_LABELS[report["view"]]
    if rich_terminal:
        from rich.console import Console
        width = width or Console().width
    compact = rich_terminal and width < WIDE
    with_models = report["view"] not in ("models", "keys") and not compact
    header = [title] + (["models"] if with_models else []) + [
        ("reqs" if compact and h == "requests" else "TTFT ms" if compact and h == "TTFT p50"
         else h) for _, h in _VIEW_COLUMNS]
    body = [_view_cells(report, row, label, compact) for row in report["rows"]]
    totals = ["total"] + ([""] if with_models else []) + [
        _view_cell(c, report["totals"][c], compact) for c, _ in _VIEW_COLUMNS]
    heading = (f"{_VIEW_TITLES[report['view']]}, from {report['since'] or 'the beginning'} "
               f"until {report['until']}"
               + (f" (days in {report['timezone']})" if report.get("timezone") else " (UTC)"))
    notes = _block_notes(report)
    if rich_terminal:
        return _rich_table(heading, header, body, totals, notes, width)
    lines = [heading, ""]
    if body:
        widths = [max(len(r[i]) for r in [header, *body, totals]) for i in range(len(header))]
        lines += [_view_line(r, widths, with_models) for r in [header, *body, totals]]
    else:
        lines.append("(no requests)")
    return "\n".join(lines + notes) + "\n"


def _view_line(cells: list[str], widths: list[int], with_models: bool) -> str:
    texts = 2 if with_models else 1  # the label (and models) left, the numbers right
    return "  ".join(c.ljust(w) if i < texts else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def _block_notes(report: dict) -> list[str]:
    if report["view"] != "blocks":
        return []
    active = [r for r in report["rows"] if r.get("active")]
    if not active:
        return ["", "No active block."]
    block = active[0]
    rate, projection = block["burn_rate"], block["projection"]
    return ["", f"Active block until {block['block_end']}: burning "
            f"${rate['cost_usd_per_hour']:,.4f}/hour, {rate['tokens_per_minute']:,.0f} tokens/minute;"
            f" projected ${projection['cost_usd']:,.4f} and {projection['tokens']:,} tokens by its "
            f"end ({projection['remaining_minutes']:,.0f} minutes left)."]


def _rich_table(heading: str, header: list[str], body: list[list[str]], totals: list[str],
                notes: list[str], width: int) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=heading, show_footer=bool(body), header_style="bold", padding=(0, 1),
                  collapse_padding=True)
    for index, (name, foot) in enumerate(zip([h.replace(" ", "\n") for h in header], totals)):
        numeric = index >= (2 if header[1] == "models" else 1)
        table.add_column(name, footer=Text(foot), justify="right" if numeric else "left",
                         no_wrap=numeric, overflow="fold", min_width=None if numeric else 10)
    for row in body:  # Text: a model or session a client named is never read as markup
        table.add_row(*(Text(cell) for cell in row))
    console = Console(force_terminal=True, width=width)
    with console.capture() as captured:
        console.print(table if body else Text(f"{heading}\n(no requests)"))
        for line in notes:
            console.print(Text(line))
    return captured.get()


def render_view_csv(report: dict) -> str:
    """One CSV row per view row: its label, its models (space-separated) and every figure."""
    label, _ = _VIEW_LABELS[report["view"]]
    extra = {"session": ["first_at", "last_at"], "blocks": ["block_end", "active"]}.get(
        report["view"], [])
    with_models = report["view"] not in ("models", "keys")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([label, *extra, *(["models"] if with_models else []), *STAT_FIELDS])
    for row in report["rows"]:
        writer.writerow([_csv_text(row.get(label)), *(row[e] for e in extra),
                         *([_csv_text(" ".join(row["models"]))] if with_models else []),
                         *("" if row[f] is None else row[f] for f in STAT_FIELDS)])
    return out.getvalue()


def _csv_text(value: Any) -> Any:
    """A name a client chose, made inert for a spreadsheet (=, +, -, @ start a formula)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
