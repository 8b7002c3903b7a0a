"""Shared by the benchmark scripts: the Markdown tables they print to stdout, the working directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table: the header, the rule, then one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a Markdown table (see :func:`format_table`)."""
    print("\n".join(format_table(header, rows)))


@contextlib.contextmanager
def working_directory(path: str | os.PathLike) -> Iterator[None]:
    """Run the block in ``path`` (the bundles read ``%bundles/common/...`` relative to the working directory)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
