"""The scheduler-level exactness tests against every other supported vLLM release.

`.venv` holds vLLM 0.33 (every other test) and the e2e's venv the CPU build of
0.32. Each older release's wheel is unpacked, without its dependencies, into
`.cache/vllm-releases/<version>/` (downloaded once, ~300 MB; its CUDA kernels left out) and put ahead of
`.venv`'s vLLM on PYTHONPATH: the same torch and libraries, that release's
scheduler, KV-cache manager and block pool, which is all these tests drive.
The hybrid-layout oracle and the hook-path tests then run on it in a fresh
interpreter.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASES = REPO / ".cache" / "vllm-releases"
VERSIONS = ("0.30.0", "0.31.0")
EXACTNESS_TESTS = ("tests/test_oracle.py", "tests/test_hook_paths.py")


def _release(version: str) -> Path:
    """The unpacked wheel of vLLM `version` (its Python code and metadata), cached."""
    site = RELEASES / version / "site"
    ready = RELEASES / version / ".unpacked"
    RELEASES.mkdir(parents=True, exist_ok=True)
    with open(RELEASES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            download = RELEASES / version / "wheel"
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                            "--only-binary=:all:", f"vllm=={version}", "-d", str(download)],
                           check=True, capture_output=True, timeout=1200)
            [wheel] = download.glob("vllm-*.whl")
            with zipfile.ZipFile(wheel) as archive:  # the Python code, not the CUDA kernels (~1 GB)
                archive.extractall(site, [m for m in archive.namelist() if ".so" not in Path(m).name])
            wheel.unlink()  # the unpacked code is what is kept
            ready.write_text(version)
    return site


@pytest.mark.parametrize("version", VERSIONS)
def test_exactness_on_vllm_release(version):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_release(version)), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__, vllm.__file__)"],
                           env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert probe.returncode == 0, probe.stderr[-2000:]
    loaded, where = probe.stdout.split()[-2:]
    assert loaded == version and where.startswith(str(RELEASES)), probe.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EXACTNESS_TESTS],
                         env=env, capture_output=True, text=True, timeout=2400, cwd=REPO)
    assert run.returncode == 0, f"vLLM {version}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout.splitlines()[-1] and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]
