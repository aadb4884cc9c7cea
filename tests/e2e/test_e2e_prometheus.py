"""The Prometheus scrape option end to end, with no Collector: the real vLLM CPU server with the
plugin loaded by its entry point and `VLLM_FRAG_OTEL_EXPORTER=prometheus`, its engine-core
process serving /metrics on OTEL_EXPORTER_PROMETHEUS_PORT (+ data-parallel rank 0), scraped by a
VictoriaMetrics of this test's own (own port, own -promscrape.config, every second).

After a small workload that shares prefixes, VictoriaMetrics holds the plugin's gauges,
counters and histogram _bucket series, under the names and labels the dashboard and the alert
rules use; the counters equal vLLM's own (its /metrics, scraped directly), the pool adds up,
and no request holds blocks once the workload is done.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import e2e_harness as h

pytestmark = pytest.mark.e2e

# stages timed inside the test body (not counted again as assertions)
h.TIMINGS.in_test_prefixes = (*h.TIMINGS.in_test_prefixes, "prometheus test: ")

NUM_REQUESTS = 12
MAX_TOKENS = 24
USABLE_BLOCKS = 63  # h.KV_CACHE_BYTES: 64 blocks of 32 tokens for the tiny model (bf16), the null block aside


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A vLLM server whose engine serves the plugin's metrics, and a VictoriaMetrics scraping it."""
    run_dir = tmp_path_factory.mktemp("prometheus")
    with h.TIMINGS.stage("prometheus: set-up"):
        h.setup_all(h.E2E_DIR / "logs" / "setup")
        h.setup_prometheus_extra()
    model = h.write_model(run_dir / "model")
    api_port, engine_port, vm_port = h.free_port(), h.free_port(), h.free_port()
    env = {
        **h.vllm_base_env(),
        "VLLM_FRAG_OTEL_EXPORTER": "prometheus",  # metrics served; spans (no endpoint) to files
        "VLLM_FRAG_OTEL_FILE_DIR": str(run_dir / "files"),
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(engine_port),
        "VLLM_FRAG_OTEL_ALLOCATION_SAMPLE_RATE": "1",  # every allocate_slots call timed: histogram = counter
    }
    procs: dict[str, h.Proc] = {}
    try:
        with h.TIMINGS.stage("prometheus: start VictoriaMetrics and vLLM"):
            procs["vm"] = h.Proc("victoria-metrics-prometheus", [
                str(h.VICTORIA_METRICS), f"-storageDataPath={run_dir / 'vm'}", f"-httpListenAddr=127.0.0.1:{vm_port}",
                "-retentionPeriod=1d", "-search.latencyOffset=0s", "-search.disableCache", "-loggerLevel=WARN",
                f"-promscrape.config={h.engine_scrape_config(run_dir / 'scrape.yml', engine_port, api_port)}"],
                h.E2E_DIR / "logs" / "victoria-metrics-prometheus.log", env=h.clean_env())
            # cwd outside the checkout: the plugin comes from the installed package
            procs["vllm"] = h.Proc("vllm-prometheus", h.vllm_server_command(
                model, api_port, extra=("--shutdown-timeout", "10")), h.E2E_DIR / "logs" / "vllm-prometheus.log",
                env=env, cwd=run_dir)
            h.wait_until("VictoriaMetrics /health", lambda: h.http_ok(f"http://127.0.0.1:{vm_port}/health"), 60,
                         proc=procs["vm"])
            h.wait_until("vLLM /health", lambda: h.http_ok(f"http://127.0.0.1:{api_port}/health"), 900, interval=1,
                         proc=procs["vllm"])
        yield api_port, engine_port, h.PromQL(f"http://127.0.0.1:{vm_port}"), procs["vllm"]
    finally:
        for proc in procs.values():
            proc.stop()


def _workload(api_port: int) -> None:
    """Completions sharing a 96-token prefix (3 in 4), a first one alone: prefix-cache hits."""
    rng = random.Random(11)
    prefix = [rng.randrange(100, 30000) for _ in range(96)]
    prompts = [(prefix if i % 4 != 3 else []) + [rng.randrange(100, 30000) for _ in range(rng.randrange(16, 64))]
               for i in range(NUM_REQUESTS)]

    def send(prompt: list[int]) -> dict:
        body = {"model": h.MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0}
        return h.http_json(f"http://127.0.0.1:{api_port}/v1/completions", data=body, timeout=300)

    answers = [send(prompts[0])]
    with ThreadPoolExecutor(6) as pool:
        answers += list(pool.map(send, prompts[1:]))
    assert all(a["usage"]["completion_tokens"] == MAX_TOKENS for a in answers)


def test_victoria_metrics_scrapes_the_plugin_s_metrics_from_the_engine(served):
    api_port, engine_port, promql, server = served
    # the engine serves before any request: VictoriaMetrics has the pool at rest
    h.wait_until("VictoriaMetrics to scrape the engine's /metrics",
                 lambda: promql.query('vllm_kv_cache_block_limit{job="vllm-frag-otel"}'), 60, interval=1, proc=server)
    assert "serving KV-cache metrics for Prometheus on http://127.0.0.1:%d/metrics" % engine_port in server.log_text()

    with h.TIMINGS.stage("prometheus test: workload"):
        _workload(api_port)
        finished = time.time()
    # vLLM sends its scheduler stats with every step's outputs: after the last answer they are final
    vllm_own = h.prometheus_samples(f"http://127.0.0.1:{api_port}/metrics")
    assert vllm_own["vllm:request_success_total"] == NUM_REQUESTS

    def scraped_after_workload() -> bool:
        last = promql.query('max(timestamp(vllm_kv_cache_allocation_attempts_total{job="vllm-frag-otel"}))')
        return bool(last) and float(last[0]["value"][1]) > finished + 1

    with h.TIMINGS.stage("prometheus test: a scrape after the workload"):
        h.wait_until("a scrape of the engine after the workload", scraped_after_workload, 60, interval=1, proc=server)

    def one(expr: str) -> float:
        result = promql.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    sel = 'job="vllm-frag-otel"'
    # the labels the dashboard's variables and the alert rules select by
    (series,) = promql.query(f"vllm_kv_cache_block_limit{{{sel}}}")
    labels = series["metric"]
    assert labels["model_name"] == h.MODEL_NAME and labels["engine"] == "0"
    assert labels["host_name"] and labels["service_name"] == "vllm" and labels["vllm_kv_cache_pool"] == "0"
    # ... which are vLLM's own: the plugin's series divide by vLLM's without relabelling
    vllm_series = 'vllm:num_requests_running{job="vllm"} * 0 + 1'  # 1 where vLLM has the series, whatever its value
    assert one(f"vllm_kv_cache_block_limit{{{sel}}} * on (model_name, engine) ({vllm_series})") == USABLE_BLOCKS
    # gauges: the pool adds up, nothing is held once every request finished
    assert one(f"vllm_kv_cache_block_limit{{{sel}}}") == USABLE_BLOCKS
    assert one(f"sum(vllm_kv_cache_blocks{{{sel}}})") == USABLE_BLOCKS
    assert one(f'vllm_kv_cache_blocks{{{sel}, vllm_kv_cache_block_state="used"}}') == 0
    assert one(f'vllm_kv_cache_blocks{{{sel}, vllm_kv_cache_block_state="cached"}}') > 0
    assert one(f"vllm_kv_cache_requests{{{sel}}}") == 0
    assert one(f"vllm_frag_otel_active{{{sel}}}") == 1
    assert 0 <= one(f"vllm_kv_cache_fragmentation_external_ratio{{{sel}}}") <= 1
    # counters: the same as vLLM's own
    first = f'{sel}, vllm_request_resumed="false"'  # vLLM counts first admissions
    assert one(f"sum(vllm_kv_cache_prefix_cache_queried_total{{{first}}})") == vllm_own["vllm:prefix_cache_queries_total"]
    assert one(f"sum(vllm_kv_cache_prefix_cache_hit_total{{{first}}})") == vllm_own["vllm:prefix_cache_hits_total"] > 0
    assert one(f"sum(vllm_kv_cache_preemptions_total{{{sel}}})") == vllm_own["vllm:num_preemptions_total"]
    attempts = one(f"sum(vllm_kv_cache_allocation_attempts_total{{{sel}}})")
    assert attempts >= NUM_REQUESTS * MAX_TOKENS / 2  # allocate_slots runs for every request on every step
    assert one(f'sum(vllm_kv_cache_block_allocations_total{{{sel}, vllm_kv_cache_block_source="prefix_hit"}})') > 0
    assert one(f"vllm_frag_otel_hook_errors_total{{{sel}}}") == 0
    # histograms: _bucket series with their le labels, cumulative, +Inf equal to _count
    buckets = promql.query(f'vllm_kv_cache_allocation_duration_seconds_bucket{{{sel}, vllm_kv_cache_allocation_outcome="success"}}')
    assert len(buckets) == 17, [b["metric"].get("le") for b in buckets]
    by_le = sorted(((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets))
    assert [count for _, count in by_le] == sorted(count for _, count in by_le)  # cumulative
    timed = one(f'vllm_kv_cache_allocation_duration_seconds_count{{{sel}, vllm_kv_cache_allocation_outcome="success"}}')
    assert by_le[-1] == (float("inf"), timed)
    assert timed == one(f'vllm_kv_cache_allocation_attempts_total{{{sel}, vllm_kv_cache_allocation_outcome="success"}}')
    for name in ("vllm_kv_cache_block_cache_duration_seconds", "vllm_kv_cache_block_idle_duration_seconds"):
        assert promql.query(f'{name}_bucket{{{sel}, le="+Inf"}}'), name
    # a dashboard query, as Grafana sends it: p99 allocate_slots latency
    p99 = promql.query(f"histogram_quantile(0.99, sum by (le) (vllm_kv_cache_allocation_duration_seconds_bucket{{{sel}}}))")
    assert p99 and 0 < float(p99[0]["value"][1]) < 1, p99
