"""Shared by the bench scripts: print a table and write it into docs/benchmarks.md.

Each script owns one section of docs/benchmarks.md, delimited by HTML comments, and
rewrites only that section, with the command, date and machine it was measured on.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table below is written by a script in `bench/`; rerun the command to refresh it.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


PREDICTED = "Computed (predicted by the system model: nothing trained)"


def write_section(name: str, title: str, body: str, predicted: bool = False) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md and print it; ``predicted``: its numbers
    come from the simulated clock and cost model, not from runs, and its header says so."""
    script = Path(sys.argv[0]).resolve().relative_to(DOC.parent.parent).as_posix()
    command = "python " + " ".join([script, *sys.argv[1:]])
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"Command: `{command}`  \n{PREDICTED if predicted else 'Measured'}: {stamp} on {machine()}\n\n{body}\n"
        f"<!-- {name}:end -->"
    )
    print(section)
    text = DOC.read_text() if DOC.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
