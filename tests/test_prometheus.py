"""The Prometheus scrape option: vLLM's real scheduler with the plugin loaded through its entry
point and configured from the environment, as vLLM's engine process sees it; /metrics is
scraped over HTTP while the scheduler runs, and read with prometheus_client's own text parser.

- gauges equal a brute-force recount of vLLM's pool (tests/oracle.py) at the scrape;
- every point of the OTLP path's export (the OTLP/JSON file exporter, same moment) is served
  with the same value under the name Prometheus gives it over OTLP (histograms: every bucket);
- the port is OTEL_EXPORTER_PROMETHEUS_PORT + the engine's data-parallel rank;
- a port in use is one warning naming it and the variable, and the run (and the other
  exporter) goes on; the missing extra and bad values are one warning each;
- vLLM's own prometheus_client registry is never touched; stop frees the port.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sys
import threading
import time
import urllib.request
from contextlib import closing

import pytest
from prometheus_client.parser import text_string_to_metric_families

import oracle
from vllm_frag_otel import analyzer_for, config
from vllm_frag_otel.export import telemetry
from vllm_frag_otel.sim import simulator as sim
from vllm_frag_otel.sim import workloads

SHAPE = sim.EngineShape(num_blocks=100, block_size=16, max_num_seqs=16)
HOST = "127.0.0.1"
EXTRA = "pip install 'vllm-frag-otel[prometheus]'"


def _free_base_port(span: int = 4) -> int:
    """A port p such that p .. p + span - 1 are free now."""
    for _ in range(50):
        with closing(socket.socket()) as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        if base + span > 65535:
            continue
        try:
            for port in range(base, base + span):
                with closing(socket.socket()) as probe:
                    probe.bind((HOST, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


@pytest.fixture()
def engine_env(plugin, monkeypatch, tmp_path):
    """Set the plugin's environment, then build schedulers: the runtime starts from it (as in
    vLLM's engine process), and is stopped and replaced by the previous one afterwards."""
    base = _free_base_port()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", HOST)
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(base))
    monkeypatch.setenv("VLLM_FRAG_OTEL_FILE_DIR", str(tmp_path / "telemetry"))
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # exports only when a test flushes
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    config._reported.clear()
    previous = telemetry.install(None)

    def set_env(**env: str) -> int:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return base

    yield set_env
    current = telemetry.runtime()
    if current is not None and current is not previous:
        current.shutdown()
    telemetry.install(previous)


def _pressured():
    """vLLM's scheduler on a workload that preempts, evicts and shares prefixes."""
    scheduler = sim.build_scheduler(SHAPE)
    specs = workloads.generate("sharegpt", 40, seed=3, max_len=800)
    for request in sim.make_requests([(s.prompt_tokens, s.output_len) for s in specs], SHAPE.block_size):
        scheduler.add_request(request)
    return scheduler


def _scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, by prometheus_client's parser; no sample twice."""
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"served twice: {key}"
            samples[key] = sample.value
    return samples


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    return _samples(_scrape_text(port))


def _value(samples, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def _check_against_the_pool(samples, scheduler) -> dict:
    """Every gauge the oracle can recount, from vLLM's own blocks and block tables."""
    truth = oracle.brute_force(scheduler)
    state = "vllm_kv_cache_block_state"
    assert _value(samples, "vllm_kv_cache_blocks", **{state: "used"}) == truth["used_blocks"]
    assert _value(samples, "vllm_kv_cache_blocks", **{state: "cached"}) == truth["cached_blocks"]
    assert _value(samples, "vllm_kv_cache_blocks", **{state: "empty"}) == truth["free_blocks"] - truth["cached_blocks"]
    assert _value(samples, "vllm_kv_cache_block_limit") == truth["num_blocks"]
    assert _value(samples, "vllm_kv_cache_free_runs") == truth["free_runs"]
    assert _value(samples, "vllm_kv_cache_free_run_largest") == truth["largest_free_run"]
    assert _value(samples, "vllm_kv_cache_fragmentation_external_ratio") == pytest.approx(truth["external_fragmentation"])
    assert _value(samples, "vllm_kv_cache_fragmentation_internal_ratio") == pytest.approx(truth["internal_fragmentation"])
    assert _value(samples, "vllm_kv_cache_slot_utilization_ratio") == pytest.approx(truth["slot_utilization"])
    assert _value(samples, "vllm_kv_cache_requests") == truth["tracked_requests"]
    assert _value(samples, "vllm_kv_cache_slots", vllm_kv_cache_slot_state="used") == truth["used_slots"]
    assert _value(samples, "vllm_kv_cache_slots", vllm_kv_cache_slot_state="unused") == truth["unused_slots"]
    assert _value(samples, "vllm_kv_cache_partial_blocks") == truth["partial_blocks"]
    assert _value(samples, "vllm_kv_cache_group_blocks") == truth["groups"][0]["used_blocks"]
    return truth


def test_a_scrape_mid_run_equals_a_brute_force_recount_of_the_pool(engine_env):
    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus")
    scheduler = _pressured()
    analyzer = analyzer_for(scheduler)
    rng = random.Random(0)
    seen = {"used": 0, "attempts": [], "evictions": 0, "preemptions": 0, "failures": 0}
    steps = 0
    while scheduler.has_requests():
        sim.step(scheduler, rng)
        steps += 1
        if steps % 60:
            continue
        samples = _scrape(port)  # mid-run, between two scheduler steps
        truth = _check_against_the_pool(samples, scheduler)
        seen["used"] = max(seen["used"], truth["used_blocks"])
        snapshot = analyzer.snapshot()
        attempts = sum(v for (n, _), v in samples.items() if n == "vllm_kv_cache_allocation_attempts_total")
        assert attempts == snapshot.allocation_attempts
        # every allocate_slots call is timed here (conftest: sample rate 1): the histogram counts them all
        timed = sum(v for (n, _), v in samples.items() if n == "vllm_kv_cache_allocation_duration_seconds_count")
        assert timed == snapshot.allocation_attempts
        evictions = sum(v for (n, _), v in samples.items() if n == "vllm_kv_cache_block_evictions_total")
        assert evictions == snapshot.evictions
        assert _value(samples, "vllm_kv_cache_block_cache_duration_seconds_count") == snapshot.evictions
        assert _value(samples, "vllm_kv_cache_preemptions_total") == snapshot.preemptions
        seen["attempts"].append(attempts)
        seen["evictions"], seen["preemptions"] = evictions, snapshot.preemptions
        seen["failures"] = _value(samples, "vllm_kv_cache_allocation_attempts_total",
                                  vllm_kv_cache_allocation_outcome="failure")
    assert len(seen["attempts"]) >= 4 and seen["attempts"] == sorted(seen["attempts"])
    # the workload did what makes the numbers worth checking
    assert seen["used"] > 50 and seen["evictions"] > 0 and seen["preemptions"] > 0 and seen["failures"] > 0
    final = _scrape(port)
    _check_against_the_pool(final, scheduler)
    assert _value(final, "vllm_kv_cache_requests") == 0
    assert _value(final, "vllm_frag_otel_active") == 1


def _prometheus_name(metric: dict) -> tuple[str, str]:
    """(Prometheus name, kind) of an OTLP/JSON metric, by the OTel/Prometheus naming rules:
    dots to underscores, unit suffix (s: seconds, 1 on a gauge: ratio, {...}: none), _total
    on monotonic sums."""
    name = metric["name"].replace(".", "_")
    unit = metric.get("unit", "")
    kind = next(k for k in ("gauge", "sum", "histogram") if k in metric)
    if unit == "s":
        name += "_seconds"
    elif unit == "1" and kind == "gauge":
        name += "_ratio"
    if kind == "sum" and metric["sum"].get("isMonotonic"):
        name += "_total"
    return name, kind


def _labels(point: dict, resource: dict) -> set[tuple[str, str]]:
    def text(value: dict) -> str:
        (kind, v), = value.items()
        return {"boolValue": lambda: "true" if v else "false"}.get(kind, lambda: str(v))()

    labels = {(a["key"].replace(".", "_"), text(a["value"])) for a in point.get("attributes", [])}
    promoted = {a["key"]: a["value"] for a in resource.get("attributes", [])
                if a["key"] in ("host.name", "service.name", "service.instance.id")}
    return labels | {(k.replace(".", "_"), text(v)) for k, v in promoted.items()}


def test_every_point_the_otlp_path_exports_is_served_with_the_same_value(engine_env, tmp_path):
    """OTLP (here its JSON file form) and /metrics at the same moment: nothing missing, nothing
    different; the histograms (added at export, not recorded by SDK instruments) bucket by bucket."""
    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="file,prometheus")
    scheduler = _pressured()
    rng = random.Random(1)
    for _ in range(240):
        sim.step(scheduler, rng)
    runtime = telemetry.runtime()
    runtime.force_flush()  # the OTLP path's export ...
    runtime.force_flush()  # (twice: a flush must not leave anything for the next scrape to serve twice)
    samples = _scrape(port)  # ... and the scrape, with no step in between
    (metrics_file,) = (tmp_path / "telemetry").glob("metrics-*.jsonl")
    export = json.loads(metrics_file.read_text().splitlines()[-1])
    checked = {"gauge": 0, "sum": 0, "histogram": 0}
    buckets = 0
    for rm in export["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            if sm["scope"]["name"] != telemetry.SCOPE:
                continue
            for metric in sm["metrics"]:
                name, kind = _prometheus_name(metric)
                for point in metric[kind]["dataPoints"]:
                    labels = _labels(point, rm["resource"])
                    if kind != "histogram":
                        expected = float(point.get("asInt", point.get("asDouble", 0)))
                        assert _value(samples, name, **dict(labels)) == pytest.approx(expected), (name, labels)
                    else:
                        assert _value(samples, name + "_count", **dict(labels)) == int(point["count"]), name
                        assert _value(samples, name + "_sum", **dict(labels)) == pytest.approx(point["sum"]), name
                        cumulative = 0
                        bounds = [*point["explicitBounds"], float("inf")]
                        for bound, count in zip(bounds, point["bucketCounts"], strict=True):
                            cumulative += int(count)
                            le = "+Inf" if bound == float("inf") else str(float(bound))
                            assert _value(samples, name + "_bucket", le=le, **dict(labels)) == cumulative, (name, le)
                            buckets += 1
                    checked[kind] += 1
    # all of it: every gauge, counter and histogram point the plugin exports
    assert checked["gauge"] >= 14 and checked["sum"] >= 12 and checked["histogram"] == 4, checked
    assert buckets > 40
    served = {n for n, _ in samples if n.startswith(("vllm_kv_cache", "vllm_frag_otel"))}
    assert {"vllm_kv_cache_allocation_duration_seconds_bucket", "vllm_kv_cache_block_cache_duration_seconds_bucket",
            "vllm_kv_cache_block_idle_duration_seconds_bucket"} <= served
    assert _value(samples, "vllm_kv_cache_block_idle_duration_seconds_count") > 0


def _promoted_by_the_otlp_path() -> list[str]:
    """The resource attributes Prometheus' OTLP receiver promotes to labels, read from the
    shipped deploy/prometheus/prometheus.yml (the other path to the same series)."""
    import yaml

    from helpers import REPO

    config_file = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    return list(config_file["otlp"]["promote_resource_attributes"])


def test_every_resource_attribute_the_otlp_path_promotes_is_a_label_of_every_scraped_series(engine_env,
                                                                                               monkeypatch):
    """The scrape path and the OTLP path (deploy/prometheus/prometheus.yml) must give the same
    series the same labels, or rules and dashboards that select by, say, service_namespace find
    the pushed series and miss the scraped ones. The list is read from the yml, not copied here:
    an attribute added there and not to the scrape path fails this test. Every attribute is set
    by the operator (OTEL_RESOURCE_ATTRIBUTES, which wins over the plugin's own values) to a
    value of its own, so each label is checked for its value, on every series of the plugin (the
    engine's own attributes, also on every point, keep the engine's values)."""
    promoted = _promoted_by_the_otlp_path()
    assert {"service.name", "service.namespace", "host.name"} <= set(promoted)  # the file was read
    values = {name: f"v{i}-{name.replace('.', '-')}" for i, name in enumerate(promoted)}
    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus", VLLM_FRAG_OTEL_SPANS="false",
                      OTEL_RESOURCE_ATTRIBUTES=",".join(f"{k}={v}" for k, v in values.items()))
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    scheduler = _pressured()
    rng = random.Random(7)
    for _ in range(20):
        sim.step(scheduler, rng)
    samples = _scrape(port)
    # the engine's own attributes are also on every point, and a point's attribute wins over a
    # promoted resource attribute of the same name on both paths (Prometheus' OTLP translation too)
    from vllm_frag_otel.plugin.hooks import _engine_attributes

    engine = _engine_attributes(scheduler.vllm_config)
    assert "service.version" in engine  # (so the pool's series carry the engine's, not the operator's)
    allowed = {name.replace(".", "_"): {value, str(engine.get(name, value))} for name, value in values.items()}
    ours = [(name, dict(labels)) for name, labels in samples if name.startswith(("vllm_kv_cache", "vllm_frag_otel"))]
    assert len(ours) > 50 and any(n.endswith("_bucket") for n, _ in ours)  # gauges, counters and histograms
    for name, labels in ours:
        for label, accepted in allowed.items():
            assert labels.get(label) in accepted, (name, label, labels.get(label), accepted)
    # and the process-wide series (no engine attributes on their points) carry the operator's values
    (active,) = [labels for name, labels in ours if name == "vllm_frag_otel_active"]
    assert {label: active.get(label) for label in allowed} == {n.replace(".", "_"): v for n, v in values.items()}


def test_the_pool_series_carry_vllms_own_join_labels(engine_env):
    """model_name (the served model name) and engine (the engine index: the data-parallel rank),
    as vLLM's PrometheusStatLogger labels its vllm:* series, on every series of the plugin, so a
    PromQL division by a vllm:* series matches without relabelling; not the OTel-style names."""
    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus", VLLM_FRAG_OTEL_SPANS="false")
    scheduler = _pressured()
    rng = random.Random(5)
    for _ in range(20):
        sim.step(scheduler, rng)
    served = scheduler.vllm_config.model_config.served_model_name
    samples = _scrape(port)
    ours = [dict(labels) for name, labels in samples if name.startswith(("vllm_kv_cache", "vllm_frag_otel"))]
    assert len(ours) > 50
    for labels in ours:  # the process-wide series too: those of the engine the process runs
        assert (labels["model_name"], labels["engine"]) == (served, "0"), labels
        assert not {"vllm_model_name", "vllm_data_parallel_rank"} & set(labels), labels


def _promtool() -> str:
    """promtool, fetched and cached by scripts/stack.sh (as `make test-rules` gets it)."""
    import subprocess

    from helpers import REPO

    subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), "setup", "promtool"], check=True,
                   capture_output=True, timeout=900)
    paths = subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), "paths"], check=True, capture_output=True,
                           text=True).stdout
    return dict(line.split("=", 1) for line in paths.splitlines())["PROMTOOL"]


def test_promtool_check_metrics_passes_on_a_scrape(engine_env):
    """Prometheus' own linter on the endpoint's answer, with every metric the plugin has (the
    opt-in region gauge too): no gauge named like a histogram's _count, no _total on a gauge,
    metadata in order."""
    import subprocess

    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus", VLLM_FRAG_OTEL_REGION_METRIC="true")
    scheduler = _pressured()
    rng = random.Random(6)
    for _ in range(120):
        sim.step(scheduler, rng)
    text = _scrape_text(port)
    assert "vllm_kv_cache_region_blocks{" in text and "vllm_kv_cache_block_evictions_total{" in text
    checked = subprocess.run([_promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_port_is_the_base_port_plus_the_data_parallel_rank(engine_env, monkeypatch, caplog):
    """The hooks read the rank from vLLM's ParallelConfig; engines of ranks 0..N-1 on one host
    listen on base..base+N-1."""
    import vllm.config

    base = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus")
    real = vllm.config.VllmConfig

    def rank_two(*args, **kwargs):
        vllm_config = real(*args, **kwargs)
        vllm_config.parallel_config.data_parallel_rank = 2
        return vllm_config

    monkeypatch.setattr(vllm.config, "VllmConfig", rank_two)
    with caplog.at_level(logging.INFO, logger="vllm.frag_otel"):
        scheduler = _pressured()
    sim.step(scheduler, random.Random(0))
    samples = _scrape(base + 2)
    assert _value(samples, "vllm_kv_cache_block_limit", engine="2") == SHAPE.num_blocks - 1
    for other in (base, base + 1, base + 3):
        with pytest.raises(OSError):
            _scrape_text(other)
    (line,) = [r.getMessage() for r in caplog.records if "serving KV-cache metrics for Prometheus" in r.getMessage()]
    assert f"http://{HOST}:{base + 2}/metrics" in line and f"OTEL_EXPORTER_PROMETHEUS_PORT={base}" in line
    assert "data-parallel rank 2" in line


def test_a_port_in_use_is_one_warning_and_vllm_and_the_other_exporter_run_on(engine_env, tmp_path, caplog):
    base = engine_env(VLLM_FRAG_OTEL_EXPORTER="file,prometheus")
    taken = socket.socket()
    taken.bind((HOST, base))
    taken.listen(1)
    try:
        with caplog.at_level(logging.INFO, logger="vllm.frag_otel"):
            scheduler = _pressured()
            second = _pressured()  # a second engine in the same process: no second try, no second warning
            rng = random.Random(2)
            steps = 0
            while scheduler.has_requests() or second.has_requests():
                for s in (scheduler, second):
                    if s.has_requests():
                        sim.step(s, rng)
                steps += 1
            telemetry.runtime().force_flush()
    finally:
        taken.close()
    assert steps > 100
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "Prometheus" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{HOST}:{base}" in warnings[0] and "OTEL_EXPORTER_PROMETHEUS_PORT" in warnings[0]
    assert "in use" in warnings[0] and "vLLM runs on" in warnings[0]
    assert not any("serving KV-cache metrics" in r.getMessage() for r in caplog.records)
    # the other exporter is unaffected: the final counters are in the files
    lines = [json.loads(line) for path in (tmp_path / "telemetry").glob("metrics-*.jsonl")
             for line in path.read_text().splitlines()]
    names = {m["name"] for line in lines for rm in line["resourceMetrics"] for sm in rm["scopeMetrics"]
             for m in sm["metrics"]}
    assert {"vllm.kv_cache.blocks", "vllm.kv_cache.allocation.duration"} <= names


def test_the_standard_otel_metrics_exporter_variable_serves_too(engine_env, monkeypatch, tmp_path):
    port = engine_env(OTEL_METRICS_EXPORTER="prometheus", VLLM_FRAG_OTEL_SPANS="false")
    monkeypatch.delenv("VLLM_FRAG_OTEL_EXPORTER")  # auto: the standard variable decides for metrics
    scheduler = _pressured()
    rng = random.Random(3)
    for _ in range(50):
        sim.step(scheduler, rng)
    _check_against_the_pool(_scrape(port), scheduler)
    telemetry.runtime().force_flush()
    assert not list((tmp_path / "telemetry").glob("metrics-*.jsonl"))  # served, not pushed


@pytest.mark.parametrize("name, raw, accepted", [
    ("OTEL_METRICS_EXPORTER", "prometheus,carrier-pigeon", config.METRICS_EXPORTER_ACCEPTED),
    ("VLLM_FRAG_OTEL_EXPORTER", "prometheus,prometheus", config.EXPORTER_ACCEPTED),
])
def test_a_bad_exporter_value_is_one_warning_and_nothing_is_served(engine_env, monkeypatch, caplog, name, raw,
                                                                    accepted):
    port = engine_env(**{name: raw})
    if name == "OTEL_METRICS_EXPORTER":
        monkeypatch.setenv("VLLM_FRAG_OTEL_EXPORTER", "auto")
    monkeypatch.setenv("VLLM_FRAG_OTEL_SPANS", "false")
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        scheduler = _pressured()
        _pressured()
        rng = random.Random(4)
        for _ in range(30):
            sim.step(scheduler, rng)
    mentions = [r.getMessage() for r in caplog.records if raw in r.getMessage()]
    assert len(mentions) == 1 and f"ignoring {name}={raw!r}: expected {accepted}" in mentions[0], mentions
    with pytest.raises(OSError):
        _scrape_text(port)


def test_a_bad_port_is_one_warning_naming_the_variable_and_the_default_is_used(caplog):
    config._reported.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        for _ in range(2):
            address = config.prometheus_address({"OTEL_EXPORTER_PROMETHEUS_PORT": "http", "OTEL_EXPORTER_PROMETHEUS_HOST": "a b"})
    assert address == ("localhost", 9464)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert any("OTEL_EXPORTER_PROMETHEUS_PORT='http': expected a port number in 1-65535; using the default 9464"
               in m for m in messages)
    assert any("OTEL_EXPORTER_PROMETHEUS_HOST='a b'" in m for m in messages)


def test_without_the_extra_one_warning_names_the_pip_command(engine_env, monkeypatch, caplog):
    engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus")
    import vllm_frag_otel.export

    monkeypatch.delitem(sys.modules, "vllm_frag_otel.export.prometheus", raising=False)
    monkeypatch.delattr(vllm_frag_otel.export, "prometheus", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.prometheus", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        scheduler = _pressured()
        rng = random.Random(5)
        while scheduler.has_requests():
            sim.step(scheduler, rng)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert EXTRA in warning and "vLLM runs on" in warning, warning
    assert telemetry.runtime().prometheus is None


def test_vllm_s_own_registry_is_untouched_and_stop_frees_the_port(engine_env):
    from prometheus_client import REGISTRY, generate_latest

    before = generate_latest(REGISTRY).decode()
    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus")
    scheduler = _pressured()
    sim.step(scheduler, random.Random(6))
    assert "vllm_kv_cache_blocks" in _scrape_text(port)
    after = generate_latest(REGISTRY).decode()
    assert "vllm_kv_cache" not in after and "target_info" not in after
    assert {line.split("{")[0].split(" ")[0] for line in after.splitlines() if not line.startswith("#")} == \
        {line.split("{")[0].split(" ")[0] for line in before.splitlines() if not line.startswith("#")}
    (server_thread,) = [t for t in threading.enumerate() if t.name == "vllm-frag-otel-prometheus"]
    assert server_thread.daemon  # never holds the process's exit
    telemetry.runtime().shutdown()
    with closing(socket.socket()) as s:
        # free again: a runtime started later in this process can serve (SO_REUSEADDR, as its server
        # binds: the scrape's connection may linger in TIME_WAIT, a listener would still be refused)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        s.listen(1)
    assert not any(t.name == "vllm-frag-otel-prometheus" and t.is_alive() for t in threading.enumerate())


def test_concurrent_scrapes_while_the_scheduler_steps_are_each_whole_and_consistent(engine_env):
    """Four scrapers in a loop while vLLM's scheduler runs: every answer parses, holds every
    series once, and its histogram counts match their own buckets; the scheduler never waits
    for a scrape longer than one collection."""
    port = engine_env(VLLM_FRAG_OTEL_EXPORTER="none,prometheus")
    scheduler = _pressured()
    stop = threading.Event()
    answers: list[tuple[float, dict]] = []
    errors: list[BaseException] = []

    def scrape_loop():
        while not stop.is_set():
            try:
                start = time.perf_counter()
                samples = _scrape(port)
                answers.append((time.perf_counter() - start, samples))
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    scrapers = [threading.Thread(target=scrape_loop, daemon=True) for _ in range(4)]
    for t in scrapers:
        t.start()
    rng = random.Random(7)
    step_times = []
    try:
        while scheduler.has_requests():
            start = time.perf_counter()
            sim.step(scheduler, rng)
            step_times.append(time.perf_counter() - start)
    finally:
        stop.set()
        for t in scrapers:
            t.join(30)
    assert not errors, errors
    assert len(answers) >= 8, len(answers)
    for _, samples in answers:
        assert ("vllm_kv_cache_block_limit" in {n for n, _ in samples})
        for (name, labels), value in samples.items():
            if name.endswith("_seconds_count"):
                inf = samples[(name[:-len("_count")] + "_bucket", labels | {("le", "+Inf")})]
                assert inf == value
    durations = sorted(d for d, _ in answers)
    print(f"\n{len(answers)} scrapes during {len(step_times)} steps: scrape median "
          f"{durations[len(durations) // 2] * 1e3:.1f} ms, max {durations[-1] * 1e3:.1f} ms; "
          f"step median {sorted(step_times)[len(step_times) // 2] * 1e3:.2f} ms")


def test_a_stopped_reader_serves_nothing_more_and_stopping_twice_is_quiet():
    """shutdown takes the reader's collector out of its registry (a scrape that
    races the stop gets nothing, not a collection of a stopped provider), and
    the runtime's stop may call it again."""
    reader, provider, counter = _reader_with_a_counter()
    counter.add(3)
    assert _served(reader)[0].endswith(" 3.0")
    reader.shutdown()
    assert _served(reader) == []
    reader.shutdown()
    provider.shutdown()


def _reader_with_a_counter():
    from opentelemetry.sdk.metrics import MeterProvider

    from vllm_frag_otel.export.prometheus import ScrapeReader

    reader = ScrapeReader(lambda metrics_data: metrics_data)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    counter = provider.get_meter("test").create_counter("vllm.kv_cache.test", unit="{block}")
    return reader, provider, counter


def _served(reader) -> list[str]:
    from prometheus_client import generate_latest

    return [line for line in generate_latest(reader.registry).decode().splitlines()
            if line.startswith("vllm_kv_cache_test")]


def test_a_failing_scrape_answers_empty_and_warns_once_naming_the_error(caplog):
    reader, provider, counter = _reader_with_a_counter()
    counter.add(2)

    def broken(metrics_data):
        raise ZeroDivisionError("no blocks")

    reader._add_points = broken
    with caplog.at_level(logging.WARNING, logger="vllm.frag_otel"):
        assert _served(reader) == [] and _served(reader) == []
    (warning,) = [r.getMessage() for r in caplog.records if "scrape failed" in r.getMessage()]
    assert "ZeroDivisionError: no blocks" in warning and "Prometheus" in warning
    reader._add_points = lambda metrics_data: metrics_data
    assert _served(reader)[0].endswith(" 2.0")  # the next healthy scrape answers in full
    reader.shutdown()
    provider.shutdown()


def test_only_a_scrape_collects_for_the_reader_not_a_flush_after_one():
    """The simulator's and the engine stop's force_flush collect from every reader
    of the provider; this one answers scrapes only, also right after one."""
    reader, provider, counter = _reader_with_a_counter()
    counter.add(1)
    assert _served(reader)[0].endswith(" 1.0")
    collected = []
    reader._add_points = lambda metrics_data: collected.append(metrics_data) or metrics_data
    provider.force_flush()
    assert collected == []
    assert _served(reader) and len(collected) == 1
    reader.shutdown()
    provider.shutdown()


def test_the_scrape_endpoint_listens_on_the_configured_host_only():
    from vllm_frag_otel.export.prometheus import ScrapeReader

    reader = ScrapeReader(lambda metrics_data: metrics_data)
    reader.serve(HOST, 0)
    try:
        assert reader.address[0] == HOST != "0.0.0.0"
    finally:
        reader.shutdown()
