"""What-if: the same workload on vLLM's real scheduler, once per setting.

Settings vary block size, KV memory (number of blocks), prefix caching and
max sequences; the KV-cache layout (`sim.LAYOUTS`) is the same in every row.
A block-size change keeps the KV memory (token slots) of its row, as on a
real GPU, where the memory is fixed and the block size divides it.
The recommendation is the table's best row among those that need no more
memory than the baseline, by mean request latency (steps x --step-seconds),
then preemptions, then failed allocations; a change is recommended only if it
cuts the baseline's mean latency by at least `MATERIAL` (a smaller gain in a
simulation is no reason to change a production setting).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.analysis.plots import Chart, Line, Panel, render as draw
from vllm_frag_otel.analysis.summary import pct

MATERIAL = 0.02
# The longest request the simulator's model takes unless told otherwise (--max-model-len).
DEFAULT_MODEL_LEN = 4096


@dataclass(frozen=True)
class Setting:
    block_size: int
    num_blocks: int  # including vLLM's null block
    prefix_caching: bool
    max_num_seqs: int
    layout: str = "full"  # a `sim.LAYOUTS` preset or a group description
    model_len_limit: int = DEFAULT_MODEL_LEN  # the longest model length asked for; the pool may hold less

    @property
    def kv_slots(self) -> int:
        """KV memory, in token slots (the null block holds none)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def max_model_len(self) -> int:
        """vLLM refuses a model longer than its pool at start-up; so does the simulator.

        With several KV-cache groups a request holds blocks in each of them at
        once: the longest request whose blocks fit the pool in every group
        together (`blocks_per_request`). At most `model_len_limit`."""
        usable, longest = self.num_blocks - 1, min(self.model_len_limit, self.kv_slots)
        groups = sim.parse_layout(self.layout)
        if blocks_per_request(groups, longest, self.block_size) <= usable:
            return longest
        low, high = 0, longest  # the need grows with the length: bisect for the longest that fits
        while low < high:
            middle = (low + high + 1) // 2
            if blocks_per_request(groups, middle, self.block_size) <= usable:
                low = middle
            else:
                high = middle - 1
        return low

    @property
    def can_prefix_cache(self) -> bool:
        """False for layouts with Mamba states outside "align" mode: vLLM cannot prefix-cache those."""
        return sim.EngineShape(layout=self.layout).prefix_caching

    @property
    def label(self) -> str:
        cache = "on" if self.prefix_caching else "off"
        return f"block {self.block_size}, {self.num_blocks} blocks, prefix cache {cache}, {self.max_num_seqs} seqs"

    def shape(self, max_num_batched_tokens: int = 2048) -> sim.EngineShape:
        return sim.EngineShape(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.prefix_caching,
            layout=self.layout,
        )

    def with_block_size(self, block_size: int) -> Setting:
        """The same KV memory cut into blocks of `block_size` (ValueError if not even one fits)."""
        if block_size > self.kv_slots:
            raise ValueError(f"blocks of {block_size} tokens do not fit in {self.kv_slots} token slots of KV memory")
        return replace(self, block_size=block_size, num_blocks=self.kv_slots // block_size + 1)


def blocks_per_request(groups: Sequence[sim.GroupSpec], length: int, block_size: int) -> int:
    """The most blocks one request of `length` tokens can hold, every group together.

    vLLM's own start-up bounds, taken for the longest prefill chunk: a sliding
    window holds at most the whole request plus one block (the window can start
    mid-block), an attention chunk or R-SWA at most the whole request; a ring
    buffer one block, a Mamba group one state block per request, two in "align"
    mode. A kind not listed here is taken to need the most (the whole request
    and one block)."""
    whole = -(-length // block_size)
    need = {"full": whole, "mla": whole, "sliding_window": whole + 1, "sliding_window_mla": whole + 1,
            "chunked_local": whole, "rswa": whole, "circular_buffer": 1, "mamba": 1, "mamba_align": 2}
    return sum(need.get(g.kind, whole + 1) for g in groups)


@dataclass(frozen=True)
class Outcome:
    """One run's row of the table."""

    setting: Setting
    steps: int
    internal_fragmentation: float  # mean over steps
    unused_slots: float  # mean over steps
    slot_utilization: float  # mean over steps
    preemptions: int
    failed_allocations: int
    allocation_attempts: int
    prefix_hit_rate: float  # of looked-up tokens
    tokens_per_step: float  # mean over steps that scheduled any
    mean_latency_s: float  # request arrival to its last token

    @property
    def objective(self) -> tuple[float, int, int]:
        return (self.mean_latency_s, self.preemptions, self.failed_allocations)


COLUMNS = (  # (header, attribute, format)
    ("internal frag", "internal_fragmentation", pct),
    ("preemptions", "preemptions", str),
    ("failed allocs", "failed_allocations", str),
    ("prefix hits", "prefix_hit_rate", pct),
    ("tokens/step", "tokens_per_step", lambda v: f"{v:.1f}"),
    ("steps", "steps", str),
    ("latency s", "mean_latency_s", lambda v: f"{v:.3f}"),
)


def settings(
    base: Setting,
    block_sizes: Sequence[int] = (),
    num_blocks: Sequence[int] = (),
    prefix_caching: Sequence[bool] = (),
    max_num_seqs: Sequence[int] = (),
    grid: bool = False,
) -> list[Setting]:
    """The baseline first, then each axis's values varied alone (or, with `grid`,
    every combination). `num_blocks` counts blocks of the baseline's size. Every
    setting keeps the baseline's layout; a layout that cannot prefix-cache gets
    prefix caching off in every row (turning it on would change nothing)."""
    if not base.can_prefix_cache:
        base = replace(base, prefix_caching=False)
        prefix_caching = [False] if prefix_caching else []
    axes = [
        [replace(base, num_blocks=n) for n in num_blocks] or [base],
        list(block_sizes) or [base.block_size],
        list(prefix_caching) or [base.prefix_caching],
        list(max_num_seqs) or [base.max_num_seqs],
    ]

    def make(memory: Setting, block_size: int, cache: bool, seqs: int) -> Setting:
        return replace(memory.with_block_size(block_size), prefix_caching=cache, max_num_seqs=seqs)

    if grid:
        combos = [make(*combo) for combo in itertools.product(*axes)]
    else:
        defaults = [base, base.block_size, base.prefix_caching, base.max_num_seqs]
        combos = [make(*(defaults[:i] + [value] + defaults[i + 1:])) for i, axis in enumerate(axes) for value in axis]
    runs = list(dict.fromkeys([base, *combos]))
    for setting in runs:
        if setting.max_model_len < 1:
            least = blocks_per_request(sim.parse_layout(setting.layout), 1, setting.block_size)
            raise ValueError(f"{setting.label}: too few blocks for layout {setting.layout}, where one request needs"
                             f" {least} usable blocks or more across its KV-cache groups")
    return runs


def default_axes(base: Setting) -> dict[str, list]:
    """Halve and double each number, prefix caching both ways."""
    return {
        "block_sizes": sorted({max(1, base.block_size // 2), base.block_size, base.block_size * 2}),
        "num_blocks": [max(2, (base.num_blocks - 1) // 2 + 1), base.num_blocks, (base.num_blocks - 1) * 2 + 1],
        "prefix_caching": [True, False] if base.can_prefix_cache else [],
        "max_num_seqs": sorted({max(1, base.max_num_seqs // 2), base.max_num_seqs, base.max_num_seqs * 2}),
    }


def measure(setting: Setting, result: sim.RunResult) -> Outcome:
    """The table row of one `sim.RunResult`."""
    final = result.snapshots[-1]
    column = {name: np.array([getattr(s, name) for s in result.snapshots], dtype=np.float64)
              for name in ("internal_fragmentation", "unused_slots", "slot_utilization")}
    busy = result.scheduled_tokens[result.scheduled_tokens > 0]
    return Outcome(
        setting=setting,
        steps=result.steps,
        internal_fragmentation=float(column["internal_fragmentation"].mean()),
        unused_slots=float(column["unused_slots"].mean()),
        slot_utilization=float(column["slot_utilization"].mean()),
        preemptions=final.preemptions,
        failed_allocations=final.allocation_failures,
        allocation_attempts=final.allocation_attempts,
        prefix_hit_rate=final.prefix_hit_tokens / final.prefix_queried_tokens if final.prefix_queried_tokens else 0.0,
        tokens_per_step=float(busy.mean()) if busy.size else 0.0,
        mean_latency_s=float(result.latency_steps.mean()) * result.step_seconds if result.latency_steps.size else 0.0,
    )


def run(
    settings_: Sequence[Setting],
    specs,
    step_seconds: float,
    seed: int,
    max_num_batched_tokens: int = 2048,
    progress=None,
) -> list[Outcome]:
    """Run `specs` once per setting; `progress` (tqdm) counts finished requests."""
    outcomes = []
    for setting in settings_:
        if progress is not None:
            progress.set_description(setting.label)
        result = sim.run_workload(setting.shape(max_num_batched_tokens), specs, step_seconds=step_seconds, seed=seed,
                                  progress=progress)
        outcomes.append(measure(setting, result))
    return outcomes


# -- reading the table -----------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    best: Outcome
    baseline: Outcome
    lines: tuple[str, ...]


def _change(best: Setting, baseline: Setting) -> str:
    parts = []
    if best.block_size != baseline.block_size:
        parts.append(f"--block-size {best.block_size} instead of {baseline.block_size}")
    if best.prefix_caching != baseline.prefix_caching:
        parts.append("prefix caching " + ("on" if best.prefix_caching else "off"))
    if best.max_num_seqs != baseline.max_num_seqs:
        parts.append(f"--max-num-seqs {best.max_num_seqs} instead of {baseline.max_num_seqs}")
    if best.kv_slots != baseline.kv_slots:
        parts.append(f"{best.num_blocks} blocks instead of {baseline.num_blocks}")
    return ", ".join(parts)


def _versus(a: Outcome, b: Outcome) -> str:
    change = (a.mean_latency_s - b.mean_latency_s) / b.mean_latency_s if b.mean_latency_s else 0.0
    return (f"mean request latency {a.mean_latency_s:.3f} s vs {b.mean_latency_s:.3f} s ({change:+.1%}),"
            f" preemptions {a.preemptions} vs {b.preemptions}, failed allocations {a.failed_allocations} vs"
            f" {b.failed_allocations}, internal fragmentation {pct(a.internal_fragmentation)} vs"
            f" {pct(b.internal_fragmentation)}, prefix hits {pct(a.prefix_hit_rate)} vs {pct(b.prefix_hit_rate)},"
            f" {a.tokens_per_step:.1f} vs {b.tokens_per_step:.1f} tokens per step")


def recommend(outcomes: Sequence[Outcome]) -> Recommendation:
    """The best row needing no more KV memory than the baseline (the first row),
    if it is materially better, and what more memory would buy."""
    baseline = outcomes[0]
    affordable = sorted((o for o in outcomes if o.setting.kv_slots <= baseline.setting.kv_slots),
                        key=lambda o: o.objective)
    best = affordable[0]
    if best.mean_latency_s <= baseline.mean_latency_s * (1 - MATERIAL):
        lines = [f"Change to {_change(best.setting, baseline.setting)}: {_versus(best, baseline)}."]
    else:
        best = baseline
        lines = [f"Keep the current settings: no setting with at most this KV memory cuts mean latency by"
                 f" {pct(MATERIAL)} or more."]
        runner_up = next((o for o in affordable if o is not baseline), None)
        if runner_up is not None:
            lines.append(f"Closest, {_change(runner_up.setting, baseline.setting)}: {_versus(runner_up, baseline)}.")
    best_with_more: dict[int, Outcome] = {}  # per memory size above the baseline's
    for o in sorted(outcomes, key=lambda o: o.objective):
        if o.setting.kv_slots > baseline.setting.kv_slots:
            best_with_more.setdefault(o.setting.kv_slots, o)
    for _, more in sorted(best_with_more.items()):
        lines.append(f"With {more.setting.kv_slots / baseline.setting.kv_slots:.2g}x the KV memory"
                     f" ({_change(more.setting, baseline.setting)}): {_versus(more, baseline)}.")
    return Recommendation(best, baseline, tuple(lines))


def table(outcomes: Sequence[Outcome]) -> str:
    width = max(len(o.setting.label) for o in outcomes) + 2
    lines = [f"  {'setting':<{width}}" + "".join(f"{h:>15}" for h, _, _ in COLUMNS)]
    for o in outcomes:
        lines.append(f"  {o.setting.label:<{width}}" + "".join(f"{fmt(getattr(o, a)):>15}" for _, a, fmt in COLUMNS))
    return "\n".join(lines)


def render(outcomes: Sequence[Outcome], recommendation: Recommendation, workload: str) -> str:
    return "\n".join([
        f"What-if sweep: {workload}, {len(outcomes)} settings on vLLM's real scheduler (first row: baseline)",
        "",
        table(outcomes),
        "",
        "  internal frag: unused / allocated token slots, mean over steps; prefix hits: of the tokens looked up at",
        "  first admission (vLLM's hit rate: re-admissions after preemption are not in it);",
        "  tokens/step: mean over steps that scheduled any; latency: mean, request arrival to its last token.",
        "",
        "Recommendation (lowest mean latency, then fewest preemptions, among settings with no more KV memory"
        f" than the baseline; a change only if it cuts latency by {pct(MATERIAL)} or more):",
        *(f"  {line}" for line in recommendation.lines),
    ])


def chart(outcomes: Sequence[Outcome]) -> Chart:
    positions = np.arange(len(outcomes), dtype=np.float64)
    names = tuple(f"bs{o.setting.block_size} {o.setting.num_blocks}b {'pc' if o.setting.prefix_caching else 'no-pc'}"
                  f" {o.setting.max_num_seqs}s" for o in outcomes)

    def panel(label: str, attribute: str, percent: bool = False) -> Panel:
        values = np.array([getattr(o, attribute) for o in outcomes], dtype=np.float64)
        return Panel(label, (Line(label, positions, values),), style="bars", xlabel="", percent=percent,
                     categories=names, marked=(0, "baseline (the current settings)"))

    return Chart("sweep", "What-if sweep (bs: block size, b: blocks, pc: prefix caching, s: max sequences)", (
        panel("internal fragmentation", "internal_fragmentation", percent=True),
        panel("preemptions", "preemptions"),
        panel("failed allocations", "failed_allocations"),
        panel("prefix-cache hit rate", "prefix_hit_rate", percent=True),
        panel("tokens per step", "tokens_per_step"),
        panel("mean latency (s)", "mean_latency_s"),
    ), columns=2)


def write(outcomes: Sequence[Outcome], text: str, out: Path, pictures: bool = True) -> list[Path]:
    """sweep.txt, sweep.csv, sweep.json and sweep.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**asdict(o.setting), "kv_slots": o.setting.kv_slots,
             **{k: v for k, v in asdict(o).items() if k != "setting"}} for o in outcomes]
    (out / "sweep.txt").write_text(text + "\n")
    with open(out / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "text": text}, indent=2))
    paths = [out / "sweep.txt", out / "sweep.csv", out / "sweep.json"]
    if pictures:
        paths.append(draw(chart(outcomes), out))
    return paths


def read(path: Path) -> list[Outcome]:
    """The outcomes `write` put in a sweep.json (baseline first); ValueError, KeyError or
    TypeError when the file is not one."""
    settings = {f.name for f in fields(Setting)}
    return [Outcome(setting=Setting(**{k: v for k, v in row.items() if k in settings}),
                    **{f.name: row[f.name] for f in fields(Outcome) if f.name != "setting"})
            for row in json.loads(path.read_text())["rows"]]
