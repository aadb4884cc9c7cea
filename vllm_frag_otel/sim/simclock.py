"""The simulator's clock: which wall-clock instant stands for which simulated time.

`simulate` runs vLLM's scheduler as fast as the CPU allows, while one step
stands for `--step-seconds` of serving; the plugin stamps its telemetry with
wall-clock time. So `simulate` writes, beside the telemetry, a clock file
`clock-<pid>-<unix ns>.csv`: a comment line naming the host, the process
and the step length, a header, then after every scheduler step the wall-clock
time (unix ns) and the simulated time (steps x step seconds):

    # vllm-frag-otel simulator clock: host=vm pid=655 step_seconds=0.02
    wall_unix_nano,simulated_seconds
    1795973748123456789,0.02

`report` finds these files among its inputs and, for the process that wrote
one (the same host.name and process.pid in the telemetry's resource), puts
every time axis and duration in simulated seconds since the run began,
linear between two steps (so within one step of the truth); times before the
first step read as the first step, after the last as the last.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_frag_otel.jsonlines import InputProblem

HEADER = "wall_unix_nano,simulated_seconds"
COMMENT = "# vllm-frag-otel simulator clock:"
PATTERN = "clock-*.csv"


class ClockWriter:
    """Appends one (wall-clock, simulated) line per step to a clock file in
    `directory`, which keeps the newest `max_files` clock files (as it keeps
    that many telemetry files per signal)."""

    def __init__(self, directory: Path, step_seconds: float, max_files: int) -> None:
        self.step_seconds = step_seconds
        self.path = directory / f"clock-{os.getpid()}-{time.time_ns()}.csv"
        earlier = sorted(directory.glob(PATTERN), key=lambda p: p.stat().st_mtime)
        for old in earlier[: max(len(earlier) - max_files + 1, 0)]:
            old.unlink(missing_ok=True)
        self._file = open(self.path, "w")
        self._file.write(f"{COMMENT} host={socket.gethostname()} pid={os.getpid()} step_seconds={step_seconds!r}\n"
                         f"{HEADER}\n")

    def tick(self, steps: int) -> None:
        """Say that `steps` steps have run, now."""
        self._file.write(f"{time.time_ns()},{steps * self.step_seconds!r}\n")

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class StepClock:
    """One simulator run's clock file, read back."""

    path: Path
    host: str
    pid: str
    step_seconds: float
    wall_ns: np.ndarray  # int64, increasing
    simulated_s: np.ndarray

    def seconds(self, times_ns) -> np.ndarray:
        """Simulated seconds at wall-clock `times_ns` (unix ns)."""
        origin = self.wall_ns[0]
        return np.interp(np.asarray(times_ns, dtype=np.int64) - origin, self.wall_ns - origin, self.simulated_s)

    @property
    def wall_seconds(self) -> float:
        """Wall-clock seconds from the first step to the last."""
        return float(self.wall_ns[-1] - self.wall_ns[0]) / 1e9


def read(path: Path) -> StepClock:
    """Raises ValueError saying what is wrong with the file."""
    lines = path.read_text().splitlines()
    if len(lines) == 2 and lines[0].startswith(COMMENT) and lines[1] == HEADER:
        raise ValueError("the simulator run stopped before its first step ended (no step recorded): its"
                         " telemetry keeps wall-clock time")
    if len(lines) < 3 or not lines[0].startswith(COMMENT) or lines[1] != HEADER:
        raise ValueError(f"not a simulator clock file (expected a '{COMMENT}' line, '{HEADER}' and one line per step)")
    fields = dict(part.split("=", 1) for part in lines[0][len(COMMENT):].split() if "=" in part)
    try:
        rows = np.array([[float(v) for v in line.split(",")] for line in lines[2:] if line.strip()])
        wall, simulated = rows[:, 0].astype(np.int64), rows[:, 1]
        step_seconds = float(fields["step_seconds"])
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"unreadable simulator clock file ({type(exc).__name__}: {exc})") from None
    if np.any(np.diff(wall) < 0):
        raise ValueError("simulator clock file: wall-clock times go backwards")
    return StepClock(path, fields.get("host", ""), fields.get("pid", ""), step_seconds, wall, simulated)


def find(paths, problems: list[InputProblem]) -> list[StepClock]:
    """The clock files among `paths` (files named clock-*.csv, or in directories);
    unreadable ones are named in `problems`."""
    found: dict[Path, Path] = {}
    for path in paths:
        candidates = sorted(path.rglob(PATTERN)) if path.is_dir() else [path] if path.match(PATTERN) else []
        found.update({c.resolve(): c for c in candidates if c.is_file()})
    clocks = []
    for path in found.values():
        try:
            clocks.append(read(path))
        except (OSError, ValueError) as exc:
            problems.append(InputProblem(path, 0, f"{exc}; file skipped"))
    return clocks
