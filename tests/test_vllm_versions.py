"""The exactness suites against every other supported vLLM release.

`.venv` holds vLLM 0.33 (every other test) and the e2e's venv the CPU build of
0.32 (real inference). Each other release's code is unpacked from its wheel
(`vllm_releases.release_site`, cached outside the checkout) and put ahead of
`.venv`'s vLLM on PYTHONPATH; the suites then run on it in a fresh interpreter.
The newest release, the one `pip install vllm` gives, runs every exactness
suite; the older ones the oracle on every layout, the hook paths and the probe.
`make test-vllm-newest` runs the same against whatever is newest on the index.
"""

from __future__ import annotations

import pytest
from vllm_releases import EXACTNESS_SUITES, RELEASES, environment, loaded_version, run_suites

CORE_SUITES = ("tests/test_oracle.py", "tests/test_hook_paths.py", "tests/test_probe.py")
MATRIX = {"0.30.0": CORE_SUITES, "0.31.0": CORE_SUITES, "0.34.0": EXACTNESS_SUITES}


@pytest.mark.cpu_heavy
@pytest.mark.parametrize("version", MATRIX)
def test_exactness_on_vllm_release(version):
    loaded, where = loaded_version(environment(version))
    assert loaded == version and where.startswith(str(RELEASES)), (loaded, where)
    run = run_suites(version, MATRIX[version])
    last = run.stdout.splitlines()[-1] if run.stdout else ""
    assert run.returncode == 0, f"vLLM {version}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in last and "skipped" not in last, run.stdout[-500:]
