"""What the CLI prints: human text on stdout, progress on stderr, JSON with --json."""

from __future__ import annotations

import json
import sys

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Results and tables go to stdout; progress bars and notes to stderr, so that
#: `atelier ... > file` captures only the result.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def as_dict(message) -> dict:
    """A protobuf message as the JSON mapping of its proto3 JSON form (bytes as base64)."""
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(value) -> None:
    """One JSON document on one line (NDJSON when called repeatedly)."""
    if hasattr(value, "DESCRIPTOR"):
        value = as_dict(value)
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_table(table) -> None:
    """A table on stdout at its natural width: a terminal's width otherwise truncates
    ids and names, and piped output (80 columns) would cut them."""
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), table).maximum
    wide = Console(file=out.file, width=max(width, out.width), highlight=False,
                   color_system=out.color_system and "auto", force_terminal=out.is_terminal)
    wide.print(table)


def progress_bar(*fields: str, eta: bool = True) -> Progress:
    """A step bar on stderr: description, bar, step/total, extra fields, elapsed, ETA."""
    columns = [TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=err, transient=False)
