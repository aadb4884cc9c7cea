"""Reading JSON-lines input that people hand us: every bad line is reported by
file and line number and skipped, so one truncated write never hides the rest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Bad lines named one by one per file; beyond this they are counted (a binary
# or foreign file would otherwise bury everything else).
NAMED_BAD_LINES = 10


@dataclass(frozen=True)
class InputProblem:
    """Something wrong at one place in one input file (line 0: the file as a whole)."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.message}"


def json_records(path: Path, problems: list[InputProblem], skipping: bool = True) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for each non-blank line of `path`.

    A `.json` file holding one (possibly pretty-printed) document is yielded
    whole, as line 1. Lines that are not JSON become problems (saying they are
    skipped, when `skipping`); a last line without its newline is called out as
    a truncated write.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        problems.append(InputProblem(path, 0, f"cannot read: {exc.strerror or exc}"))
        return
    if path.suffix == ".json":
        try:
            yield 1, json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # JSON lines under a .json name
    lines = text.split("\n")
    bad = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            bad += 1
            truncated = number == len(lines) and not text.endswith("\n")
            if bad <= NAMED_BAD_LINES or truncated:
                what = "truncated line (the file ends mid-record)" if truncated else "not valid JSON"
                problems.append(InputProblem(path, number, f"{what}: {exc.msg} (column {exc.colno})"
                                                           + "; line skipped" * skipping))
    if bad > NAMED_BAD_LINES:
        problems.append(InputProblem(path, 0, f"{bad} lines are not valid JSON in all (the first {NAMED_BAD_LINES}"
                                              " named above)" + "; all skipped" * skipping))
