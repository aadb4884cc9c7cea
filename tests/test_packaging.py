"""The wheel as users install it: the plugin's lean runtime, without vLLM and without the report extra.

The wheel is built from the work tree and installed into a virtual environment of
its own (pip fetches numpy and the OpenTelemetry packages through the machine's pip
configuration and keeps them in its cache). That environment is kept under
.cache/, one per pyproject.toml: a change of dependencies makes a new one, and each
run reinstalls the freshly built wheel into it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTRA = "pip install 'vllm-frag-otel[report]'"


def _run(*cmd, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the work tree (built from a copy: no build/ or egg-info in the tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "vllm_frag_otel", source / "vllm_frag_otel",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    # the test environment's setuptools when it has one (no download); else pip's isolated build
    isolation = ["--no-build-isolation"] if find_spec("setuptools") else []
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", out, source)
    [built] = out.glob("vllm_frag_otel-*.whl")
    return built


@pytest.fixture(scope="module")
def lean(wheel) -> Path:
    """A virtual environment with only the wheel and its unconditional dependencies: its bin/."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    cache = REPO / ".cache"
    cache.mkdir(exist_ok=True)
    venv = cache / f"lean-venv-{key}"
    with open(cache / f"lean-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once: one builds, the other waits
        ready = venv / ".ready"
        if ready.exists():
            _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel)
        else:
            shutil.rmtree(venv, ignore_errors=True)
            _run(sys.executable, "-m", "venv", venv)
            _run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel)
            ready.write_text(str(wheel.name))
    _run(venv / "bin" / "python", "-m", "pip", "check")
    _prune(cache, keep=venv)
    return venv / "bin"


def _prune(cache: Path, keep: Path) -> None:
    """Environments of earlier pyproject.toml versions, unless a test run is using one now."""
    for lock_path in cache.glob("lean-venv-*.lock"):
        venv = lock_path.with_suffix("")
        if venv == keep:
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(venv, ignore_errors=True)
            lock_path.unlink()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "VLLM_", "PYTHON")) and k != "VIRTUAL_ENV"}
    return {**env, **extra}


PROBE = textwrap.dedent("""
    import importlib.metadata as md, json, sys
    import vllm_frag_otel
    from vllm_frag_otel.plugin.hooks import instrumentor
    vllm_frag_otel.register()
    vllm_frag_otel.register()  # vLLM calls it in every process, sometimes twice
    loaded = sorted(m for m in ("matplotlib", "tqdm", "vllm", "torch") if m in sys.modules)
    try:
        import matplotlib
        matplotlib_importable = True
    except ImportError:
        matplotlib_importable = False
    from vllm_frag_otel.export.telemetry import runtime
    dist = md.distribution("vllm-frag-otel")
    print(json.dumps({
        "file": vllm_frag_otel.__file__,
        "loaded": loaded,
        "instrumented": instrumentor.is_instrumented,
        "runtime": runtime() is not None,
        "matplotlib_importable": matplotlib_importable,
        "plugins": sorted((e.name, e.value, e.dist.name) for e in md.entry_points(group="vllm.general_plugins")),
        "scripts": sorted((e.name, e.value) for e in dist.entry_points if e.group == "console_scripts"),
        "requires": dist.requires,
    }))
""")


def test_the_wheel_alone_loads_as_a_plugin_without_vllm_and_says_so_once(lean, tmp_path):
    result = _run(lean / "python", "-c", PROBE, cwd=tmp_path, env=_clean_env())
    probe = json.loads(result.stdout)
    # the wheel's copy, not the work tree's
    assert Path(probe["file"]).is_relative_to(lean.parent), probe["file"]
    assert probe["plugins"] == [["frag_otel", "vllm_frag_otel:register", "vllm-frag-otel"]]
    assert probe["scripts"] == [["vllm-frag-otel", "vllm_frag_otel.cli:main"]]
    # nothing instrumented, no telemetry started, nothing heavy imported
    assert probe["instrumented"] is False
    assert probe["runtime"] is False
    assert probe["loaded"] == []
    assert probe["matplotlib_importable"] is False
    # the unconditional requirements are the runtime's; the CLI's charts and bars are an extra
    unconditional = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                     for r in probe["requires"] if "extra ==" not in r}
    assert not unconditional & {"matplotlib", "tqdm", "vllm", "torch"}, probe["requires"]
    assert {"numpy", "opentelemetry-sdk"} <= unconditional, probe["requires"]
    extras = {r.split(";")[0].split(">")[0].strip().lower() for r in probe["requires"] if 'extra == "report"' in r}
    assert extras == {"matplotlib", "tqdm"}, probe["requires"]
    # one warning, naming what is missing; no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not instrumenting vLLM: vLLM is not installed in this environment" in lines[0], lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["report"], "vllm-frag-otel: error: report needs the report extra for its charts (matplotlib is not installed): "
                 f"{EXTRA}, or pass --no-plots"),
    (["simulate", "--sweep"], "vllm-frag-otel: error: simulate --sweep needs the report extra (matplotlib, tqdm"
                              f" are not installed): {EXTRA}"),
    (["simulate"], "vllm-frag-otel: error: simulate runs vLLM's scheduler, and vLLM is not installed in this environment"
                   " (supported: vllm>=0.30,<0.35; the plugin never installs it)"),
])
def test_the_cli_without_the_extra_names_what_to_install_in_one_line(lean, tmp_path, argv, message):
    result = subprocess.run([str(lean / "vllm-frag-otel"), *argv], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=_clean_env())
    assert result.returncode == 1, result  # this environment cannot run it: not a wrong command
    assert result.stderr.splitlines() == [message], result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written before giving up


def test_the_plugin_path_imports_neither_matplotlib_nor_tqdm_where_both_are_installed(tmp_path):
    """In this (dev) environment both are installed: loading the plugin or the CLI module still leaves them out."""
    assert find_spec("matplotlib") and find_spec("tqdm")
    probe = textwrap.dedent("""
        import sys
        sys.modules["vllm"] = None  # no vLLM: register() gives up after its import, as in the lean install
        import vllm_frag_otel
        vllm_frag_otel.register()
        import vllm_frag_otel.cli, vllm_frag_otel.analysis.report, vllm_frag_otel.analysis.sweep
        print(sorted(m for m in ("matplotlib", "tqdm") if m in sys.modules))
    """)
    result = _run(sys.executable, "-c", probe, cwd=REPO, env=_clean_env())
    assert result.stdout.strip() == "[]"
    assert "not instrumenting vLLM" in result.stderr


def test_report_without_the_extra_still_writes_the_report_with_no_plots(lean, tmp_path):
    """The way out the missing-extra line offers: a simulated run's files, reported from the lean install."""
    run = tmp_path / "run"
    simulate = subprocess.run(
        [sys.executable, "-m", "vllm_frag_otel.cli", "simulate", "--num-requests", "6", "--num-blocks", "64",
         "--max-num-seqs", "4", "--workload", "alpaca", "--output", str(run)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_FRAG_OTEL_"))})
    assert simulate.returncode == 0, simulate.stderr[-3000:]
    out = tmp_path / "report"
    result = subprocess.run([str(lean / "vllm-frag-otel"), "report", "--no-plots", str(run / "telemetry"),
                             "--output", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    written = {p.name for p in out.iterdir()}
    assert "report.html" in written and not any(name.endswith(".png") for name in written), written
