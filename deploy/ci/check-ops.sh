#!/usr/bin/env bash
# Offline checks of the deployment material: deploy/systemd (units),
# deploy/cloud (Terraform + cloud-init) and deploy/observability (Grafana
# dashboard, Prometheus rules). Quiet on success: one summary line, plus a
# line naming any check that was skipped. Idempotent; needs no network but
# Debian's package archive and PyPI, and only on the first run.
#
# Tools it fetches when missing (cached in $ZTNA_OPS_CACHE, default
# target/ops-tools):
#   promtool    from Debian's `prometheus` package, downloaded with
#               `apt-get download` and unpacked with `dpkg-deb -x`: nothing is
#               installed, no maintainer script runs, no daemon starts
#   cloud-init  the same way (only its schema validator is used)
#   Python      a virtualenv with python-hcl2, PyYAML and cloud-init's
#               schema dependencies (jsonschema, jinja2, configobj,
#               requests, jsonpatch) from PyPI
#   apt         systemd (systemd-analyze, systemd-sysusers), python3,
#               python3-venv: only if absent (a bare Debian 12 container)
# terraform is optional: with it, `terraform fmt -check` and a render of
# the cloud-init template through Terraform's own templatefile().
#
# The live checks start the relay from target/{release,debug} (or
# $ZTNA_RELAY_BIN) when it is newer than the sources, with the config the
# cloud-init template writes, push a second of traffic through it with
# ztna-bench, and compare its /metrics with deploy/observability/metrics.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${ZTNA_OPS_CACHE:-$ROOT/target/ops-tools}
TMP=$(mktemp -d)
RELAY_PID=

cleanup() {
  if [ -n "$RELAY_PID" ]; then kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

pass=0 fail=0 skip=0
skipped=()
# run NAME CMD...: passes when CMD succeeds; its output is shown only on failure.
run() {
  local name=$1; shift
  if "$@" >"$TMP/log" 2>&1; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "check-ops: FAIL $name" >&2
    sed 's/^/    /' "$TMP/log" >&2
  fi
}
# must_fail NAME CMD...: a negative self-test: passes when CMD fails.
must_fail() {
  local name=$1; shift
  if "$@" >"$TMP/log" 2>&1; then
    fail=$((fail + 1))
    echo "check-ops: FAIL $name (expected a failure, got success)" >&2
  else
    pass=$((pass + 1))
  fi
}
skip() { skip=$((skip + 1)); skipped+=("$1 ($2)"); }
# quiet CMD...: succeeds when CMD succeeds and prints nothing (systemd-analyze
# reports unknown keys as warnings with exit status 0).
quiet() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out"; return 1; }
  [ -z "$out" ] || { printf '%s\n' "$out"; return 1; }
}

# ------------------------------------------------------------------ tools
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
APT_OPTS=(-qq)
[ "$(id -u)" -ne 0 ] || APT_OPTS+=(-o APT::Sandbox::User=root)
apt_updated=
# logged CMD...: runs CMD quietly; shows its output only when it fails.
logged() {
  "$@" >"$TMP/tool.log" 2>&1 || { cat "$TMP/tool.log" >&2; return 1; }
}
apt_update() {
  [ -n "$apt_updated" ] && return 0
  logged $SUDO apt-get update -qq
  apt_updated=1
}
apt_install() {
  apt_update
  logged $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
# deb_unpack PKG DIR: the package's files under DIR, without installing it.
deb_unpack() {
  local pkg=$1 dir=$2
  [ -f "$dir/.unpacked" ] && return 0
  rm -rf "$dir" "$CACHE/deb-$pkg"
  mkdir -p "$CACHE/deb-$pkg"
  if ! (cd "$CACHE/deb-$pkg" && apt-get download "${APT_OPTS[@]}" "$pkg" >/dev/null 2>&1); then
    apt_update
    (cd "$CACHE/deb-$pkg" && logged apt-get download "${APT_OPTS[@]}" "$pkg")
  fi
  dpkg-deb -x "$CACHE"/deb-"$pkg"/"$pkg"_*.deb "$dir"
  rm -rf "$CACHE/deb-$pkg"
  touch "$dir/.unpacked"
}

setup_tools() {
  mkdir -p "$CACHE"
  local need=()
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

  if command -v promtool >/dev/null 2>&1; then
    PROMTOOL=$(command -v promtool)
  else
    deb_unpack prometheus "$CACHE/prometheus"
    rm -rf "$CACHE/prometheus/usr/bin/prometheus" "$CACHE/prometheus/usr/share" # 100 MB we do not use
    PROMTOOL=$CACHE/prometheus/usr/bin/promtool
  fi
  deb_unpack cloud-init "$CACHE/cloud-init"
  CLOUDINIT_PY=$CACHE/cloud-init/usr/lib/python3/dist-packages

  local reqs="python-hcl2>=7,<9 PyYAML>=6 jsonschema>=4,<5 jinja2>=3 configobj>=5 requests>=2 jsonpatch>=1"
  VENV=$CACHE/venv
  if [ "$(cat "$VENV/.reqs" 2>/dev/null)" != "$reqs" ]; then
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      apt_install python3-venv
      rm -rf "$VENV"
      logged python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC2086
    logged "$VENV/bin/pip" install -q --disable-pip-version-check $reqs
    echo "$reqs" >"$VENV/.reqs"
  fi

  TERRAFORM=$(command -v terraform || true)
  # Never read the user's CLI config or phone home.
  : >"$TMP/terraformrc"
  export TF_CLI_CONFIG_FILE=$TMP/terraformrc CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
}

py() { "$VENV/bin/python" -W ignore "$@"; }
check_py() { py deploy/ci/check_ops.py "$@"; }
cloudinit_schema() {
  PYTHONPATH=$CLOUDINIT_PY py -m cloudinit.config.schema --config-file "$1"
}

# ----------------------------------------------------------------- systemd
check_systemd() {
  local stub=$TMP/systemd u
  mkdir -p "$stub/bin"
  for u in relay connector agent; do
    printf '#!/bin/sh\nexit 0\n' >"$stub/bin/ztna-$u"
    chmod +x "$stub/bin/ztna-$u"
  done
  # verify insists that ExecStart= binaries exist: check copies whose
  # /usr/local/bin/ points at stubs.
  for u in deploy/systemd/*.service; do
    sed "s#/usr/local/bin/#$stub/bin/#g" "$u" >"$stub/$(basename "$u")"
  done
  for u in "$stub"/*.service; do
    run "systemd-analyze verify $(basename "$u")" quiet systemd-analyze verify "$u"
    if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
      run "systemd-analyze security $(basename "$u") (exposure <= 2.5)" \
        systemd-analyze security --offline=yes --threshold=25 --no-pager "$u"
    else
      skip "systemd-analyze security" "systemd older than 250 has no --offline"
    fi
  done
  sed 's/^NoNewPrivileges=yes$/NoNewPrivileges=yes\nNoSuchSetting=1/' "$stub/ztna-relay.service" >"$stub/bad-key.service"
  must_fail "verify flags an unknown key" quiet systemd-analyze verify "$stub/bad-key.service"
  sed "s#$stub/bin/ztna-relay#$stub/bin/missing#" "$stub/ztna-relay.service" >"$stub/bad-exec.service"
  must_fail "verify flags a missing ExecStart binary" quiet systemd-analyze verify "$stub/bad-exec.service"
  mkdir -p "$TMP/sysroot/etc"
  run "systemd-sysusers creates ztna" sysusers_ok
}
sysusers_ok() {
  systemd-sysusers --root="$TMP/sysroot" "$ROOT/deploy/systemd/ztna.sysusers.conf" &&
    grep '^ztna:x:[0-9]*:[0-9]*:ZTNA data plane:/nonexistent:/usr/sbin/nologin$' "$TMP/sysroot/etc/passwd"
}

# --------------------------------------------------------------- terraform
check_terraform() {
  run "terraform: parse every .tf (python-hcl2), cross-check variables, locals, placeholders" check_py terraform
  printf 'resource "x" "y" {\n  a = \n' >"$TMP/broken.tf"
  must_fail "python-hcl2 rejects broken HCL" check_py hcl-parse "$TMP/broken.tf"
  if [ -n "$TERRAFORM" ]; then
    run "terraform fmt -check -recursive" "$TERRAFORM" fmt -check -recursive -diff deploy/cloud/terraform
    mkdir -p "$TMP/fmt" && printf 'variable "x" {\ntype=string\n}\n' >"$TMP/fmt/bad.tf"
    must_fail "terraform fmt -check flags bad formatting" "$TERRAFORM" fmt -check "$TMP/fmt"
  else
    skip "terraform fmt -check" "no terraform on PATH"
  fi
}

# -------------------------------------------------------------- cloud-init
tf_render_matches() { # Terraform's templatefile() renders the template like check_ops.py
  local d=$TMP/tfrender
  mkdir -p "$d"
  py - "$d/main.tf" <<'EOF'
import json, sys
sys.path.insert(0, "deploy/ci")
import check_ops
vals = ", ".join(f"{k} = {json.dumps(v)}" for k, v in sorted(check_ops.SAMPLE.items()))
open(sys.argv[1], "w").write('output "ud" {\n  value = templatefile(%s, { %s })\n}\n'
                             % (json.dumps(check_ops.TEMPLATE), vals))
EOF
  (cd "$d" && "$TERRAFORM" init -input=false >/dev/null && "$TERRAFORM" apply -auto-approve -input=false >/dev/null &&
    "$TERRAFORM" output -raw ud) >"$TMP/ud-tf" &&
    cmp "$TMP/ud-tf" "$TMP/user-data"
}

check_cloudinit() {
  local ud=$TMP/user-data
  run "cloud-init template: placeholders, files, embedded unit, render" check_py template "$ud"
  [ -f "$ud" ] || return 0
  run "cloud-init schema (raw template)" cloudinit_schema deploy/cloud/cloud-init/relay.yaml
  run "cloud-init schema (rendered)" cloudinit_schema "$ud"
  sed 's/^    defer: true$/    defer: true\n    mode: "0600"/' "$ud" >"$TMP/bad-user-data"
  must_fail "cloud-init schema rejects an unknown write_files key" cloudinit_schema "$TMP/bad-user-data"
  mkdir -p "$TMP/ud-files"
  run "extract rendered files" check_py extract "$ud" "$TMP/ud-files"
  run "bootstrap.sh parses (sh -n)" sh -n "$TMP/ud-files/usr/local/lib/ztna/bootstrap.sh"
  run "bootstrap.sh parses (bash -n)" bash -n "$TMP/ud-files/usr/local/lib/ztna/bootstrap.sh"
  if [ -n "$TERRAFORM" ]; then
    run "terraform templatefile() renders the template like check_ops.py" tf_render_matches
  else
    skip "render through terraform templatefile()" "no terraform on PATH"
  fi
}

# ----------------------------------------------------------- observability
check_observability() {
  local prom=deploy/observability/prometheus
  run "promtool check rules alerts.yml" "$PROMTOOL" check rules "$prom/alerts.yml"
  run "promtool test rules alerts-test.yml" "$PROMTOOL" test rules "$prom/alerts-test.yml"
  run "promtool check config scrape-example.yml" "$PROMTOOL" check config "$prom/scrape-example.yml"
  printf 'groups:\n  - name: broken\n    rules:\n      - alert: Broken\n        expr: sum(rate(ztna_relay_drops_total[5m]) >\n' \
    >"$TMP/broken-rules.yml"
  must_fail "promtool rejects a broken rule" "$PROMTOOL" check rules "$TMP/broken-rules.yml"
  # The real tests with one expectation flipped must fail.
  cp "$prom/alerts.yml" "$TMP/alerts.yml"
  sed '0,/exp_alerts: \[\]/s//exp_alerts: [{exp_labels: {severity: critical}}]/' "$prom/alerts-test.yml" \
    >"$TMP/alerts-test.yml"
  must_fail "promtool test rules catches a wrong expectation" "$PROMTOOL" test rules "$TMP/alerts-test.yml"

  run "dashboard JSON: structure, datasource variable, required panels" check_py dashboard "$TMP/dashboard-rules.yml"
  [ -f "$TMP/dashboard-rules.yml" ] &&
    run "dashboard queries are valid PromQL (promtool)" "$PROMTOOL" check rules "$TMP/dashboard-rules.yml"
  run "dashboard and alerts use only metrics of metrics.txt" check_py metric-names
  printf 'groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(ztna_relay_no_such_metric_total[5m]) > 0\n' \
    >"$TMP/unknown-metric.yml"
  must_fail "an unknown metric name is flagged" check_py metric-names "$TMP/unknown-metric.yml"
}

# -------------------------------------------------------------- live relay
newest_bin() { # NAME: newest target/{release,debug}/NAME
  local b best=
  for b in target/release/$1 target/debug/$1; do
    [ -x "$b" ] || continue
    if [ -z "$best" ] || [ "$b" -nt "$best" ]; then best=$b; fi
  done
  echo "$best"
}
stale() { # BIN DIR...: some Rust source under DIR... is newer than BIN
  local bin=$1; shift
  find "$@" -name '*.rs' -newer "$bin" 2>/dev/null | grep -q .
}
http_get() { # URL -> prints "STATUS BODY"
  py - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        print(r.status, r.read().decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace"))
except Exception as e:
    print(0, e)
EOF
}
wait_status() { # URL STATUS SECONDS
  for _ in $(seq 1 $(($3 * 10))); do
    [ "$(http_get "$1" | cut -d' ' -f1)" = "$2" ] && return 0
    sleep 0.1
  done
  echo "$1 did not answer $2 within $3 s: $(http_get "$1")"
  return 1
}

relay_ready() { # URL
  wait_status "$1" 200 15 || { echo "relay log:"; cat "$TMP/relay.log"; return 1; }
}
make_pki() { # RELAY DIR
  "$1" ca init --dir "$2" --trust-domain corp.example &&
    "$1" ca issue --dir "$2" --trust-domain corp.example --kind relay --name relay --dns relay &&
    "$1" ca issue --dir "$2" --trust-domain corp.example --kind connector --name bench-connector &&
    "$1" ca issue --dir "$2" --trust-domain corp.example --kind agent --name bench-agent
}
gone_within() { # SECONDS PID
  for _ in $(seq 1 $(($1 * 10))); do
    # A child that exited stays a zombie until waited for: look at its state.
    case $(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null | cut -c1) in "" | Z) return 0 ;; esac
    sleep 0.1
  done
  echo "process $2 still running $1 s after SIGTERM"
  return 1
}

# The bootstrap's `ztna-tune apply --profile cloud`, on a scratch root.
check_tune() {
  local tune=${ZTNA_TUNE_BIN:-$(newest_bin ztna-tune)}
  if [ -z "$tune" ] || { [ -z "${ZTNA_TUNE_BIN:-}" ] && stale "$tune" tuning/src; }; then
    skip "ztna-tune apply" "no up-to-date ztna-tune in target/"
    return 0
  fi
  mkdir -p "$TMP/tuneroot/etc/sysctl.d" "$TMP/tuneroot/proc/sys"
  run "ztna-tune apply --profile cloud writes /etc/sysctl.d/90-ztna-relay.conf" tune_ok "$tune"
}
tune_ok() {
  "$1" apply --profile cloud --root "$TMP/tuneroot" && [ -s "$TMP/tuneroot/etc/sysctl.d/90-ztna-relay.conf" ]
}

check_live() {
  local relay bench
  if [ -n "${ZTNA_RELAY_BIN:-}" ]; then
    relay=$ZTNA_RELAY_BIN
    bench=${ZTNA_BENCH_BIN:-$(dirname "$relay")/ztna-bench}
  else
    relay=$(newest_bin ztna-relay)
    bench=$(newest_bin ztna-bench)
    if [ -z "$relay" ] || [ -z "$bench" ]; then
      skip "live relay metrics" "no ztna-relay and ztna-bench in target/; cargo build --bins"
      return 0
    fi
    if stale "$relay" dataplane control/src || stale "$bench" bench/src dataplane testkit/src control/src; then
      skip "live relay metrics" "$relay or $bench is older than the sources"
      return 0
    fi
  fi
  local pki=$TMP/pki etc=$TMP/live/etc/ztna ports udp tcp
  mkdir -p "$pki"
  run "ztna-relay ca init/issue (relay, bench connector, bench agent)" make_pki "$relay" "$pki"
  [ -f "$pki/relay-relay.key" ] || return 0
  printf '[services.bench]\nconnectors = ["bench-connector"]\nagents = ["bench-agent"]\n' >"$TMP/policy.toml"
  # The user data of a VM with these certificates, as Terraform would render it.
  py - "$pki" "$TMP/policy.toml" >"$TMP/values.json" <<'EOF'
import base64, json, sys
b = lambda p: base64.b64encode(open(p, "rb").read()).decode()
pki = sys.argv[1]
print(json.dumps({"relay_cert_b64": b(f"{pki}/relay-relay.pem"), "relay_key_b64": b(f"{pki}/relay-relay.key"),
                  "client_ca_b64": b(f"{pki}/ca.pem"), "policy_b64": b(sys.argv[2]), "release_url": "",
                  "relay_sha256": "", "tune_sha256": ""}))
EOF
  run "render user data with real certificates" check_py template "$TMP/live-user-data" "$TMP/values.json"
  mkdir -p "$TMP/live"
  run "extract the VM's files" check_py extract "$TMP/live-user-data" "$TMP/live"
  [ -f "$etc/relay.toml" ] || return 0
  ports=$(py -c 'import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
t = socket.socket(); t.bind(("127.0.0.1", 0))
print(u.getsockname()[1], t.getsockname()[1])')
  read -r udp tcp <<<"$ports"
  # The VM's relay.toml, with paths under $etc and loopback ports.
  sed -e "s#/etc/ztna/#$etc/#g" -e "s#^listen = .*#listen = \"127.0.0.1:$udp\"#" \
    -e "s#^metrics = .*#metrics = \"127.0.0.1:$tcp\"#" "$etc/relay.toml" >"$etc/relay-local.toml"
  printf 'workers = 2\n' >>"$etc/relay-local.toml"
  run "ztna-relay check-config on the cloud-init relay.toml" "$relay" check-config --config "$etc/relay-local.toml"
  { cat "$etc/relay-local.toml"; printf 'no_such_key = 1\n'; } >"$etc/bad.toml"
  must_fail "check-config rejects an unknown key" "$relay" check-config --config "$etc/bad.toml"

  "$relay" --config "$etc/relay-local.toml" >"$TMP/relay.log" 2>&1 &
  RELAY_PID=$!
  run "relay /readyz 200 after start" relay_ready "http://127.0.0.1:$tcp/readyz"
  run "relay /healthz 200" wait_status "http://127.0.0.1:$tcp/healthz" 200 5
  run "ztna-bench: 3 s of traffic through the relay" "$bench" relay --relay "127.0.0.1:$udp" --ca "$pki/ca.pem" \
    --certs "$pki" --server-name relay --agents 1 --duration 3 --rate 200 --quiet
  sleep 1.5 # the publisher copies worker counters into /metrics once a second
  http_get "http://127.0.0.1:$tcp/metrics" | sed '1s/^200 //' >"$TMP/metrics.txt"
  run "every family of metrics.txt is exported (histogram: _bucket/_sum/_count), label values used exist" \
    check_py live-metrics "$TMP/metrics.txt"
  http_get "http://127.0.0.1:$tcp/status" | sed '1s/^200 //' >"$TMP/status.json"
  run "relay /status is a JSON report (counts, services, connections)" py -c '
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("uptime_secs", "agents", "connectors", "flows", "services", "connections", "connections_omitted"):
    assert k in d, f"no {k} in {d}"
' "$TMP/status.json"
  kill -TERM "$RELAY_PID" 2>/dev/null || true
  run "relay exits within shutdown_grace_ms after SIGTERM" gone_within 25 "$RELAY_PID"
  local rc=0
  wait "$RELAY_PID" || rc=$?
  RELAY_PID=
  if [ "$rc" -ne 0 ]; then
    fail=$((fail + 1))
    echo "check-ops: FAIL relay exit status $rc after SIGTERM" >&2
    sed 's/^/    /' "$TMP/relay.log" >&2
  fi
}

setup_tools
check_systemd
check_terraform
check_cloudinit
check_observability
check_live
check_tune

if [ "$skip" -gt 0 ]; then
  printf 'check-ops: skipped %s\n' "${skipped[@]}"
fi
echo "check-ops: $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
