#!/usr/bin/env python
"""vLLM's own KV-cache tests as a peer suite of this plugin.

    .venv/bin/python scripts/vllm_peer_suite.py [VERSION ...]   (default: every supported release)

For each vLLM release, vLLM's own `tests/v1/core` (from the release's source
archive) runs twice against that release's own code, each run in a fresh
interpreter:

- without the plugin (VLLM_PLUGINS names nothing, VLLM_FRAG_OTEL_ENABLED=false);
- with the plugin, loaded by vLLM's plugin loader, and tests/peer/ledger_check.py:
  after every outermost call of a Scheduler, KVCacheManager or BlockPool method
  and at the end of every test, the ledger of every pool in reach is compared
  with a brute-force recount from vLLM's own objects (tests/oracle.py).

The two runs' outcomes must be identical test by test, and the recount must
never differ from the ledger. One summary line per release; exit status 1 on
any outcome difference, mismatch or failed run.

What a release needs is prepared once, outside the checkout, in
<dev cache>/vllm-peer/ (tests/vllm_releases.py: VLLM_FRAG_OTEL_DEV_CACHE, default
~/.cache/vllm-frag-otel-dev, shared with the version matrix):
- its source archive (pip download, ~50 MB, metadata only, nothing built): all
  of it but its vllm/ package (which must not shadow the wheel's) and docs/;
  vLLM's root tests/conftest.py set aside (it imports tblib, model assets and
  GPU helpers) and replaced by the fixtures tests/v1/core uses of it, copied
  from it unchanged; vLLM's pytest markers;
- its code: the wheel unpacked without its CUDA kernels
  (tests/vllm_releases.py), first on PYTHONPATH, or .venv's own vLLM for its
  version; each run checks which vLLM it imported;
- an offline HF_HOME holding only the config.json of each model the tests
  name, written from transformers' config classes (no weights, no tokenizers);
- vLLM 0.34 on an x86 CPU refuses any VllmConfig without triton-cpu (not on
  the package index): the conftest sets the flag that check reads
  (vllm.triton_utils.HAS_TRITON), for both runs alike; none of these tests
  runs a Triton kernel (none fails on one).

Tests that cannot run here fail in both runs (LLaVA and Qwen2.5-VL need
torchvision to be inspected, the e2e tests a model's tokenizer and weights):
they are listed by name, with their error, in results/failing-both.txt. Left
out: prefix_cache/test_hybrid_prefix_cache_hit_rate.py (it starts a real
OpenAI server on all interfaces and needs the model's weights); with --quick
(CI) also the two files that start vLLM's engine on a real model.

Results per release in <dev cache>/vllm-peer/<version>/results/: both runs'
pytest output and outcomes, the ledger counts (ledger.json), summary.json.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vllm_releases import CACHE as DEV_CACHE  # noqa: E402 - outside the checkout, shared with the version matrix
from vllm_releases import RELEASES, release_site  # noqa: E402

CACHE = DEV_CACHE / "vllm-peer"
PEER = REPO / "tests" / "peer"
# The releases the plugin supports (vllm_frag_otel/plugin/versions.py), oldest first.
SUPPORTED = ("0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0")
SUITE = "tests/v1/core"
LEFT_OUT = {
    "tests/v1/core/prefix_cache/test_hybrid_prefix_cache_hit_rate.py":
        "starts a real OpenAI server listening on all interfaces and needs the model's weights",
}
# --quick (the part of the suite that fits the CI budget) also leaves these out: they fail both
# ways here, for want of what this machine does not have, after 15-45 s each.
QUICK_LEFT_OUT = {
    "tests/v1/core/test_reset_prefix_cache_e2e.py": "starts vLLM's engine on Qwen3-0.6B: needs its weights",
    "tests/v1/core/test_scheduler_e2e.py": "starts vLLM's LLM on a tiny Llama: needs its tokenizer and weights",
    "tests/v1/core/test_priority_scheduler_random.py":
        "each test builds a Qwen2.5-VL config, whose inspection by vLLM needs torchvision (not installed)",
}
RUN_TIMEOUT = 3600
SKIPPED = {"vllm", "vllm.egg-info", "docs"}  # top-level entries of the source archive not unpacked

# config.json of each model tests/v1/core names: transformers' config class and the
# model's own values where they differ from the class defaults (sizes, context length).
MODELS: dict[str, tuple[str, dict]] = {
    "facebook/opt-125m": ("OPTConfig", {"architectures": ["OPTForCausalLM"], "dtype": "float16"}),
    "facebook/opt-350m": ("OPTConfig", {
        "architectures": ["OPTForCausalLM"], "dtype": "float16", "hidden_size": 1024, "ffn_dim": 4096,
        "num_attention_heads": 16, "num_hidden_layers": 24, "word_embed_proj_dim": 512,
        "do_layer_norm_before": False,
    }),
    "Qwen/Qwen1.5-7B": ("Qwen2Config", {
        "architectures": ["Qwen2ForCausalLM"], "dtype": "bfloat16", "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": 32768,
        "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    }),
    "Qwen/Qwen3-0.6B": ("Qwen3Config", {
        "architectures": ["Qwen3ForCausalLM"], "dtype": "bfloat16", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645,
    }),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": ("Qwen3NextConfig", {
        "architectures": ["Qwen3NextForCausalLM"], "dtype": "bfloat16", "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
    }),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("Qwen2_5_VLConfig", {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "dtype": "bfloat16",
        "text_config": {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "tie_word_embeddings": True,
        },
        "vision_config": {"out_hidden_size": 2048},
    }),
    "llava-hf/llava-1.5-7b-hf": ("LlavaConfig", {
        "architectures": ["LlavaForConditionalGeneration"], "dtype": "float16", "image_token_index": 32000,
        "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096},
    }),
    "vllm-project/tiny-random-LlamaForCausalLM": ("LlamaConfig", {
        "architectures": ["LlamaForCausalLM"], "dtype": "float32", "hidden_size": 16, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 32000,
        "max_position_embeddings": 2048,
    }),
}
MODELS["hmellor/tiny-random-LlamaForCausalLM"] = MODELS["vllm-project/tiny-random-LlamaForCausalLM"]
# Environment of the test runs: nothing of the caller's vLLM, plugin, HF or OTel settings leaks in.
DROPPED_ENV = ("VLLM_", "HF_", "HUGGINGFACE", "TRANSFORMERS_", "OTEL_", "PYTEST_", "HYPOTHESIS_")


def log(message: str) -> None:
    print(f"[peer] {message}", flush=True)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# -- preparing a release ------------------------------------------------------------


def source_archive(version: str) -> Path:
    """vLLM's source archive of `version`, downloaded once (~50 MB; its metadata only is prepared, nothing built)."""
    where = CACHE / version
    with _locked(where / ".lock"):
        found = sorted(where.glob(f"vllm-{version}.tar.gz"))
        if found:
            return found[0]
        log(f"{version}: downloading vLLM's source archive (~50 MB)")
        env = {**os.environ, "VLLM_VERSION_OVERRIDE": version, "VLLM_TARGET_DEVICE": "empty"}
        run = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-binary", "vllm", f"vllm=={version}", "-d", str(where / "download")],
            env=env, capture_output=True, text=True, timeout=1800,
        )
        archives = sorted((where / "download").glob(f"vllm-{version}.tar.gz"))
        if run.returncode != 0 or not archives:
            raise SystemExit(f"vLLM {version}: the source archive could not be downloaded:\n{run.stderr[-2000:]}")
        target = where / archives[0].name
        archives[0].rename(target)
        shutil.rmtree(where / "download", ignore_errors=True)
        return target


def _is_venv_version(version: str) -> bool:
    from importlib.metadata import version as installed

    return installed("vllm") == version


def wheel_site(version: str) -> Path | None:
    """`version`'s Python code: None for .venv's own vLLM, else its wheel unpacked without the CUDA
    kernels (tests/vllm_releases.py, shared with the version matrix)."""
    if _is_venv_version(version):
        return None
    if not (RELEASES / version / ".unpacked").exists():
        log(f"{version}: downloading and unpacking vLLM's wheel (~240 MB; its Python code is kept)")
    return release_site(version)


def _stamp(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def has_suite(version: str) -> bool:
    """Whether the release's source archive carries tests/v1/core (looked up once)."""
    archive = source_archive(version)
    known = CACHE / version / f"{archive.name}.has-suite"
    if not known.exists():
        with tarfile.open(archive) as tar:
            found = any(m.name.startswith(f"vllm-{version}/{SUITE}/") for m in tar)
        known.write_text("yes" if found else "no")
    return known.read_text() == "yes"


def source_tree(version: str, site: Path | None) -> Path:
    """The release's source tree without its vllm/ package, ready to run."""
    archive = source_archive(version)
    root = CACHE / version / "src"
    marker = root / ".prepared"
    want = _stamp(archive.name, str(archive.stat().st_size), str(site), TRITON_NOTE, repr(sorted(SKIPPED)),
                  *(inspect.getsource(f) for f in (source_tree, _replace_root_conftest, _write_pytest_ini)))
    with _locked(CACHE / version / ".lock"):
        if marker.exists() and marker.read_text() == want:
            return root
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        log(f"{version}: unpacking tests/ from {archive.name}")
        with tarfile.open(archive) as tar:
            top = f"vllm-{version}/"
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(top):
                    continue
                name = m.name.removeprefix(top)
                # everything the tests may read (rust/ test vectors, ...) but vLLM's own package,
                # which must not shadow the wheel's, and the docs
                if name.split("/")[0] not in SKIPPED and (m.isfile() or m.isdir()):
                    m.name = name
                    members.append(m)
            tar.extractall(root, members, filter="data")
        _replace_root_conftest(root, _needs_triton(site))
        _write_pytest_ini(root)
        marker.write_text(want)
        return root


def _needs_triton(site: Path | None) -> bool:
    """Whether the release's CPU platform refuses every VllmConfig on x86 without triton-cpu (0.34)."""
    if site is None:
        import importlib.util

        site = Path(importlib.util.find_spec("vllm").origin).parents[1]
    cpu = site / "vllm" / "platforms" / "cpu.py"
    return cpu.exists() and "requires Triton (triton-cpu)" in cpu.read_text()


TRITON_NOTE = """
# vLLM's CPU platform refuses every VllmConfig on x86 without triton-cpu (vllm/platforms/cpu.py,
# check_and_update_config), and triton-cpu is not on the package index. No test of this suite
# runs a Triton kernel: the flag that check reads says Triton is there, for both runs alike.
import vllm.triton_utils  # noqa: E402

vllm.triton_utils.HAS_TRITON = True
"""


def _replace_root_conftest(root: Path, triton: bool) -> None:
    """vLLM's tests/conftest.py set aside; in its place the fixtures (and the
    --optional option) that the suite uses of it, copied unchanged."""
    original = root / "tests" / "conftest.py"
    kept = root / "tests" / "conftest.vllm.py.txt"
    source = original.read_text()
    original.rename(kept)
    tree = ast.parse(source)
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    fixtures = {name for name, n in functions.items()
                if any("fixture" in ast.unparse(d) for d in n.decorator_list)}
    suite = "\n".join(p.read_text(errors="replace") for p in (root / SUITE).rglob("*.py"))
    wanted = [name for name in fixtures if re.search(rf"\b{name}\b", suite)]
    todo = list(wanted)
    while todo:  # the fixtures those fixtures take
        for arg in functions[todo.pop()].args.args:
            if arg.arg in fixtures and arg.arg not in wanted:
                wanted.append(arg.arg)
                todo.append(arg.arg)
    hooks = [name for name in ("pytest_addoption", "pytest_collection_modifyitems") if name in functions]
    lines = source.splitlines()
    copied = []
    for name in hooks + sorted(wanted, key=lambda n: functions[n].lineno):
        n = functions[name]
        start = min([d.lineno for d in n.decorator_list], default=n.lineno)
        copied.append("\n".join(lines[start - 1 : n.end_lineno]))
    original.write_text(
        "# Written by vllm-frag-otel's scripts/vllm_peer_suite.py in place of vLLM's tests/conftest.py\n"
        "# (kept as conftest.vllm.py.txt: it imports tblib, model assets and GPU helpers). What\n"
        f"# {SUITE} uses of it, copied from it unchanged: {', '.join(hooks + sorted(wanted)) or 'nothing'};\n"
        "# its autouse fixtures (GPU memory and distributed clean-up, dynamo reset) are left out.\n"
        "import logging\nimport os\n\nimport pytest\n" + (TRITON_NOTE if triton else "") + "\n\n"
        + "\n\n\n".join(copied) + "\n"
    )


def _write_pytest_ini(root: Path) -> None:
    """vLLM's pytest markers, from its pyproject.toml; nothing else of its configuration."""
    markers = []
    pyproject = root / "pyproject.toml"
    if pyproject.exists():
        config = tomllib.loads(pyproject.read_text()).get("tool", {}).get("pytest", {}).get("ini_options", {})
        markers = config.get("markers", [])
    (root / "pytest.ini").write_text(
        "[pytest]\n# vLLM's own markers (its pyproject.toml); written by scripts/vllm_peer_suite.py\nmarkers =\n"
        + "".join(f"    {m}\n" for m in markers)
    )


def hf_home(names: set[str]) -> Path:
    """An offline HF_HOME holding the config.json of every model in `names` that MODELS knows."""
    import transformers

    home = CACHE / "hf-home"
    revision = "0" * 40
    with _locked(CACHE / "hf-home.lock"):
        for model in sorted(names & MODELS.keys()):
            repo = home / "hub" / f"models--{model.replace('/', '--')}"
            config = repo / "snapshots" / revision / "config.json"
            cls_name, values = MODELS[model]
            want = _stamp(transformers.__version__, json.dumps(MODELS[model], sort_keys=True),
                          inspect.getsource(hf_home))
            if config.exists() and (repo / ".stamp").exists() and (repo / ".stamp").read_text() == want:
                continue
            data = getattr(transformers, cls_name)(**values).to_dict()  # sub-configs as dicts: built by the class
            data["architectures"] = values["architectures"]
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(data, indent=1, default=str))
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(revision)
            (repo / ".stamp").write_text(want)
    return home


def models_named(root: Path) -> set[str]:
    text = "\n".join(p.read_text(errors="replace") for p in (root / SUITE).rglob("*.py")
                     if p.relative_to(root).as_posix() not in LEFT_OUT)
    return set(re.findall(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""", text))


# -- running --------------------------------------------------------------------------


@dataclass
class Run:
    mode: str  # "plain" or "plugin"
    outcomes: Path
    log: Path
    ledger: Path | None
    process: subprocess.Popen = None
    start: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None


def start_run(version: str, mode: str, root: Path, site: Path | None, home: Path, results: Path,
              left_out: dict[str, str], extra: list[str]) -> Run:
    run = Run(mode, results / f"{mode}.outcomes.jsonl", results / f"{mode}.log",
              results / "ledger.json" if mode == "plugin" else None)
    for path in (run.outcomes, run.log, run.ledger):
        if path is not None and path.exists():
            path.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV) and k != "PYTHONPATH"}
    env.update({
        "PYTHONPATH": os.pathsep.join(str(p) for p in (site, root, PEER) if p is not None),
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONHASHSEED": "0",
        "VLLM_FRAG_OTEL_EXPORTER": "none",
        # vLLM's own caches (model inspection results, ...): one per release and run, kept between
        # invocations; nothing shared with the other run or with ~/.cache/vllm
        "VLLM_CACHE_ROOT": str(CACHE / version / "vllm-cache" / mode),
    })
    args = [sys.executable, "-m", "pytest", SUITE, "-p", "no:cacheprovider", "-p", "outcomes",
            "--peer-outcomes", str(run.outcomes), "-q", "-rN", "--tb=short"]
    args += [f"--ignore={path}" for path in left_out]
    if mode == "plain":
        env.update({"VLLM_PLUGINS": "", "VLLM_FRAG_OTEL_ENABLED": "false"})
    else:
        env.update({"VLLM_PLUGINS": "frag_otel", "VLLM_FRAG_OTEL_ENABLED": "true"})
        args += ["-p", "ledger_check", "--peer-ledger", str(run.ledger)]
    args += extra
    run.start = time.monotonic()
    with open(run.log, "w") as out:
        run.process = subprocess.Popen(args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    return run


def read_outcomes(path: Path) -> tuple[int | None, dict[str, dict], dict]:
    collected, tests, extra = None, {}, {}
    if not path.exists():
        return collected, tests, extra
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if "collected" in record:
            collected = record["collected"]
        elif "test" in record:
            tests[record["test"]] = record
        else:
            extra.update(record)
    return collected, tests, extra


def wait(version: str, runs: list[Run]) -> None:
    """Until every run ended (killed after RUN_TIMEOUT), with a progress line every 15 s."""
    last = time.monotonic()
    while True:
        active = []
        for run in runs:
            if run.returncode is not None:
                continue
            if run.process.poll() is not None:
                run.returncode = run.process.returncode
                run.seconds = time.monotonic() - run.start
                log(f"{version}: run {run.mode} done in {run.seconds:.0f} s (pytest exit {run.returncode})")
                continue
            if time.monotonic() - run.start > RUN_TIMEOUT:
                run.process.kill()
            active.append(run)
        if not active:
            return
        now = time.monotonic()
        if now - last >= 15:
            last = now
            parts = []
            for run in active:
                collected, tests, _ = read_outcomes(run.outcomes)
                parts.append(f"{run.mode} {len(tests)}/{collected if collected is not None else '?'} tests "
                             f"({now - run.start:.0f} s)")
            log(f"{version}: " + ", ".join(parts))
        time.sleep(1)


def run_release(version: str, args) -> dict:
    """A second run of the same release (another checkout, a CI clone) waits: the
    runs of one release share their results directory and vLLM's caches."""
    with _locked(CACHE / version / "run.lock"):
        return _run_release(version, args)


def _run_release(version: str, args) -> dict:
    if not has_suite(version):
        log(f"{version}: its source archive carries no {SUITE}: nothing to run")
        return {"version": version, "ran": False, "ok": True}
    site = wheel_site(version)
    root = source_tree(version, site)
    named = models_named(root)
    home = hf_home(named)
    unknown = sorted(m for m in named if m not in MODELS and not m.startswith(("tests/", "vllm/")))
    if unknown:
        log(f"{version}: no config.json written for {', '.join(unknown)} (the tests naming them fail both ways)")
    results = CACHE / version / "results"
    results.mkdir(parents=True, exist_ok=True)
    extra = list(args.pytest_arg or [])
    left_out = {**LEFT_OUT, **(QUICK_LEFT_OUT if args.quick else {})}
    for path, why in left_out.items():
        log(f"{version}: left out {path}: {why}")
    log(f"{version}: running {SUITE} without and with the plugin"
        f" ({'in parallel' if args.parallel else 'one after the other'}; logs in {_short(results)})")
    runs = []
    for mode in ("plain", "plugin"):
        runs.append(start_run(version, mode, root, site, home, results, left_out, extra))
        if not args.parallel:
            wait(version, runs[-1:])
    wait(version, runs)
    return summarise(version, runs, results, site, left_out)


def _counts(tests: dict[str, dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in tests.values():
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    return counts


def summarise(version: str, runs: list[Run], results: Path, site: Path | None, left_out: dict[str, str]) -> dict:
    plain, plugin = runs
    problems = []
    collected_a, tests_a, info_a = read_outcomes(plain.outcomes)
    collected_b, tests_b, info_b = read_outcomes(plugin.outcomes)
    for run, collected, tests, info in ((plain, collected_a, tests_a, info_a), (plugin, collected_b, tests_b, info_b)):
        if run.returncode not in (0, 1):
            problems.append(f"the {run.mode} run ended with pytest exit status {run.returncode} (see {run.log})")
        if collected is None or len(tests) != collected:
            problems.append(f"the {run.mode} run reported {len(tests)} of {collected} collected tests")
        if info.get("vllm_version") != version:
            problems.append(f"the {run.mode} run imported vLLM {info.get('vllm_version')} from {info.get('vllm_file')}")
    if info_a.get("frag_otel_instrumented"):
        problems.append("the plain run had the plugin instrumenting vLLM")
    if not info_b.get("frag_otel_instrumented"):
        problems.append("the plugin run did not have the plugin instrumenting vLLM")
    differences = []
    for test in sorted(set(tests_a) | set(tests_b)):
        a = tests_a.get(test, {}).get("outcome", "missing")
        b = tests_b.get(test, {}).get("outcome", "missing")
        if a != b:
            differences.append({"test": test, "without": a, "with": b,
                                "reason_with": tests_b.get(test, {}).get("reason", "")})
    failing = {t: r for t, r in tests_a.items() if r["outcome"] in ("failed", "error")
               and tests_b.get(t, {}).get("outcome") == r["outcome"]}
    failing_file = results / "failing-both.txt"
    failing_file.write_text(
        f"# vLLM {version}: tests of {SUITE} that fail with and without the plugin, and why\n"
        + "".join(f"{t}\t{r['reason']}\n" for t, r in sorted(failing.items()))
        + "".join(f"# left out: {path}: {why}\n" for path, why in left_out.items())
    )
    ledger = json.loads(plugin.ledger.read_text()) if plugin.ledger and plugin.ledger.exists() else None
    if ledger is None:
        problems.append("the plugin run wrote no ledger counts")
        ledger = {}
    elif ledger.get("plugin_error"):
        problems.append(ledger["plugin_error"])
    if ledger.get("hook_errors"):
        problems.append(f"the plugin's hooks raised {ledger['hook_errors']} errors (contained by the plugin)")
    summary = {
        "version": version,
        "ran": True,
        "vllm_code": str(site) if site else "the .venv's vLLM",
        "tests": collected_a,
        "without": _counts(tests_a),
        "with": _counts(tests_b),
        "seconds_without": round(plain.seconds, 1),
        "seconds_with": round(plugin.seconds, 1),
        "outcome_differences": len(differences),
        "differences": differences[:50],
        "failing_both": len(failing),
        "failing_both_file": str(failing_file),
        "left_out": left_out,
        "checks": ledger.get("checks", 0),
        "calls_checked": ledger.get("calls_checked", 0),
        "pools": ledger.get("pools", 0),
        "mismatches": ledger.get("mismatches", 0),
        "mismatched_checks": ledger.get("mismatched_checks", 0),
        "mismatched_tests": ledger.get("mismatched_tests", {}),
        "mismatched_fields": ledger.get("mismatched_fields", {}),
        "mismatch_examples": ledger.get("examples", []),
        "hook_errors": ledger.get("hook_errors"),
        "problems": problems,
    }
    summary["ok"] = not problems and not differences and summary["mismatches"] == 0 and ledger.get("checks", 0) > 0
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _short(path: Path) -> str:
    """`path` with ~ for the home directory."""
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def summary_line(s: dict) -> str:
    if not s["ran"]:
        return f"vLLM {s['version']}: no {SUITE} in its source archive, nothing run"

    def counts(c: dict) -> str:
        return " ".join(f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
                        if c.get(k, 0) or k in ("passed", "failed"))

    return (
        f"vLLM {s['version']}: {s['tests']} tests; without the plugin {counts(s['without'])} "
        f"({s['seconds_without']:.0f} s); with it {counts(s['with'])} ({s['seconds_with']:.0f} s); "
        f"outcome differences {s['outcome_differences']}; ledger checks {s['checks']} "
        f"(after {s['calls_checked']} outermost calls and at each test's end) on {s['pools']} pools; "
        f"mismatches {s['mismatches']}; hook errors {s['hook_errors']}; "
        f"failing both ways {s['failing_both']} (named in {_short(Path(s['failing_both_file']))})"
        + ("" if s["ok"] else " -- FAILED")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", default=list(SUPPORTED), help=f"vLLM releases (default: {' '.join(SUPPORTED)})")
    parser.add_argument("--serial", dest="parallel", action="store_false",
                        help="run without and with the plugin one after the other (default: both at once)")
    parser.add_argument("--pytest-arg", action="append", help="one more pytest argument for both runs (-k ..., a node id)")
    parser.add_argument("--quick", action="store_true",
                        help="also leave out the files that fail here both ways for want of a model's "
                        "weights or torchvision, the slowest (CI)")
    parser.add_argument("--json", type=Path, help="write every release's summary to this file")
    args = parser.parse_args(argv)
    summaries = []
    for version in args.versions:
        started = time.monotonic()
        summary = run_release(version, args)
        summaries.append(summary)
        if summary["ran"]:
            for problem in summary["problems"]:
                log(f"{version}: PROBLEM: {problem}")
            for d in summary["differences"][:10]:
                log(f"{version}: outcome differs: {d['test']}: without {d['without']}, with {d['with']} {d['reason_with']}")
            for e in summary["mismatch_examples"][:10]:
                log(f"{version}: mismatch in {e['test']} {e['where']}, pool {e['pool']}: {e['field']}: "
                    f"ledger {e['ledger']}, recount {e['recount']}")
            log(f"{version}: {time.monotonic() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))
    print()
    for summary in summaries:
        print(summary_line(summary))
    return 0 if all(s["ok"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
