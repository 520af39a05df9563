#!/usr/bin/env bash
# The dependency rules of ARCHITECTURE.md ("Crates and what each may
# import"), checked on the normal (non-dev) dependency graph: each crate may
# depend only on the workspace crates listed for it, and the agent's static
# library pulls in no command-line, config-file or logging-subscriber crate.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
check() { # CRATE ALLOWED-WORKSPACE-CRATES...
  local crate=$1; shift
  local tree got
  tree=$(cargo tree -p "$crate" -e normal --prefix none --offline)
  got=$(printf '%s\n' "$tree" | awk '/^ztna-/ {print $1}' | sort -u | grep -vx "$crate" || true)
  for dep in $got; do
    if ! printf '%s\n' "$@" | grep -qx "$dep"; then
      echo "check-deps: $crate must not depend on $dep" >&2
      fail=1
    fi
  done
}
check ztna-control
check ztna-udp
check ztna-ops ztna-control
check ztna-relay ztna-control ztna-udp ztna-ops
check ztna-connector ztna-control ztna-udp ztna-ops
check ztna-agent-sys ztna-control
check ztna-agent-linux ztna-agent-sys ztna-control ztna-udp ztna-ops
if cargo tree -p ztna-agent-sys -e normal --prefix none --offline | grep -Eq '^(clap|toml|tracing-subscriber) '; then
  echo "check-deps: ztna-agent-sys (the static library) must not depend on clap, toml or tracing-subscriber" >&2
  fail=1
fi
[ "$fail" -eq 0 ] && echo "check-deps: ok"
exit "$fail"
