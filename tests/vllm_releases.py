"""vLLM releases other than `.venv`'s, for the version matrix, the peer suite and the canary.

A release's wheel is unpacked, without its dependencies and without its CUDA
kernels, into `<cache>/vllm-releases/<version>/site` (downloaded once, ~240 MB
each) and put ahead of `.venv`'s vLLM on PYTHONPATH: the same torch and
libraries, that release's scheduler, KV-cache manager and block pool, which is
all the exactness suites drive. The cache lives outside the checkout
(`VLLM_FRAG_OTEL_DEV_CACHE`, default `~/.cache/vllm-frag-otel-dev`, as the e2e's
stack and venv), so a fresh clone does not download the releases again.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VLLM_FRAG_OTEL_DEV_CACHE") or Path.home() / ".cache" / "vllm-frag-otel-dev")
RELEASES = CACHE / "vllm-releases"

# Every suite that checks a number against vLLM's own objects or a brute-force
# recount: the oracle on every layout, each hook path, several pools, the
# self-check and the start-up probe, the final point at stop, the Prometheus scrape.
EXACTNESS_SUITES = (
    "tests/test_oracle.py",
    "tests/test_hook_paths.py",
    "tests/test_foreign_pools.py",
    "tests/test_self_check.py",
    "tests/test_probe.py",
    "tests/test_shutdown.py",
    "tests/test_prometheus.py",
)


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          check=True, capture_output=True, text=True, timeout=timeout)


def release_site(version: str) -> Path:
    """The unpacked wheel of vLLM `version` (its Python code and metadata), cached."""
    site = RELEASES / version / "site"
    ready = RELEASES / version / ".unpacked"
    RELEASES.mkdir(parents=True, exist_ok=True)
    with open(RELEASES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            download = RELEASES / version / "wheel"
            _pip("download", "-q", "--no-deps", "--only-binary=:all:", f"vllm=={version}", "-d", str(download),
                 timeout=1200)
            [wheel] = download.glob("vllm-*.whl")
            with zipfile.ZipFile(wheel) as archive:  # the Python code, not the CUDA kernels (~1 GB)
                archive.extractall(site, [m for m in archive.namelist() if ".so" not in Path(m).name])
            wheel.unlink()  # the unpacked code is what is kept
            ready.write_text(version)
    return site


def newest_release() -> str:
    """The newest vLLM release on the package index pip is configured with."""
    listing = _pip("index", "versions", "vllm", timeout=300).stdout
    match = re.search(r"^vllm \(([^)]+)\)", listing, re.M)
    if match is None:
        raise RuntimeError(f"pip index versions vllm printed no version:\n{listing[-2000:]}")
    return match.group(1)


def environment(version: str) -> dict[str, str]:
    """The environment that runs the project's tests on vLLM `version`'s code."""
    path = [str(release_site(version)), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def loaded_version(env: dict[str, str]) -> tuple[str, str]:
    """(vllm.__version__, vllm.__file__) as a fresh interpreter with `env` sees them."""
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__, vllm.__file__)"],
                           env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if probe.returncode != 0:
        raise RuntimeError(probe.stderr[-2000:])
    version, where = probe.stdout.split()[-2:]
    return version, where


def run_suites(version: str, suites: tuple[str, ...], timeout: float = 2400) -> subprocess.CompletedProcess:
    """pytest on `suites` with vLLM `version`'s code, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
                          env=environment(version), capture_output=True, text=True, timeout=timeout, cwd=REPO)
