#!/usr/bin/env bash
# A real OpenTelemetry back-end stack on loopback, built only from package registries
# (Debian packages and PyPI, by name; no Docker, no release downloads).
#
#   scripts/stack.sh setup [otelcol|vm|phoenix|promtool|compose ...]   build/fetch into $STACK_DIR (cached, idempotent)
#   scripts/stack.sh start      otelcol (collector-config.yaml) -> VictoriaMetrics (+ vmalert with the
#                               alert rules) and Phoenix, on 127.0.0.1 (ports: VM_PORT, OTLP_HTTP_PORT, ...)
#   scripts/stack.sh stop       stop what `start` started (by the PIDs it recorded, nothing else)
#   scripts/stack.sh test-rules `promtool check rules` on deploy/prometheus/rules/*.rules.yml, then
#                               `promtool test rules` on deploy/prometheus/rules/*.test.yml
#   scripts/stack.sh paths      print the binaries' paths (KEY=path lines)
#
# What it provides:
#   otelcol   OpenTelemetry Collector *core* components (otlp receiver; batch, memory_limiter;
#             debug, otlp/otlp_grpc, otlphttp/otlp_http exporters), compiled offline from Debian
#             unstable's golang-opentelemetry-collector-dev sources (~5 min the first time, cached).
#   vm        VictoriaMetrics from Debian trixie: OTLP/HTTP metrics in, PromQL out.
#   phoenix   Arize Phoenix (PyPI) in its own venv: an OTLP trace store with a REST API.
#   promtool  from Debian bookworm's `prometheus` package (2.42), extracted, not installed; with
#             amtool from `prometheus-alertmanager` (checks deploy/alertmanager/alertmanager.yml).
#   compose   docker-compose v2 from Debian trixie: `docker-compose config` validates
#             deploy/compose.yaml without a Docker engine.
#
# Nothing is installed system-wide: apt runs with a private state directory and packages are
# unpacked with dpkg-deb. The Debian mirror is read from this machine's apt configuration at run time.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# outside the checkout: a fresh clone reuses what an earlier one built
D=${STACK_DIR:-${VLLM_FRAG_OTEL_DEV_CACHE:-$HOME/.cache/vllm-frag-otel-dev}/otel-stack}
mkdir -p "$D"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[stack] $*" >&2; }

# --- apt for a given Debian suite, isolated from the system's apt state ----------------------
mirror_uri() {
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources
  else
    awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list
  fi
}
apt_alt() { # apt_alt SUITE TOOL args...
  local suite=$1; shift
  local b="$D/apt/$suite"
  if [ ! -f "$b/opts" ] || [ -z "$(ls "$b/lists" 2>/dev/null | grep -v partial)" ]; then
    mkdir -p "$b/src" "$b/lists/partial" "$b/cache/archives/partial"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$(mirror_uri)" "$suite" > "$b/src/alt.sources"
    : > "$b/empty.list"
    echo "-o Dir::Etc::sourcelist=$b/empty.list -o Dir::Etc::sourceparts=$b/src -o Dir::State::Lists=$b/lists -o Dir::Cache=$b/cache -o APT::Sandbox::User=root" > "$b/opts"
    # shellcheck disable=SC2046
    apt-get $(cat "$b/opts") update -qq
  fi
  local tool=$1; shift
  # shellcheck disable=SC2046
  "$tool" $(cat "$b/opts") "$@"
}
fetch_extract() { # fetch_extract SUITE DEST pkg...
  local suite=$1 dest=$2; shift 2
  local dl="$D/debs/$suite"
  rm -rf "$dl"; mkdir -p "$dl" "$dest"
  (cd "$dl" && apt_alt "$suite" apt-get -q download "$@" >/dev/null)
  local f
  for f in "$dl"/*.deb; do dpkg-deb -x "$f" "$dest"; done
  rm -rf "$dl"
}

timed() { # timed NAME cmd...: run, print its duration
  local n=$1 t0; shift; t0=$(date +%s)
  "$@"
  log "$n ready in $(( $(date +%s) - t0 )) s"
}

# --- components ------------------------------------------------------------------------------
OTELCOL=$D/otelcol/otelcol
VM=$D/vm/usr/bin/victoria-metrics
PHOENIX=$D/phoenix/bin/phoenix
PROMTOOL=$D/promtool/usr/bin/promtool
COMPOSE=$D/compose/usr/libexec/docker/cli-plugins/docker-compose
AMTOOL=$D/promtool/usr/bin/amtool

write_otelcol_main() { # the collector's component list: core only
  cat > "$1" <<'EOF'
// A minimal OpenTelemetry Collector distribution: core components only, so that a
// configuration that runs here runs unchanged in the official core and contrib builds.
package main

import (
	"log"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/confmap/provider/yamlprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/debugexporter"
	"go.opentelemetry.io/collector/exporter/otlpexporter"
	"go.opentelemetry.io/collector/exporter/otlphttpexporter"
	"go.opentelemetry.io/collector/extension"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/batchprocessor"
	"go.opentelemetry.io/collector/processor/memorylimiterprocessor"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func components() (otelcol.Factories, error) {
	var err error
	f := otelcol.Factories{Telemetry: otelconftelemetry.NewFactory()}
	if f.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](otlpreceiver.NewFactory()); err != nil {
		return f, err
	}
	if f.Processors, err = otelcol.MakeFactoryMap[processor.Factory](batchprocessor.NewFactory(), memorylimiterprocessor.NewFactory()); err != nil {
		return f, err
	}
	if f.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](debugexporter.NewFactory(), otlpexporter.NewFactory(), otlphttpexporter.NewFactory()); err != nil {
		return f, err
	}
	if f.Extensions, err = otelcol.MakeFactoryMap[extension.Factory](); err != nil {
		return f, err
	}
	return f, nil
}

func main() {
	set := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{Command: "otelcol-core-deb", Description: "OpenTelemetry Collector core components, built from Debian sources", Version: "debian"},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				ProviderFactories: []confmap.ProviderFactory{envprovider.NewFactory(), fileprovider.NewFactory(), yamlprovider.NewFactory()},
			},
		},
	}
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		log.Fatal(err)
	}
}
EOF
}

setup_otelcol() {
  [ -x "$OTELCOL" ] && return 0
  local closure pkgs gov src="$D/otelcol-src"
  rm -rf "$src"; mkdir -p "$src" "$D/otelcol"
  # Debian unstable changes daily: compute the dependency closure each time (the binary is cached).
  closure=$(apt_alt sid apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances golang-opentelemetry-collector-dev | grep -E '^[a-z0-9]' | sort -u)
  gov=$(grep -E '^golang-1\.[0-9]+-go$' <<<"$closure" | sort -V | tail -1); gov=${gov%-go}
  pkgs=$(grep -E '^golang-.*-dev$' <<<"$closure")
  log "otelcol: fetching $(wc -w <<<"$pkgs") Go source packages and $gov"
  # shellcheck disable=SC2086
  fetch_extract sid "$src/root" $pkgs "$gov-go" "$gov-src"
  write_otelcol_main "$src/main.go"
  log "otelcol: compiling (offline, GOPATH mode)"
  ( export GOROOT="$src/root/usr/lib/go-${gov#golang-}" GOPATH="$src/root/usr/share/gocode" GO111MODULE=off \
           GOTOOLCHAIN=local GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOCACHE="$src/gocache"
    "$GOROOT/bin/go" build -trimpath -ldflags='-s -w' -o "$OTELCOL.tmp" "$src/main.go" )
  mv "$OTELCOL.tmp" "$OTELCOL"
  rm -rf "$src"   # ~1 GB of sources and build cache; only the static binary is kept
  "$OTELCOL" --version >&2
}
setup_vm() {
  [ -x "$VM" ] && return 0
  rm -rf "$D/vm"
  fetch_extract trixie "$D/vm" victoria-metrics
  "$VM" -version >&2
}
setup_promtool() { # promtool and amtool: unit tests for the rules, checks of the configurations
  [ -x "$PROMTOOL" ] && [ -x "$AMTOOL" ] && return 0
  rm -rf "$D/promtool"
  fetch_extract bookworm "$D/promtool" prometheus prometheus-alertmanager
  "$PROMTOOL" --version 2>&1 | head -1 >&2
}
setup_compose() { # docker-compose v2 from Debian trixie: `config` validates deploy/compose.yaml, no engine needed
  [ -x "$COMPOSE" ] && return 0
  rm -rf "$D/compose"
  fetch_extract trixie "$D/compose" docker-compose
  [ -x "$COMPOSE" ] || COMPOSE=$(find "$D/compose" -type f -name docker-compose | head -1)
  "$COMPOSE" version >&2
}
PHOENIX_VERSION=20.26.1   # the REST API the e2e test reads spans from: /v1/projects/{project}/spans
setup_phoenix() {
  [ -x "$PHOENIX" ] && [ "$(cat "$D/phoenix/.installed" 2>/dev/null)" = "$PHOENIX_VERSION" ] && return 0
  rm -rf "$D/phoenix"
  python3 -m venv "$D/phoenix"
  local out status=0
  out=$("$D/phoenix/bin/pip" install -q --disable-pip-version-check "arize-phoenix==$PHOENIX_VERSION" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e "^$" >&2 || true
  [ "$status" -eq 0 ]
  echo "$PHOENIX_VERSION" > "$D/phoenix/.installed"
}

# --- running (for people; the e2e test starts its own processes on free ports) ---------------
RUN=$D/run
start_bg() { # start_bg NAME cmd...
  local n=$1; shift
  nohup "$@" > "$RUN/$n.log" 2>&1 &
  echo $! > "$RUN/$n.pid"
}
wait_http() { for _ in $(seq 1 240); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; log "timeout: $1"; return 1; }
start() {
  mkdir -p "$RUN" "$D/data/vm" "$D/data/phoenix"
  local vm_port=${VM_PORT:-8428} phx_port=${PHOENIX_PORT:-6006} phx_grpc=${PHOENIX_GRPC_PORT:-4319}
  local vmalert_port=${VMALERT_PORT:-8880} grpc_port=${OTLP_GRPC_PORT:-4317} http_port=${OTLP_HTTP_PORT:-4318}
  start_bg vm "$VM" -storageDataPath="$D/data/vm" -httpListenAddr="127.0.0.1:$vm_port" \
      -retentionPeriod=1d -opentelemetry.usePrometheusNaming -search.latencyOffset=1s
  # Phoenix binds its gRPC port on all interfaces; the launcher keeps it on 127.0.0.1
  PHOENIX_HOST=127.0.0.1 PHOENIX_PORT=$phx_port PHOENIX_GRPC_PORT=$phx_grpc PHOENIX_WORKING_DIR="$D/data/phoenix" \
      PHOENIX_TELEMETRY_ENABLED=false start_bg phoenix "$D/phoenix/bin/python" "$REPO/tests/e2e/phoenix_loopback.py" serve
  wait_http "http://127.0.0.1:$vm_port/health"
  start_bg vmalert "${VM%/*}/vmalert" -rule="$REPO/deploy/prometheus/rules/vllm-kv-cache.rules.yml" \
      -datasource.url="http://127.0.0.1:$vm_port" -remoteWrite.url="http://127.0.0.1:$vm_port" \
      -notifier.blackhole -evaluationInterval=15s -rule.evalDelay=1s -httpListenAddr="127.0.0.1:$vmalert_port"
  wait_http "http://127.0.0.1:$phx_port/healthz"
  OTLP_GRPC_ENDPOINT=127.0.0.1:$grpc_port OTLP_HTTP_ENDPOINT=127.0.0.1:$http_port \
  PROMETHEUS_OTLP_ENDPOINT="http://127.0.0.1:$vm_port/opentelemetry" TRACES_OTLP_ENDPOINT="127.0.0.1:$phx_grpc" \
  OTELCOL_TELEMETRY_HOST=127.0.0.1 OTELCOL_TELEMETRY_PORT=${OTELCOL_TELEMETRY_PORT:-8888} \
      start_bg otelcol "$OTELCOL" --config="$REPO/collector-config.yaml"
  for _ in $(seq 1 80); do ss -ltn | grep -q "127.0.0.1:$http_port " && break; sleep 0.25; done
  log "up: OTLP 127.0.0.1:$grpc_port (gRPC) / 127.0.0.1:$http_port (HTTP) -> PromQL http://127.0.0.1:$vm_port," \
      "alerts http://127.0.0.1:$vmalert_port/api/v1/alerts, traces http://127.0.0.1:$phx_port; logs in $RUN"
}
stop() {
  local f
  for f in "$RUN"/*.pid; do [ -f "$f" ] || continue; kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; done
}
test_rules() {
  setup_promtool
  local t rc=0
  "$PROMTOOL" check rules "$REPO"/deploy/prometheus/rules/*.rules.yml || rc=1
  for t in "$REPO"/deploy/prometheus/rules/*.test.yml; do
    (cd "$(dirname "$t")" && "$PROMTOOL" test rules "$(basename "$t")") || rc=1
  done
  return $rc
}

case "${1:-}" in
  setup)
    shift; [ $# -gt 0 ] || set -- otelcol vm promtool compose phoenix
    for c in "$@"; do timed "$c" "setup_$c"; done ;;
  start) start ;;
  stop) stop ;;
  test-rules) test_rules ;;
  paths) printf 'OTELCOL=%s\nVM=%s\nPHOENIX=%s\nPROMTOOL=%s\nAMTOOL=%s\nCOMPOSE=%s\n' "$OTELCOL" "$VM" "$PHOENIX" "$PROMTOOL" "$AMTOOL" "$COMPOSE" ;;
  *) echo "usage: $0 setup [otelcol|vm|phoenix|promtool|compose ...] | start | stop | test-rules | paths" >&2; exit 2 ;;
esac
