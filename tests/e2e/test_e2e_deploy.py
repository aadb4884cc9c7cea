"""deploy/ and collector-config.yaml, checked with the real tools that can run here:
promtool (rule unit tests, rule and config checks), amtool, docker-compose (`config` needs no
engine), and consistency between the files. Fast: the tools are Debian packages, cached."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

import e2e_harness as h

pytestmark = pytest.mark.e2e

DEPLOY = h.REPO / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_TESTS = RULES_DIR / "vllm-kv-cache.rules.test.yml"
# resource attributes the dashboard and the rules select and group by
RESOURCE_LABELS = {
    "service_name": "service.name",
    "service_instance_id": "service.instance.id",
    "service_version": "service.version",
    "host_name": "host.name",
    "vllm_model_name": "vllm.model.name",
    "vllm_data_parallel_rank": "vllm.data_parallel.rank",
}
CORE_COMPONENTS = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch"},
    "exporters": {"otlphttp", "otlp", "debug"},
}


@pytest.fixture(scope="module")
def tools():
    h.setup_tools()


def _run(cmd: list, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)


# -- alert rules ----------------------------------------------------------------------------

def test_rule_unit_tests_pass(tools):
    proc = _run([h.PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULES_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_file_is_valid_for_promtool(tools):
    proc = _run([h.PROMTOOL, "check", "rules", h.RULES])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {r["alert"] for r in h.load_rules() if "alert" in r}
    assert alerts == {
        "VLLMKVCacheInternalFragmentationHigh", "VLLMKVCacheAllocationFailures", "VLLMKVCachePreemptions",
        "VLLMKVCacheThrash", "VLLMKVCacheNearlyFull", "VLLMFragOtelHookErrors", "VLLMFragOtelDisabled",
        "VLLMFragOtelTelemetryAbsent",
    }
    cases = [c for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in test.get("alert_rule_test", [])]
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no test where it stays quiet"


def test_alerts_have_severity_and_annotations():
    for rule in h.load_rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# -- Prometheus, Alertmanager, Compose ------------------------------------------------------

def test_prometheus_config(tools, tmp_path):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # Prometheus 3 only: the OTLP section; it must promote every label the rules and dashboard use
    promoted = set(config.pop("otlp")["promote_resource_attributes"])
    assert set(RESOURCE_LABELS.values()) <= promoted
    # the rest with promtool 2.42 (which predates the otlp section)
    config["rule_files"] = [str(RULES_DIR / "*.rules.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = _run([h.PROMTOOL, "check", "config", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vllm-kv-cache.rules.yml" in proc.stdout and "SUCCESS: 11 rules found" in proc.stdout, proc.stdout


def test_alertmanager_config(tools):
    proc = _run([h.AMTOOL, "check-config", DEPLOY / "alertmanager" / "alertmanager.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compose(*args: str) -> subprocess.CompletedProcess:
    return _run([h.COMPOSE, "-f", DEPLOY / "compose.yaml", *args], cwd=DEPLOY)


def test_compose_file_is_valid(tools):
    for profile in ([], ["--profile", "vllm"]):
        proc = _compose(*profile, "config", "--quiet")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _compose("--profile", "vllm", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert {"otel-collector", "prometheus", "alertmanager", "tempo", "loki", "grafana", "vllm"} <= services.keys()
    # every file the services mount is in deploy/
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert (DEPLOY / volume["source"]).exists() or h.Path(volume["source"]).exists(), (name, volume)


def test_compose_is_consistent_with_the_collector_config():
    # deploy/ is self-contained: its collector configuration is the top-level one
    assert (DEPLOY / "otel-collector" / "collector-config.yaml").read_text() == h.COLLECTOR_CONFIG.read_text()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    collector = compose["otel-collector"]
    assert {"4317:4317", "4318:4318"} <= set(collector["ports"])
    assert collector["environment"]["PROMETHEUS_OTLP_ENDPOINT"] == "http://prometheus:9090/api/v1/otlp"
    assert collector["environment"]["TRACES_OTLP_ENDPOINT"] == "tempo:4317"
    assert collector["environment"]["LOGS_OTLP_ENDPOINT"] == "http://loki:3100/otlp"
    assert "3100:3100" in compose["loki"]["ports"]
    prometheus = compose["prometheus"]["command"]
    assert "--web.enable-otlp-receiver" in prometheus and "--enable-feature=exemplar-storage" in prometheus
    tempo = yaml.safe_load((DEPLOY / "tempo" / "tempo.yaml").read_text())
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    vllm = compose["vllm"]["environment"]
    assert vllm["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert vllm["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert "--otlp-traces-endpoint=http://otel-collector:4318/v1/traces" in compose["vllm"]["command"]


def test_collector_config_uses_core_components_and_env_defaults():
    config = yaml.safe_load(h.COLLECTOR_CONFIG.read_text())
    for kind, allowed in CORE_COMPONENTS.items():
        used = {name.split("/")[0] for name in config[kind]}
        assert used <= allowed, (kind, used - allowed)
    pipelines = config["service"]["pipelines"]
    assert pipelines["metrics"]["processors"][0] == "memory_limiter"
    assert pipelines["traces"]["processors"][0] == "memory_limiter"
    assert pipelines["logs"]["processors"][0] == "memory_limiter"
    assert any(e.startswith("otlphttp") for e in pipelines["logs"]["exporters"])
    assert any(e.startswith("otlphttp") for e in pipelines["metrics"]["exporters"])
    assert any(e.split("/")[0] == "otlp" for e in pipelines["traces"]["exporters"])
    text = h.COLLECTOR_CONFIG.read_text()
    endpoints = re.findall(r"endpoint: (.+)", text)
    assert endpoints and all(re.fullmatch(r"\$\{env:[A-Z_]+:-[^}]+\}", e.strip()) for e in endpoints), endpoints


# -- Grafana --------------------------------------------------------------------------------

def test_dashboard_structure():
    dashboard = json.loads(h.DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "instance"} <= variables.keys()
    panels = h.dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("block states", "slot", "fragmentation", "free-run", "hit rate", "evict", "latency",
                  "preemption", "plugin"):
        assert topic in titles, topic
    types = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat", "table"} <= types
    for title, expr, _ in h.dashboard_queries(dashboard):
        assert 'vllm_model_name=~"$model"' in expr and 'service_instance_id=~"$instance"' in expr, title
    exemplar_queries = [t for p in panels for t in p.get("targets", []) if t.get("exemplar")]
    assert exemplar_queries and all("allocation_duration_seconds_bucket" in t["expr"] for t in exemplar_queries)
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"


def test_labels_used_are_promoted_resource_attributes_or_metric_attributes():
    dashboard = json.loads(h.DASHBOARD.read_text())
    exprs = [e for _, e, _ in h.dashboard_queries(dashboard)] + [r["expr"] for r in h.load_rules()]
    metric_attributes = {
        "vllm_kv_cache_pool", "vllm_kv_cache_group", "vllm_kv_cache_block_state", "vllm_kv_cache_slot_state",
        "vllm_kv_cache_block_source", "vllm_kv_cache_eviction_reason", "vllm_kv_cache_block_reused",
        "vllm_kv_cache_allocation_outcome", "vllm_request_resumed", "le",
    }
    used = set()
    for expr in exprs:
        expr = re.sub(r'"[^"]*"', '""', expr)
        used |= set(re.findall(r"\b([a-z_]+)\s*(?:=~|!=|!~|=(?!=))", expr))
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            used |= {label.strip() for label in group.split(",") if label.strip()}
    assert used <= set(RESOURCE_LABELS) | metric_attributes, used - set(RESOURCE_LABELS) - metric_attributes


def test_grafana_provisioning():
    sources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in sources["datasources"]}
    prometheus, tempo = by_uid["prometheus"], by_uid["tempo"]
    assert prometheus["url"] == "http://prometheus:9090" and tempo["url"] == "http://tempo:3200"
    assert by_uid["loki"]["url"] == "http://loki:3100" and by_uid["loki"]["type"] == "loki"
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"][0] == {
        "name": "trace_id", "datasourceUid": "tempo", "urlDisplayLabel": "Request trace in Tempo"}
    to_metrics = tempo["jsonData"]["tracesToMetrics"]
    assert to_metrics["datasourceUid"] == "prometheus" and to_metrics["queries"]
    for query in to_metrics["queries"]:
        assert "$$__tags" in query["query"]  # "$$": Grafana would expand "$__tags" as an environment variable
    dashboards = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml").read_text())
    assert dashboards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["grafana"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose["volumes"]
