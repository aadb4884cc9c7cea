"""The request span's GenAI attribute names: the current semantic conventions
(`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
`gen_ai.usage.cache_read.input_tokens`) on what the plugin writes, and
`vllm-frag-otel report` over files written before them (the deprecated
`gen_ai.usage.prompt_tokens` / `gen_ai.usage.completion_tokens`) reads the
same requests.

One run of the real `vllm-frag-otel simulate` (a fresh interpreter, the plugin
loaded by vLLM's entry point) with shared prompt prefixes, read back with plain
json.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import simulate_into

from vllm_frag_otel.analysis import otlp_read
from vllm_frag_otel.analysis import report

SIMULATE = ["--workload", "alpaca", "--num-requests", "30", "--num-blocks", "40", "--max-num-seqs", "6",
            "--prefix-groups", "3", "--prefix-len", "48", "--seed", "5"]
CURRENT = {"gen_ai.usage.input_tokens": "gen_ai.usage.prompt_tokens",
           "gen_ai.usage.output_tokens": "gen_ai.usage.completion_tokens"}
DEPRECATED = set(CURRENT.values())
CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
HITS = "vllm.kv_cache.prefix_cache.hit_tokens"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    return simulate_into(tmp_path_factory.mktemp("names"), SIMULATE, export_every=5) / "telemetry"


def _raw_spans(telemetry: Path) -> list[dict]:
    spans = []
    for path in telemetry.glob("traces-*.jsonl"):
        for line in path.read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    spans += [{a["key"]: next(iter(a["value"].values())) for a in s["attributes"]}
                              for s in ss["spans"] if s["name"] == "vllm.kv_cache.request"]
    return spans


def _rewrite(telemetry: Path, to: Path, attributes) -> Path:
    """A copy of a run's files, every request span's attribute list passed through `attributes`."""
    to.mkdir()
    for path in telemetry.iterdir():
        if not path.name.startswith("traces-"):
            shutil.copy(path, to / path.name)
            continue
        lines = []
        for line in path.read_text().splitlines():
            request = json.loads(line)
            for rs in request["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        if span["name"] == "vllm.kv_cache.request":
                            span["attributes"] = attributes(span["attributes"])
            lines.append(json.dumps(request))
        (to / path.name).write_text("\n".join(lines) + "\n")
    return to


def _as_before(attributes: list[dict]) -> list[dict]:
    """The span as the plugin wrote it before the current GenAI names: the deprecated
    token names, no cache_read."""
    return [{**a, "key": CURRENT.get(a["key"], a["key"])} for a in attributes if a["key"] != CACHE_READ]


def _requests_csv(telemetry: Path, out: Path) -> list[dict]:
    report.build([telemetry], out, pictures=False)
    with (out / "requests.csv").open() as f:
        return list(csv.DictReader(f))


def test_spans_carry_the_current_genai_names(recorded):
    spans = _raw_spans(recorded)
    assert len(spans) == 30
    for span in spans:
        assert not DEPRECATED & set(span), span
        assert int(span["gen_ai.usage.input_tokens"]) > 0 and int(span["gen_ai.usage.output_tokens"]) > 0
        # prefix-cache hits at first admission, under both names
        assert span[CACHE_READ] == span[HITS]
        assert int(span[CACHE_READ]) <= int(span["gen_ai.usage.input_tokens"])
        assert isinstance(span["gen_ai.request.id"], str)  # the join with vLLM's llm_request span
    assert any(int(span[CACHE_READ]) > 0 for span in spans), "no span tells of a prefix hit"
    read = {r.request_id: r for r in otlp_read.read([recorded]).spans}
    assert {rid: (r.prompt_tokens, r.output_tokens, r.hit_tokens) for rid, r in read.items()} == {
        s["vllm.request.id"]: (int(s["gen_ai.usage.input_tokens"]), int(s["gen_ai.usage.output_tokens"]),
                               int(s[CACHE_READ])) for s in spans}


def test_report_over_files_with_the_deprecated_names_reads_the_same_requests(recorded, tmp_path):
    old = _rewrite(recorded, tmp_path / "old", _as_before)
    spans = _raw_spans(old)
    assert spans and all(DEPRECATED <= set(s) and not {*CURRENT, CACHE_READ} & set(s) for s in spans)
    before, now = _requests_csv(old, tmp_path / "report-old"), _requests_csv(recorded, tmp_path / "report-new")
    assert len(now) == 30 and before == now
    assert any(int(r["hit_tokens"]) > 0 for r in now) and all(r["output_tokens"] for r in now)


def test_cache_read_alone_gives_the_hits(recorded, tmp_path):
    only = _rewrite(recorded, tmp_path / "only", lambda attributes: [a for a in attributes if a["key"] != HITS])
    read = {r.request_id: r.hit_tokens for r in otlp_read.read([only]).spans}
    assert read == {r.request_id: r.hit_tokens for r in otlp_read.read([recorded]).spans}
    assert any(read.values())
