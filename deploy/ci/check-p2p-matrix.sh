#!/usr/bin/env bash
# CI check of direct paths through real NATs: `natlab.sh p2p-matrix` runs the
# real relay, connector and Linux agent (TUN) for every ordered pair of the
# NAT lab's types and asserts the outcome RESULTS.md's punch matrix predicts
# (direct or relay), that UDP echoes through the tunnel keep flowing while
# punching, and records the time to direct per pair. About 3 minutes. The
# table goes to stdout, the JSON to target/p2p-matrix.json.
#
# Then port prediction (opt-in, docs/protocol/direct.md §11.9): with
# port_prediction = 512 at both ends and symmetric NATs that map into a
# 256-port block (as carrier-grade NATs with port-block allocation do),
# port-restricted <-> symmetric (both ways) and port-restricted <->
# port-restricted must go direct; symmetric <-> symmetric is reported
# (target/p2p-prediction.json; about 25 s).
#
# Skips (exit 0, with the reason) where the NAT lab cannot run (see
# check-nat-lab.sh) or the binaries are not built.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
LAB=deploy/nat-lab/natlab.sh

skip() { echo "p2p-matrix: SKIPPED: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "not root (network namespaces and nftables need root)"
command -v nft >/dev/null || skip "nftables (nft) is not installed"
command -v python3 >/dev/null || skip "python3 is not installed"
ip netns list >/dev/null 2>&1 || skip "'ip netns' is not available"
[ -x target/debug/ztna-agent ] || [ -x target/release/ztna-agent ] || skip "no built binaries (cargo build --bins)"

trap '"$LAB" down >/dev/null 2>&1 || true' EXIT
trap 'exit 130' INT TERM
"$LAB" down >/dev/null 2>&1 || true
mkdir -p target
NATLAB_QUIET=1 "$LAB" p2p-matrix --json target/p2p-matrix.json
matrix=$?
NATLAB_QUIET=1 NATLAB_PORT_PREDICTION=512 NATLAB_SYMMETRIC_PORTS=40000-40255 \
    NATLAB_P2P_TYPES="port-restricted symmetric" "$LAB" p2p-matrix --json target/p2p-prediction.json || matrix=1
python3 - target/p2p-prediction.json <<'EOF' || matrix=1
import json, sys
rows = json.load(open(sys.argv[1]))
# With one symmetric side the guesses cover the whole block: direct every
# time. Symmetric to symmetric needs both sides' guesses to meet (each
# guess opens a new random mapping): likely, not certain; reported only.
must = [r for r in rows if (r["a"], r["b"]) != ("symmetric", "symmetric")]
relayed = [f"{r['a']} -> {r['b']}" for r in must if r["path"] != "direct"]
assert len(rows) == 4 and not relayed, f"port prediction: still on the relay: {relayed}"
both = [r["path"] for r in rows if (r["a"], r["b"]) == ("symmetric", "symmetric")]
print(f"p2p-prediction: {len(must)} pairs direct with port prediction against a port-block NAT; "
      f"symmetric -> symmetric: {both[0] if both else '?'}")
EOF
exit $matrix
