"""`vllm-frag-otel`: run vLLM's real scheduler on a workload with the plugin
(`simulate`, once or as a what-if `--sweep`), and turn the plugin's OTLP/JSON
files into answers (`report`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path

from vllm_frag_otel import __version__
from vllm_frag_otel.analysis import replay
from vllm_frag_otel.analysis import report as reporting
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import simclock
from vllm_frag_otel.sim import workloads
from vllm_frag_otel.analysis import sweep as what_if
from vllm_frag_otel.config import cache_dir, load_settings, unusable_otel_variables
from vllm_frag_otel.jsonlines import InputProblem
from vllm_frag_otel.plugin.versions import SUPPORTED_VLLM
from vllm_frag_otel.analysis.summary import counted, field_statistics, group_statistics, render
from vllm_frag_otel.export.telemetry import runtime

DEFAULT_REQUESTS = 500
# How long the run waits for one export to a collector (the file exporter takes
# milliseconds): a collector that is down or never answers must not stall the run.
STEP_FLUSH_SECONDS = 0.5
FINAL_FLUSH_SECONDS = 5.0
PROG = "vllm-frag-otel"
EXIT_FAILED = 1  # the command could not run here, or failed while running
EXIT_USAGE = 2  # a wrong option or input, or an input with nothing to report: fix it and run again
EXIT_INTERRUPTED = 130
EXIT_CODES = ("exit status: 0 done (also the report of an interrupted run that has something to report, with its"
              " caveat); 1 the command could not run here (a missing package, vLLM not loading the plugin) or failed"
              " while running (a file it could not write); 2 a wrong option or input, or an input with nothing to"
              " report; 130 interrupted (Ctrl-C; simulate keeps what ran)")
# simulate without --output: a run directory of its own under _bare_runs_root(), the newest few kept
KEPT_BARE_RUNS = 5
BARE_RUN_NAME = re.compile(r"\d{8}T\d{6}Z-\d+")
# matplotlib and tqdm are not installed with the plugin (vLLM runs without them): the CLI asks for them
REPORT_EXTRA = "pip install 'vllm-frag-otel[report]'"


def _error(message: str, code: int = EXIT_USAGE) -> int:
    """The CLI's one form of error line; returns the exit status."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """A usage error shows the usage of the (sub)command it is about, then the CLI's one error line."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _switch_list(text: str) -> list[bool]:
    words = {"on": True, "off": False}
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values or any(v not in words for v in values):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off; got {text!r}")
    return [words[v] for v in values]


def _layout(text: str) -> str:
    """A `sim.LAYOUTS` preset or a group description, checked; returned as given."""
    try:
        sim.parse_layout(text)
    except ValueError as exc:
        message = str(exc)
        if "presets:" not in message:  # sim names the accepted values for an unknown kind only
            message += (f" (presets: {', '.join(sim.LAYOUTS)}; group kinds: {', '.join(sim.GROUP_KINDS)},"
                        " windows in tokens)")
        raise argparse.ArgumentTypeError(message) from None
    return text


def _layout_help() -> str:
    presets = "; ".join(f"{name}: {groups}" for name, groups in sim.LAYOUTS.items())
    return (f"the model's KV-cache groups: a preset ({presets}) or your own comma-separated groups of"
            f" {', '.join(sim.GROUP_KINDS)}, windows in tokens (e.g. full,sliding_window:128,mamba). Default full."
            " Mamba groups other than mamba_align (e.g. jamba) turn prefix caching off, as vLLM does")


def _parser() -> tuple[_Parser, dict[str, _Parser]]:
    """The CLI's parser and its subcommands' parsers, by name."""
    parser = _Parser(prog=PROG, description=__doc__, epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    simulation = commands.add_parser(
        "simulate",
        help="drive vLLM's real v1 scheduler and KV cache manager on the CPU and summarise fragmentation",
        epilog=EXIT_CODES,
    )
    simulation.add_argument("--workload", choices=workloads.workload_names(), default="sharegpt",
                            help="built-in request mix (default sharegpt)")
    simulation.add_argument("--workload-file", type=Path, metavar="PATH",
                     help="replay your own mix instead: JSON lines with arrival_time (s, >= 0), prompt_len,"
                          " output_len and optionally prefix_group, prefix_len (requests of a group share their first"
                          " prefix_len prompt tokens). A file with a bad line is refused, each bad line named")
    simulation.add_argument("--num-requests", type=int,
                     help=f"requests (default {DEFAULT_REQUESTS}; with --workload-file: the first N, default all)")
    simulation.add_argument("--arrival-rate", type=float, metavar="R",
                     help="Poisson arrivals at R requests per second (default: all at once, or the arrival times"
                          " of --workload-file)")
    simulation.add_argument("--step-seconds", type=float, default=0.02,
                     help="simulated duration of one scheduler step, which maps arrival times onto steps and"
                          " steps onto latency (default 0.02: about one decode step of a mid-size model on one GPU)")
    simulation.add_argument("--num-blocks", type=int, default=2048, help="KV-cache blocks in the pool (default 2048)")
    simulation.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    simulation.add_argument("--max-num-seqs", type=int, default=128,
                            help="most requests scheduled at once (default 128)")
    simulation.add_argument("--max-num-batched-tokens", type=int, default=2048,
                            help="most tokens scheduled in one step (default 2048)")
    simulation.add_argument("--max-model-len", type=int, metavar="TOKENS",
                            help="the model's longest request, prompt plus output (default"
                                 f" {what_if.DEFAULT_MODEL_LEN}, or what the pool holds if less); --workload-file lines"
                                 " asking for more are cut to it (the prompt to TOKENS - 1, then the output), and"
                                 " counted in the summary")
    simulation.add_argument("--prefix-groups", type=int, default=4, help="shared system prompts (default 4; 0: none)")
    simulation.add_argument("--prefix-len", type=int, default=64, help="tokens per shared system prompt (default 64)")
    simulation.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's prefix caching off")
    simulation.add_argument("--layout", type=_layout, default="full", metavar="NAME_OR_GROUPS", help=_layout_help())
    simulation.add_argument("--seed", type=int, default=0, help="random seed of the workload and arrivals (default 0)")
    simulation.add_argument("--output", type=Path,
                     help="write telemetry files and summary.json here, whatever OTEL_EXPORTER_OTLP_ENDPOINT says"
                          " (with --sweep: the sweep's table, CSV, JSON and plot; default frag-sweep). Default:"
                          " telemetry goes where the plugin's settings say; files in the plugin's default directory"
                          f" go to a run directory of its own instead, under {_bare_runs_root()} (the newest"
                          f" {KEPT_BARE_RUNS} kept)")
    simulation.add_argument("--export-every", type=int, default=10, metavar="STEPS",
                     help="export the plugin's metrics every STEPS scheduler steps, for time series in `report`"
                          " (default 10; 0: only every OTEL_METRIC_EXPORT_INTERVAL ms, default 1000)")
    simulation.add_argument("--block-map-every", type=int, default=10, metavar="STEPS",
                     help="write a block-layout map (every block's state, for the report's heat map and hotspots)"
                          " every STEPS scheduler steps (default 10; 0: none). At most"
                          " VLLM_FRAG_OTEL_BLOCK_MAP_MAX_CELLS cells (default 4096) per map")
    sweeping = simulation.add_argument_group(
        "what-if sweep", "run the same workload once per setting and compare (no telemetry is exported). Without"
        " any --sweep-* list, each of block size, blocks and max sequences is halved and doubled and prefix"
        " caching turned off, one at a time")
    sweeping.add_argument("--sweep", action="store_true", help="compare settings instead of one run")
    sweeping.add_argument("--sweep-block-sizes", type=_int_list, metavar="B,B", default=[],
                         help="block sizes, each with the same KV memory (blocks scaled)")
    sweeping.add_argument("--sweep-num-blocks", type=_int_list, metavar="N,N", default=[],
                         help="KV memory, in blocks of --block-size")
    sweeping.add_argument("--sweep-prefix-caching", type=_switch_list, metavar="on,off", default=[])
    sweeping.add_argument("--sweep-max-num-seqs", type=_int_list, metavar="S,S", default=[])
    sweeping.add_argument("--sweep-grid", action="store_true", help="every combination instead of one axis at a time")

    report = commands.add_parser(
        "report",
        help="read the plugin's OTLP/JSON files and write a summary, CSV/JSON series, PNG charts and an HTML report",
        description="Files, or directories searched for *.json and *.jsonl (metrics and traces lines; a"
                    " Collector's file exporter output works too). Bad lines are reported by file and line and"
                    " skipped. With request spans it also writes workload.jsonl, the traffic they saw, for"
                    " `simulate --sweep --workload-file`.",
        epilog=EXIT_CODES,
    )
    report.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                        help="default: one run, named on the first line: VLLM_FRAG_OTEL_FILE_DIR if set, else the"
                             " newest of the last simulate without --output and the plugin's default file directory"
                             f" ({Path(cache_dir()) / 'telemetry'})")
    report.add_argument("--output", type=Path, default=Path("frag-report"), help="directory (default frag-report)")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG charts (the HTML has none then)")
    report.add_argument("--smooth", type=int, default=0, metavar="EXPORTS",
                        help="also draw the fragmentation ratios' rolling mean over EXPORTS exports (default 0: none)")
    return parser, {"simulate": simulation, "report": report}


SWEEP_FLAGS = ("sweep_block_sizes", "sweep_num_blocks", "sweep_prefix_caching", "sweep_max_num_seqs", "sweep_grid")


def _validate(parser: argparse.ArgumentParser, args) -> None:
    if not args.sweep:
        for name in SWEEP_FLAGS:
            if getattr(args, name):
                parser.error(f"--{name.replace('_', '-')} needs --sweep (it lists settings to compare)")
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_requests is not None and args.num_requests < 1:
        parser.error("--num-requests must be >= 1")
    if args.num_blocks < 2 or any(n < 2 for n in args.sweep_num_blocks):
        parser.error("--num-blocks must be >= 2 (block 0 is vLLM's null block)")
    if args.arrival_rate is not None and not args.arrival_rate > 0:
        parser.error("--arrival-rate must be > 0")
    if not args.step_seconds > 0:
        parser.error("--step-seconds must be > 0")
    if args.export_every < 0:
        parser.error("--export-every must be >= 0")
    if args.block_map_every < 0:
        parser.error("--block-map-every must be >= 0")
    if args.workload_file is not None and not args.workload_file.is_file():
        parser.error(f"--workload-file {args.workload_file}: {_not_a_workload_file(args.workload_file)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error("--max-model-len must be >= 2 (a prompt token and an output token)")
    base = _setting(args, prefix_caching=True)
    if base.max_model_len < 1:
        least = what_if.blocks_per_request(sim.parse_layout(args.layout), 1, args.block_size)
        parser.error(f"--num-blocks {args.num_blocks} is too few for --layout {args.layout}: one request needs"
                     f" {least} usable blocks or more across its KV-cache groups")
    if args.max_model_len is not None and base.max_model_len < args.max_model_len:
        parser.error(f"--max-model-len {args.max_model_len} is longer than the pool holds: at most"
                     f" {base.max_model_len} tokens per request with --num-blocks {args.num_blocks}, --block-size"
                     f" {args.block_size} and --layout {args.layout}")


def _not_a_workload_file(path: Path) -> str:
    """Why `path`, not a file, cannot be a workload file."""
    if not path.is_dir():
        return "no such file"
    inside = path / replay.WORKLOAD_FILE
    hint = f"; this one holds a report's {inside}" if inside.is_file() else ""
    return f"is a directory, expected a JSON-lines file with one request per line{hint}"


def _setting(args, prefix_caching: bool) -> what_if.Setting:
    """The run's setting, as the flags give it."""
    return what_if.Setting(args.block_size, args.num_blocks, prefix_caching, args.max_num_seqs, args.layout,
                           args.max_model_len or what_if.DEFAULT_MODEL_LEN)


def _specs(args, max_len: int):
    """The workload's requests, with their arrival times; None if a trace file has none usable."""
    if args.workload_file is not None:
        problems: list[InputProblem] = []
        specs = workloads.load_trace(args.workload_file, problems, seed=args.seed, max_len=max_len,
                                     prefix_len=args.prefix_len)
        # a replay of part of the file would answer for a workload nobody asked about
        for problem in problems:
            _error(str(problem))
        if problems or not specs:
            _error(f"{args.workload_file}: no request replayed (fix the lines named above)" if problems
                   else f"no request in {args.workload_file}")
            return None
        specs = specs[: args.num_requests]
    else:
        specs = workloads.generate(
            args.workload, args.num_requests or DEFAULT_REQUESTS, seed=args.seed, max_len=max_len,
            prefix_groups=args.prefix_groups, prefix_len=args.prefix_len,
        )
    if args.arrival_rate is not None:
        specs = workloads.with_poisson_arrivals(specs, args.arrival_rate, seed=args.seed)
    return specs


class _NoKernelsNeeded(logging.Filter):
    """vLLM's wheel without its compiled CPU ops warns at import that vllm._C is missing,
    and torch without Triton that it finds no Triton kernels; the simulator runs the
    scheduler and never a kernel."""

    WARNINGS = ("Failed to import from vllm._C", "Triton not available")
    # where vLLM 0.30-0.34 and torch warn
    LOGGERS = ("vllm.platforms.interface", "vllm.platforms.cpu", "torch._library.triton")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.WARNINGS)


def _load_plugin() -> bool:
    print("loading vLLM (10-20 s) ...", file=sys.stderr, flush=True)
    for name in _NoKernelsNeeded.LOGGERS:
        logging.getLogger(name).addFilter(_NoKernelsNeeded())
    from vllm.plugins import load_general_plugins

    from vllm_frag_otel.plugin.hooks import instrumentor

    load_general_plugins()
    if not instrumentor.is_instrumented:
        _error("vLLM did not load the frag_otel plugin. Is VLLM_PLUGINS set without frag_otel, or"
               " VLLM_FRAG_OTEL_ENABLED=false?")
    return instrumentor.is_instrumented


def _absent(*modules: str) -> list[str]:
    return [name for name in modules if find_spec(name) is None]


def _missing_requirement(args) -> str | None:
    """One line naming what this command needs and how to install it, when it is not installed."""
    if args.command == "report":
        absent = [] if args.no_plots else _absent("matplotlib")
        return (f"report needs the report extra for its charts ({', '.join(absent)} is not"
                f" installed): {REPORT_EXTRA}, or pass --no-plots") if absent else None
    command = "simulate --sweep" if args.sweep else "simulate"
    # the sweep draws sweep.png and shows a progress bar; a plain simulate runs without tqdm (no bar)
    absent = _absent("matplotlib", "tqdm") if args.sweep else []
    if absent:
        return (f"{command} needs the report extra ({', '.join(absent)}"
                f" {'is' if len(absent) == 1 else 'are'} not installed): {REPORT_EXTRA}")
    if _absent("vllm"):
        return (f"{command} runs vLLM's scheduler, and vLLM is not installed in this environment"
                f" (supported: vllm{SUPPORTED_VLLM}; the plugin never installs it)")
    return None


def _progress_bar(**kwargs):
    """A tqdm bar on stderr; none without tqdm (the report extra, also a requirement of vLLM)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext()
    return tqdm(file=sys.stderr, disable=None, **kwargs)


def _logs_above_bars():
    """vLLM's log lines (the plugin's among them, e.g. where its files go, logged as the
    scheduler starts) printed above the progress bars instead of over them."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return contextlib.nullcontext()
    return logging_redirect_tqdm(loggers=[logging.getLogger("vllm")])


def _workload_name(args) -> str:
    return str(args.workload_file) if args.workload_file is not None else args.workload


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be written in `directory` (created if missing), or None if they can."""
    try:
        if directory.exists() and not directory.is_dir():
            return "it is a file, not a directory"
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _path_error(what: str, path: Path, reason: str) -> int:
    return _error(f"{what} {path}: {reason}")


def _telemetry_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _telemetry_dir() -> Path | None:
    """The directory the plugin will write files to in this run, if it writes files."""
    from vllm_frag_otel.export.telemetry import exporter_choice

    settings = load_settings()
    if _telemetry_disabled() or not settings.enabled:
        return None
    if "file" not in (exporter_choice(settings, "metrics"), exporter_choice(settings, "traces")):
        return None
    return Path(settings.file_dir)


class _Flusher:
    """Exports what the plugin holds without ever stalling the run on a
    collector: each flush runs in a thread and is waited for a bounded time;
    while one is still running (a collector that is down or never answers), the
    next is skipped. Flushes to files (`files`) run in the caller, every one."""

    def __init__(self, files: bool) -> None:
        self.files = files
        self._done: threading.Event | None = None

    def __call__(self, flush, seconds: float, last: bool = False) -> bool:
        """Start `flush()` unless one is still running (`last`: start it anyway);
        True if it finished within `seconds`."""
        if self.files:
            flush()
            return True
        if not last and self._done is not None and not self._done.is_set():
            return False
        done = self._done = threading.Event()

        def run() -> None:
            try:
                flush()
            except Exception:  # an exporter's failure is the SDK's to log, never the run's
                pass
            finally:
                done.set()

        telemetry = runtime()
        # the flush's collection would wait for a scheduler step that this thread holds back
        with telemetry.stepping_held() if telemetry is not None else contextlib.nullcontext():
            threading.Thread(target=run, name="vllm-frag-otel-flush", daemon=True).start()
            return done.wait(seconds)


class _CtrlC:
    """Ctrl-C stops the run at the next step boundary, raised there as
    KeyboardInterrupt: raised wherever the signal lands (inside vLLM's or an
    exporter's code) it could be swallowed or cut a step in half. A second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self.pressed:
            signal.default_int_handler(signum, frame)
        self.pressed = True

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _plugin_warnings_on_stderr():
    """The plugin's warnings about its settings as the CLI's `warning:` lines: vLLM,
    which sets up the plugin's logging, is not loaded yet (each is said once per
    process, so the plugin does not repeat them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("vllm.frag_otel")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _report_unusable_settings() -> None:
    """Say once, one line each, which VLLM_FRAG_OTEL_* and OTEL_* values the plugin
    will not use (the same words it logs), and hide the OTEL_* ones from this process
    as the plugin hides them from the SDK: what the run then does is what this
    process sees."""
    with _plugin_warnings_on_stderr():
        load_settings()
        unusable = unusable_otel_variables()
    for name in unusable:
        os.environ.pop(name, None)


def _cut_line(cuts: workloads.Cuts, path: Path) -> str | None:
    """What --workload-file asked for that the model length cut, in words; None if nothing."""
    if not cuts.requests:
        return None
    parts = []
    if cuts.prompts:
        parts.append(f"{counted(cuts.prompts, 'prompt')} to {cuts.max_model_len - 1} tokens"
                     f" ({cuts.prompt_tokens} tokens cut in all)")
    if cuts.outputs:
        parts.append(f"{counted(cuts.outputs, 'output')} to what the model length left"
                     f" ({cuts.output_tokens} tokens cut in all)")
    return (f"{counted(cuts.requests, 'request')} of {path} asked for more than the model length of"
            f" {cuts.max_model_len} tokens (--max-model-len) and {'was' if cuts.requests == 1 else 'were'} cut: "
            + "; ".join(parts))


def _bare_runs_root() -> Path:
    return Path(cache_dir()) / "simulate"


def _bare_runs() -> list[Path]:
    """The run directories of earlier simulates without --output, oldest first."""
    root = _bare_runs_root()
    named = [p for p in root.iterdir() if p.is_dir() and BARE_RUN_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(named, key=lambda p: p.name)


def _new_bare_run() -> Path:
    """A new run directory for a simulate without --output; only the newest KEPT_BARE_RUNS stay (said so)."""
    earlier = _bare_runs()
    removed = earlier[: max(0, len(earlier) - (KEPT_BARE_RUNS - 1))]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    if removed:
        print(f"removed {counted(len(removed), 'older run')} from {_bare_runs_root()} (without --output, the newest"
              f" {KEPT_BARE_RUNS} are kept; --output DIR keeps a run)", file=sys.stderr)
    return _bare_runs_root() / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def _newest_write(directory: Path) -> float:
    """When a file in `directory` (or below) was last written; 0 when it holds none."""
    return max((p.stat().st_mtime for p in directory.rglob("*") if p.is_file()), default=0.0)


def _default_inputs() -> list[Path]:
    """What a bare `report` reads, said on stderr: VLLM_FRAG_OTEL_FILE_DIR when set; else the newest of
    the last simulate run without --output and the plugin's default file directory (a server's)."""
    with _plugin_warnings_on_stderr():
        file_dir = Path(load_settings().file_dir)
    runs = _bare_runs()
    if runs and not _file_dir_chosen() and _newest_write(runs[-1]) >= _newest_write(file_dir):
        print(f"report: reading {runs[-1]}, the newest simulate run without --output (of {len(runs)} kept in"
              f" {runs[-1].parent}); give PATHs to read others", file=sys.stderr)
        return [runs[-1]]
    print(f"report: reading {file_dir}, the plugin's file directory (VLLM_FRAG_OTEL_FILE_DIR); give PATHs"
          " to read others", file=sys.stderr)
    return [file_dir]


def _file_dir_chosen() -> bool:
    return bool(os.environ.get("VLLM_FRAG_OTEL_FILE_DIR", "").strip())


def _clock(telemetry_dir: Path | None, step_seconds: float) -> simclock.ClockWriter | None:
    """The clock file beside the telemetry files, mapping their wall-clock times to simulated time."""
    if telemetry_dir is None or _telemetry_disabled():
        return None
    return simclock.ClockWriter(telemetry_dir, step_seconds, load_settings().file_max_files)


def simulate(args) -> int:
    _report_unusable_settings()
    setting = _setting(args, not args.no_prefix_caching)
    shape = setting.shape(args.max_num_batched_tokens)
    specs = _specs(args, setting.max_model_len)  # a bad workload file stops the run before it writes anything
    if specs is None:
        return EXIT_USAGE
    # files in the plugin's default directory: a run directory of its own instead, apart from
    # other runs and from a server's files there
    bare = args.output is None and not _file_dir_chosen() and _telemetry_dir() is not None
    if bare:
        args.output = _new_bare_run()
    if args.output:
        problem = _unwritable(args.output)
        if problem:
            return _path_error("--output", args.output, problem)
        os.environ["VLLM_FRAG_OTEL_FILE_DIR"] = str(args.output / "telemetry")
        # --output means files there, even when OTEL_EXPORTER_OTLP_ENDPOINT names a collector;
        # sending to the collector instead is the explicit VLLM_FRAG_OTEL_EXPORTER=otlp
        from vllm_frag_otel.export.telemetry import exporter_choice

        settings = load_settings()
        choices = {exporter_choice(settings, signal) for signal in ("metrics", "traces", "logs")}
        # left on auto without a collector it writes files anyway, and its log says so in those words
        if not bare and settings.exporter == "auto" and choices != {"file"}:
            os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "file"
    telemetry_dir = _telemetry_dir()
    if telemetry_dir is not None:
        problem = _unwritable(telemetry_dir)
        if problem:
            return _path_error("cannot write telemetry to", telemetry_dir, problem)
    os.environ.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    if not _load_plugin():
        return EXIT_FAILED
    flush = _Flusher(files=telemetry_dir is not None)
    clock = _clock(telemetry_dir, args.step_seconds)

    ctrl_c = _CtrlC()

    def export(steps: int) -> None:
        ctrl_c.check()
        telemetry = runtime()
        if telemetry is not None:
            if args.export_every and steps % args.export_every == 0 and telemetry.meter_provider is not None:
                flush(telemetry.meter_provider.force_flush, STEP_FLUSH_SECONDS)
            if args.block_map_every and steps % args.block_map_every == 0:
                sampler = telemetry.start_block_maps()
                if sampler is not None:
                    sampler.sample()
        if clock is not None:
            clock.tick(steps)  # after the step's exports: their points read as this step's time

    started = time.perf_counter()
    try:
        with ctrl_c, _logs_above_bars(), \
                _progress_bar(total=len(specs), desc="vLLM requests built (prompts hashed)", unit="req",
                              leave=False) as building, \
                _progress_bar(total=len(specs), desc="requests finished", unit="req") as progress:
            result = sim.run_workload(shape, specs, step_seconds=args.step_seconds, seed=args.seed,
                                      progress=progress, on_step=export, keep_partial=True, building=building)
    except KeyboardInterrupt as exc:  # before the first step
        exc.__traceback__ = None
        result = None
    elapsed = time.perf_counter() - started
    if clock is not None:
        clock.close()
    partial = result is None or result.interrupted
    if partial:
        print("\ninterrupted: stopping the run", file=sys.stderr)
    telemetry = runtime()
    # files: flush, the process exits soon enough. A collector: stop the providers
    # now, bounded, or the SDK's own exit handlers would retry a dead one for minutes
    if telemetry is None or _telemetry_disabled():
        last = None
    elif telemetry_dir is not None:
        last = telemetry.force_flush
    else:
        last = getattr(telemetry, "stop", None) or telemetry.shutdown
    if last is not None and not flush(last, FINAL_FLUSH_SECONDS, last=True):
        print(f"warning: the telemetry exporter did not finish within {FINAL_FLUSH_SECONDS:.0f} s (is the"
              " collector at OTEL_EXPORTER_OTLP_ENDPOINT up?); what it had not sent yet is lost", file=sys.stderr)
    if result is None:
        print("  interrupted before the first scheduler step: nothing to summarise", file=sys.stderr)
        return EXIT_INTERRUPTED
    stats = field_statistics(result.snapshots)
    groups = group_statistics(result.snapshots)
    outcome = what_if.measure(setting, result)
    cuts = workloads.cuts(specs, setting.max_model_len)
    print(render(stats, result.steps, args.block_size, groups))
    print()
    for note in _layout_notes(args, shape):
        print(f"  {note}")
    finished = int(result.latency_steps.size)
    ran = f"{finished} of {len(specs)} requests finished (interrupted)" if partial else f"{len(specs)} requests"
    latency = (f"mean request latency {outcome.mean_latency_s:.3f} s (simulated)" if finished
               else "no request finished, so no latency")
    print(f"  {ran} in {counted(result.steps, 'scheduler step')}: {result.simulated_seconds:.1f} s of simulated time"
          f" ({args.step_seconds} s per step), {elapsed:.1f} s of wall-clock time; {latency};"
          f" {outcome.tokens_per_step:.1f} tokens scheduled per busy step")
    cut = _cut_line(cuts, args.workload_file) if args.workload_file is not None else None
    if cut:
        print(f"  {cut}")
    if args.output:
        summary = {
            "workload": _workload_name(args),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "max_model_len": setting.max_model_len,
            "steps": result.steps,
            "simulated_seconds": result.simulated_seconds,
            "wall_seconds": elapsed,
            "clock_file": str(clock.path) if clock is not None else None,
            "partial": partial,
            "finished_requests": finished,
            "cut_requests": dataclasses.asdict(cuts),
            # a mean over no finished request is no latency at all
            "run": {k: (None if k == "mean_latency_s" and not finished else v)
                    for k, v in dataclasses.asdict(outcome).items() if k != "setting"},
            "fields": stats,
            "layout": {
                "name": args.layout,
                "groups": [dataclasses.asdict(g) for g in shape.groups],
                "prefix_caching": shape.prefix_caching,
                "max_model_len": shape.max_model_len,
            },
            "groups": groups,
        }
        (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
        where = (f"telemetry: {args.output / 'telemetry'} (`vllm-frag-otel report {args.output}`)"
                 if not _telemetry_disabled() else "no telemetry: it was disabled by OTEL_SDK_DISABLED")
        print(f"  summary: {args.output / 'summary.json'}; {where}")
        if bare:
            print(f"  (no --output: a run directory of its own; the newest {KEPT_BARE_RUNS} are kept in"
                  f" {args.output.parent}, and a bare `vllm-frag-otel report` reads the newest)")
    elif _telemetry_disabled():
        print("  no telemetry: it was disabled by OTEL_SDK_DISABLED")
    return EXIT_INTERRUPTED if partial else 0


def _prefix_caching_note(args, shape: sim.EngineShape) -> list[str]:
    """Say so when the layout turned prefix caching off."""
    if args.no_prefix_caching or shape.prefix_caching:
        return []
    return [f"prefix caching is off: layout {args.layout} has Mamba states outside \"align\" mode, which vLLM"
            " cannot prefix-cache (mamba_align, as in qwen3-next, can be)"]


def _layout_notes(args, shape: sim.EngineShape) -> list[str]:
    """What the layout changes about the run, in words."""
    notes = []
    if args.layout != "full":
        notes.append(f"layout {args.layout}: KV-cache groups "
                     + ", ".join(g.kind + (f" ({g.window} tokens)" if g.window else "") for g in shape.groups))
    return notes + _prefix_caching_note(args, shape)


def sweep(args, parser: argparse.ArgumentParser) -> int:
    _report_unusable_settings()
    # the sweep compares runs; their telemetry would only mix pools of different shapes
    os.environ["VLLM_FRAG_OTEL_EXPORTER"] = "none"
    base = _setting(args, not args.no_prefix_caching)
    axes = {
        "block_sizes": args.sweep_block_sizes,
        "num_blocks": args.sweep_num_blocks,
        "prefix_caching": args.sweep_prefix_caching,
        "max_num_seqs": args.sweep_max_num_seqs,
    }
    if not any(axes.values()):
        axes = what_if.default_axes(base)
    try:
        runs = what_if.settings(base, grid=args.sweep_grid, **axes)
    except ValueError as exc:  # a --sweep-* value no setting can take
        parser.error(str(exc))
    max_len = min(s.max_model_len for s in runs)
    specs = _specs(args, max_len)
    if specs is None:
        return EXIT_USAGE
    problem = _unwritable(args.output or Path("frag-sweep"))
    if problem:
        return _path_error("--output", args.output or Path("frag-sweep"), problem)
    if not _load_plugin():
        return EXIT_FAILED
    with _progress_bar(total=len(runs) * len(specs), unit="req") as progress:
        outcomes = what_if.run(runs, specs, args.step_seconds, args.seed, args.max_num_batched_tokens, progress)
    recommendation = what_if.recommend(outcomes)
    layout = f", layout {args.layout}" if args.layout != "full" else ""
    text = what_if.render(outcomes, recommendation, f"{_workload_name(args)}{layout}, {len(specs)} requests")
    text += "".join(f"\n\n  {note}" for note in _prefix_caching_note(args, base.shape(args.max_num_batched_tokens)))
    cut = _cut_line(workloads.cuts(specs, max_len), args.workload_file) if args.workload_file is not None else None
    text += f"\n\n  {cut}" if cut else ""
    text += "".join(f"\n\n  {note}" for note in _replay_note(specs))
    print(text)
    out = args.output or Path("frag-sweep")
    paths = what_if.write(outcomes, text, out)
    print(f"\n  wrote {', '.join(str(p) for p in paths)}")
    return 0


def _replay_note(specs) -> list[str]:
    """What a sweep over recorded traffic cannot know (none for synthetic requests)."""
    replayed = sum(1 for s in specs if s.replayed)
    if not replayed:
        return []
    return [f"Workload: a replay of recorded traffic ({replayed} of {len(specs)} requests from a report's"
            f" {replay.WORKLOAD_FILE}). {replay.REPLAY_CANNOT_KNOW[0].upper()}{replay.REPLAY_CANNOT_KNOW[1:]}"]


def _nothing_finished(path: Path) -> str | None:
    """Why `path`, an interrupted simulator run that finished no request, has nothing to
    report; None for any other input."""
    runs = reporting.partial_runs([path])
    if not runs or any(run.get("finished_requests") != 0 for _, run in runs):
        return None
    summary, run = runs[0]
    steps = run.get("steps")
    after = f" after {counted(steps, 'scheduler step')}" if isinstance(steps, int) else ""
    return (f"the simulator run in {summary.parent} was interrupted{after} (see {summary}), before any request"
            " finished: its telemetry shows the first admissions only, not the workload. Run it again without"
            " stopping it (or with fewer --num-requests)")


def report(args, parser: argparse.ArgumentParser) -> int:
    if args.smooth < 0:
        parser.error("--smooth must be >= 0 (exports in the rolling mean; 0: none)")
    paths = args.paths or _default_inputs()
    empty = [_nothing_finished(path) for path in paths]
    if all(empty):
        return _error("nothing to report: " + "; ".join(empty))
    problem = _unwritable(args.output)
    if problem:
        return _path_error("--output", args.output, problem)
    try:
        written = reporting.build(paths, args.output, pictures=not args.no_plots, smooth=args.smooth)
    except ValueError as exc:
        return _error(str(exc))
    for problem in written.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(written.summary)
    print(f"  wrote {len(written.paths)} files to {args.output}: open {args.output / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, commands = _parser()
    args = parser.parse_args(argv)
    missing = _missing_requirement(args)
    if missing:
        return _error(missing, EXIT_FAILED)
    try:
        if args.command == "report":
            return report(args, commands["report"])
        _validate(commands["simulate"], args)
        return sweep(args, commands["simulate"]) if args.sweep else simulate(args)
    except KeyboardInterrupt:  # simulate handles it while stepping; elsewhere there is nothing to save
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a write that failed midway (a full disk): the command, not its input
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
