"""Block-layout maps: the state of every block id over time, and where it churns.

Pure numpy, no vLLM or OpenTelemetry. The plugin turns a pool's per-block
state codes into a `BlockMap` (bounded: at most `max_cells` cells of
consecutive block ids, each holding per-state counts) and encodes it
compressed; `report` decodes a pool's maps into a `Layout` and looks for
hotspots: the block-id regions and time windows with the most state changes,
and the holes (runs of unheld blocks) that stayed unheld longest.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# What one block holds, as the map's state codes (index = code); empty and cached are the
# pool's unheld states (vllm.kv_cache.blocks), full + partial + reserved its used blocks:
# empty    not held by any request, no reusable content
# cached   not held, holds a prefix-cache entry (evictable)
# full     held, every token slot computed (by at least one holder)
# partial  held, some token slots computed: a request's growing tail block
# reserved held, no token slot computed yet (allocated ahead of the tokens)
BLOCK_STATES = ("empty", "cached", "full", "partial", "reserved")
EMPTY, CACHED, FULL, PARTIAL, RESERVED = range(len(BLOCK_STATES))
UNHELD = (EMPTY, CACHED)
# the same codes under the names that maps of earlier releases carry (CHANGELOG.md)
FORMER_BLOCK_STATES = ("free", "cached", "full", "partial", "empty")

EVENT_NAME = "vllm.kv_cache.block_map"
ENCODING = "zlib;counts[state][cell];little-endian"
# log record attribute names
A_ENCODING = "vllm.kv_cache.block_map.encoding"
A_STATES = "vllm.kv_cache.block_map.states"
A_DTYPE = "vllm.kv_cache.block_map.dtype"
A_BLOCKS = "vllm.kv_cache.block_map.blocks"
A_BIN = "vllm.kv_cache.block_map.bin_size"
A_CELLS = "vllm.kv_cache.block_map.cells"


@dataclass(frozen=True)
class BlockMap:
    """One pool at one instant. Cell i covers block ids 1 + i*bin_size up to
    1 + (i+1)*bin_size - 1 (the null block 0 is left out; the last cell may be
    short); `counts[s, i]` is how many of them are in state s."""

    time_unix_nano: int
    num_blocks: int
    bin_size: int
    counts: np.ndarray  # (len(BLOCK_STATES), cells), unsigned

    @property
    def cells(self) -> int:
        return int(self.counts.shape[1])

    @classmethod
    def from_states(cls, states: np.ndarray, time_unix_nano: int, max_cells: int) -> BlockMap:
        """`states`: one code per usable block (block id 1 first)."""
        n = int(states.size)
        bin_size = max(1, -(-n // max_cells))
        cells = -(-n // bin_size) if n else 0
        counts = state_counts(states, np.arange(n) // bin_size, cells)
        return cls(time_unix_nano, n, bin_size, counts.astype(_count_dtype(bin_size)))

    def encode(self) -> tuple[bytes, dict[str, object]]:
        """The compressed payload and the attributes needed to read it back."""
        counts = self.counts.astype(self.counts.dtype.newbyteorder("<"), copy=False)
        return zlib.compress(counts.tobytes(), 6), {
            A_ENCODING: ENCODING,
            A_STATES: ",".join(BLOCK_STATES),
            A_DTYPE: self.counts.dtype.name,
            A_BLOCKS: self.num_blocks,
            A_BIN: self.bin_size,
            A_CELLS: self.cells,
        }

    @classmethod
    def decode(cls, payload: bytes, attributes: dict[str, str], time_unix_nano: int) -> BlockMap:
        """Raises ValueError, saying what is wrong, for anything but a well-formed map."""
        if attributes.get(A_ENCODING) != ENCODING:
            raise ValueError(f"unknown block map encoding {attributes.get(A_ENCODING)!r}")
        states = attributes.get(A_STATES, "").split(",")
        if states not in (list(BLOCK_STATES), list(FORMER_BLOCK_STATES)):
            raise ValueError(f"unknown block states {attributes.get(A_STATES)!r}")
        try:
            dtype = np.dtype(attributes[A_DTYPE]).newbyteorder("<")
            num_blocks, bin_size, cells = (int(attributes[a]) for a in (A_BLOCKS, A_BIN, A_CELLS))
            raw = zlib.decompress(payload)
        except (KeyError, TypeError, zlib.error) as exc:
            raise ValueError(f"unreadable block map ({type(exc).__name__}: {exc})") from None
        if dtype.kind != "u" or bin_size < 1 or cells != -(-num_blocks // bin_size):
            raise ValueError(f"inconsistent block map shape: {num_blocks} blocks, bin {bin_size}, {cells} cells")
        if len(raw) != len(BLOCK_STATES) * cells * dtype.itemsize:
            raise ValueError(f"block map payload has {len(raw)} bytes, expected"
                             f" {len(BLOCK_STATES) * cells * dtype.itemsize}")
        counts = np.frombuffer(raw, dtype=dtype).reshape(len(BLOCK_STATES), cells)
        if not np.array_equal(counts.sum(axis=0), cell_sizes(num_blocks, bin_size)):
            raise ValueError("block map counts do not add up to the blocks of each cell")
        return cls(time_unix_nano, num_blocks, bin_size, counts.astype(counts.dtype.newbyteorder("=")))


def state_counts(states: np.ndarray, cell_of: np.ndarray, cells: int) -> np.ndarray:
    """(len(BLOCK_STATES), cells) int64: how many blocks of each cell are in each
    state; `cell_of[i]`: the cell of block `states[i]`."""
    index = states.astype(np.intp)
    index *= cells
    index += cell_of
    return np.bincount(index, minlength=len(BLOCK_STATES) * cells).reshape(len(BLOCK_STATES), cells)


def live_region_bounds(num_blocks: int, regions: int) -> np.ndarray:
    """(R + 1,) where each live-metric region starts, as an index into the usable
    blocks (block id 1 is index 0), and the end: R = min(regions, num_blocks)
    regions of num_blocks // R or one more blocks, region r covering indices
    r * num_blocks // R up to (r + 1) * num_blocks // R - 1."""
    count = min(regions, num_blocks)
    return np.arange(count + 1, dtype=np.int64) * num_blocks // max(count, 1)


def region_counts(states: np.ndarray, regions: int) -> np.ndarray:
    """(len(BLOCK_STATES), R) int64 blocks per state in each of `live_region_bounds`'
    R regions; `states`: one code per usable block (block id 1 first)."""
    bounds = live_region_bounds(int(states.size), regions)
    region_of = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    return state_counts(states, region_of, bounds.size - 1)


def _count_dtype(bin_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if bin_size <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def cell_sizes(num_blocks: int, bin_size: int) -> np.ndarray:
    """Blocks per cell: bin_size, except a shorter last cell."""
    cells = -(-num_blocks // bin_size)
    sizes = np.full(cells, bin_size, dtype=np.int64)
    if cells:
        sizes[-1] = num_blocks - bin_size * (cells - 1)
    return sizes


# -- one pool's maps over time ---------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A pool's maps of one shape, in time order."""

    times: np.ndarray  # (T,) int64 unix ns
    num_blocks: int
    bin_size: int
    counts: np.ndarray  # (T, states, cells) int32
    maps_seen: int = 0  # maps of this shape before `stack` thinned them out

    @property
    def cells(self) -> int:
        return int(self.counts.shape[2])

    def first_block(self, cell: int) -> int:
        return 1 + cell * self.bin_size

    def last_block(self, cell: int) -> int:
        return min(self.num_blocks, (cell + 1) * self.bin_size)


def stack(maps: Sequence[BlockMap], max_maps: int | None = None) -> Layout | None:
    """The maps of the latest shape (a restarted engine may have resized its
    pool), in time order, each time once; None without maps. Beyond `max_maps`,
    evenly spaced ones are kept (the first and the last among them), so that a
    week of maps still fits in memory."""
    if not maps:
        return None
    latest = max(maps, key=lambda m: m.time_unix_nano)
    shape = (latest.num_blocks, latest.bin_size)
    chosen = {m.time_unix_nano: m for m in maps if (m.num_blocks, m.bin_size) == shape}
    ordered = [chosen[t] for t in sorted(chosen)]
    seen = len(ordered)
    if max_maps is not None and seen > max_maps:
        ordered = [ordered[i] for i in np.unique(np.linspace(0, seen - 1, max_maps).round().astype(np.int64))]
    return Layout(
        times=np.array([m.time_unix_nano for m in ordered], dtype=np.int64),
        num_blocks=shape[0],
        bin_size=shape[1],
        counts=np.stack([m.counts.astype(np.int32) for m in ordered]),
        maps_seen=seen,
    )


def churn(layout: Layout) -> np.ndarray:
    """(T-1, cells): blocks that changed state between consecutive maps.

    Exact with one block per cell; with larger cells, changes that swap states
    between blocks of the same cell cancel out, so it is a lower bound. Either
    way, a block that changed and changed back between two maps is not seen.
    """
    return np.abs(np.diff(layout.counts, axis=0)).sum(axis=1) // 2


@dataclass(frozen=True)
class Region:
    """Block ids `first_block`..`last_block` over the whole run."""

    first_block: int
    last_block: int
    changes: int
    share: float  # of all changes
    changes_per_block: float


@dataclass(frozen=True)
class Window:
    """All blocks between two map times (seconds since `start`)."""

    start_s: float
    end_s: float
    changes: int
    share: float
    changes_per_second: float


@dataclass(frozen=True)
class Hole:
    """Block ids `first_block`..`last_block`, all left unheld (empty or cached)
    at the same map and still unheld at `until_s`: memory nobody used.
    `open`: still unheld at the last map (its lifetime is at least this);
    `from_first_map`: unheld since the first map."""

    first_block: int
    last_block: int
    since_s: float
    until_s: float
    open: bool
    from_first_map: bool = False

    @property
    def kind(self) -> str:
        """One of HOLE_KINDS: never_used (unheld at every map: memory the maps never
        saw in use, e.g. beyond the peak), open (still unheld at the last map), ended."""
        if self.open:
            return "never_used" if self.from_first_map else "open"
        return "ended"

    @property
    def blocks(self) -> int:
        return self.last_block - self.first_block + 1

    @property
    def seconds(self) -> float:
        return self.until_s - self.since_s


HOLE_KINDS = ("never_used", "open", "ended")


def region_edges(cells: int, regions: int) -> np.ndarray:
    """Cell indices where each of up to `regions` equal block-id ranges starts (and the end)."""
    return np.unique(np.linspace(0, cells, min(regions, cells) + 1).round().astype(np.int64))


def region_churn(layout: Layout, regions: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(edges, (T-1, len(edges)-1) changes per region between consecutive maps)."""
    edges = region_edges(layout.cells, regions)
    changes = churn(layout)
    return edges, np.add.reduceat(changes, edges[:-1], axis=1) if changes.size else changes[:, :0]


def hot_regions(layout: Layout, regions: int = 32, top: int = 3) -> list[Region]:
    """The block-id ranges (of `regions` equal ones) with the most state changes."""
    edges, per_region = region_churn(layout, regions)
    totals = per_region.sum(axis=0)
    overall = int(totals.sum())
    order = sorted(range(totals.size), key=lambda i: (-totals[i], i))[:top]
    found = []
    for i in order:
        if not totals[i]:
            break
        first, last = layout.first_block(int(edges[i])), layout.last_block(int(edges[i + 1]) - 1)
        found.append(Region(first, last, int(totals[i]), float(totals[i] / overall), float(totals[i] / (last - first + 1))))
    return found


def hot_windows(layout: Layout, seconds: np.ndarray, windows: int = 20, top: int = 3) -> list[Window]:
    """The time windows (of `windows` with equal numbers of map intervals) with the most changes;
    `seconds`: the time of each map on the report's axis."""
    changes = churn(layout).sum(axis=1)
    if not changes.size:
        return []
    edges = np.unique(np.linspace(0, changes.size, min(windows, changes.size) + 1).round().astype(np.int64))
    totals = np.add.reduceat(changes, edges[:-1])
    overall = int(totals.sum())
    found = []
    for i in sorted(range(totals.size), key=lambda i: (-totals[i], i))[:top]:
        if not totals[i]:
            break
        start, end = float(seconds[edges[i]]), float(seconds[edges[i + 1]])
        found.append(Window(start, end, int(totals[i]), float(totals[i] / overall),
                            float(totals[i] / (end - start)) if end > start else float("inf")))
    return found


def unheld_cells(layout: Layout) -> np.ndarray:
    """(T, cells) bool: every block of the cell is empty or cached."""
    unheld = layout.counts[:, list(UNHELD), :].sum(axis=1)
    return unheld == cell_sizes(layout.num_blocks, layout.bin_size)[None, :]


def long_lived_holes(layout: Layout, seconds: np.ndarray, top: int = 5) -> list[Hole]:
    """The `top` holes of each kind (`Hole.kind`) that held the most memory idle,
    blocks x seconds, largest first (then the widest, then the lowest block id).
    `seconds`: the time of each map on the report's axis.

    A cell's streak starts at the map where it became unheld. A hole at map t
    is a maximal run of adjacent unheld cells whose streaks started at the same
    map s; it lives from s until the last map at which that same run exists.
    When a hole shrinks, its surviving part is a hole of its own with the same
    start: a hole overlapping one already listed with the same start is left out.
    """
    unheld = unheld_cells(layout)
    if not unheld.size:
        return []
    steps, cells = unheld.shape
    since = np.zeros(cells, dtype=np.int64)
    keys = []  # (first cell, last cell, since map, seen at map), one row per run per map
    for t in range(steps):
        became = unheld[t] & (~unheld[t - 1] if t else True)
        since = np.where(became, t, since)
        key = np.where(unheld[t], since, -1)
        change = np.flatnonzero(np.diff(key)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [cells]]) - 1
        held = key[starts] >= 0
        if held.any():
            keys.append(np.stack([starts[held], ends[held], key[starts][held], np.full(held.sum(), t)], axis=1))
    if not keys:
        return []
    rows = np.concatenate(keys)
    # the last sighting of every (first, last, since) run
    order = np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))
    rows = rows[order]
    last = np.ones(len(rows), dtype=bool)
    last[:-1] = np.any(rows[1:, :3] != rows[:-1, :3], axis=1)
    rows = rows[last]
    first = 1 + rows[:, 0] * layout.bin_size
    last = np.minimum(layout.num_blocks, (rows[:, 1] + 1) * layout.bin_size)
    area = (last - first + 1) * (seconds[rows[:, 3]] - seconds[rows[:, 2]])
    listed: dict[int, list[Hole]] = {}  # by the map they started at
    chosen: list[Hole] = []
    for i in np.lexsort((first, first - last, -area)):
        hole = Hole(int(first[i]), int(last[i]), float(seconds[rows[i, 2]]), float(seconds[rows[i, 3]]),
                    bool(rows[i, 3] == steps - 1), bool(rows[i, 2] == 0))
        same_start = listed.setdefault(int(rows[i, 2]), [])
        if any(c.first_block <= hole.last_block and hole.first_block <= c.last_block for c in same_start):
            continue
        same_start.append(hole)
        if sum(c.kind == hole.kind for c in chosen) < top:
            chosen.append(hole)
            if len(chosen) == top * len(HOLE_KINDS):
                break
    return chosen


# Heat-map colours (RGB, 0-1) per state: unheld pale, held dark, waste warm.
STATE_COLOURS = np.array([
    (0.96, 0.96, 0.96),  # empty
    (0.62, 0.79, 0.93),  # cached
    (0.13, 0.29, 0.53),  # full
    (0.98, 0.60, 0.20),  # partial
    (0.84, 0.15, 0.16),  # reserved
])


def image(layout: Layout) -> np.ndarray:
    """(cells, T, 3) RGB: each cell's colour is its states' colours mixed by count."""
    shares = (layout.counts / cell_sizes(layout.num_blocks, layout.bin_size)[None, None, :]).astype(np.float32)
    return np.einsum("tsc,sk->ctk", shares, STATE_COLOURS.astype(np.float32)).clip(0.0, 1.0)


def column_edges(seconds: np.ndarray) -> np.ndarray:
    """(T + 1,) the edges of each map's column on a time axis: halfway to its
    neighbours, the outer columns as wide on their open side as on the other
    (one map: one second wide). Uneven map times give uneven columns."""
    seconds = np.asarray(seconds, dtype=np.float64)
    if seconds.size < 2:
        return np.array([seconds[0] - 0.5, seconds[0] + 0.5]) if seconds.size else seconds
    middles = (seconds[1:] + seconds[:-1]) / 2
    return np.concatenate([[2 * seconds[0] - middles[0]], middles, [2 * seconds[-1] - middles[-1]]])
