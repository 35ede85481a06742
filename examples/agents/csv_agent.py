"""A small agent for ``type: agent`` steps: it summarizes CSV text with the standard library.

An agent is any callable ``agent(prompt, input)``; parexec passes the step's
``config.prompt`` (text) and ``config.input`` (any value) and the return value is the
step's output. Used by ``examples/pipelines/agent.yaml``; run it with this folder on the
import path::

    PYTHONPATH=examples/agents parexec run examples/pipelines/agent.yaml --verbose

``examples/pipelines/foreach.yaml`` calls ``summarize_file`` once per CSV file of a folder.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any


def summarize(prompt: str, input: Any) -> str:
    """Column names, row count and the mean of every numeric column of the CSV text ``input``."""
    if not isinstance(input, str) or not input.strip():
        raise ValueError(f"{prompt!r}: the input must be CSV text with a header line")
    rows = list(csv.DictReader(io.StringIO(input)))
    columns = list(rows[0]) if rows else next(csv.reader(io.StringIO(input)))
    means = []
    for column in columns:
        try:
            values = [float(row[column]) for row in rows]
        except (TypeError, ValueError):
            continue  # not a numeric column
        if values:
            means.append(f"{column} {statistics.fmean(values):.2f}")
    return (f"{prompt}: {len(rows)} rows, columns {', '.join(columns)}; "
            f"means: {', '.join(means) or 'no numeric column'}")


def summarize_file(prompt: str, input: Any) -> str:
    """``summarize`` of the CSV file at path ``input``, named by the file's name."""
    path = Path(input)
    return summarize(f"{prompt} {path.name}", path.read_text(encoding="utf-8"))


def count_rows(prompt: str, input: Any) -> int:
    """The number of data rows of the CSV text ``input`` (the prompt is not used)."""
    return len(list(csv.DictReader(io.StringIO(input or ""))))
