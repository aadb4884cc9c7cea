"""pytest plugin of the peer suite (scripts/vllm_peer_suite.py): each test's outcome, as it ends.

`-p outcomes --peer-outcomes FILE`: FILE gets one JSON line per test
({"test": node id, "outcome": passed | failed | error | skipped | xfailed | xpassed,
"reason": the first line of a failure or skip}), after a first line
{"collected": N}, and a last line with the vLLM version and file the run
imported and whether vllm-frag-otel instrumented it. The script reads it while the run goes on (progress) and
compares two runs' outcomes test by test.
"""

from __future__ import annotations

import json
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--peer-outcomes", default=None, help="write each test's outcome to this JSON-lines file")


class _Outcomes:
    def __init__(self, path: str):
        self.file = open(path, "w", buffering=1)  # noqa: SIM115 - open for the whole run
        self.current: dict[str, dict] = {}

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        self.write({"collected": len(session.items)})

    def pytest_runtest_logreport(self, report):
        record = self.current.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "reason": "",
                                                          "seconds": 0.0})
        record["seconds"] = round(record["seconds"] + report.duration, 3)
        if report.when == "call" and hasattr(report, "wasxfail"):
            record["outcome"] = "xpassed" if report.passed else "xfailed"
            record["reason"] = str(report.wasxfail)[:300]
        elif report.skipped and record["outcome"] == "passed":
            record["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            longrepr = report.longrepr
            record["reason"] = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))[:300]
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
            if record["outcome"] not in ("failed", "error"):
                record["outcome"] = outcome
                record["reason"] = _first_line(report)
        if report.when == "teardown":
            self.write(self.current.pop(report.nodeid))

    def pytest_sessionfinish(self, session):
        for record in self.current.values():  # interrupted mid-test
            self.write(record)
        vllm = sys.modules.get("vllm")
        hooks = sys.modules.get("vllm_frag_otel.plugin.hooks")  # looked up, not imported
        self.write({
            "vllm_version": getattr(vllm, "__version__", None),
            "vllm_file": getattr(vllm, "__file__", None),
            "frag_otel_instrumented": bool(hooks is not None and hooks.instrumentor.is_instrumented),
        })
        self.file.close()


def _first_line(report) -> str:
    """The error's first two lines (a pydantic error names its cause on the second)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:2])[:300]


def pytest_configure(config):
    path = config.getoption("--peer-outcomes")
    if path:
        config.pluginmanager.register(_Outcomes(path), "peer-outcomes")
