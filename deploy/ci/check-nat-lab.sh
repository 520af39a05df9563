#!/usr/bin/env bash
# CI check of the NAT lab (deploy/nat-lab): builds each NAT type in network
# namespaces, classifies it with probe.py (RFC 4787 mapping and filtering),
# runs a few hole-punching attempts between two sites, and asserts what this
# kernel does. About 45 s; everything lives in natlab-* namespaces, which are
# removed first (leftovers of an aborted run) and on exit, even on failure.
#
# Skips (exit 0, with the reason) when not root, or when network namespaces,
# nftables or python3 are not available.
#
# Last line: "nat-lab: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
LAB=deploy/nat-lab/natlab.sh

skip() { echo "nat-lab: SKIPPED: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "not root (network namespaces and nftables need root)"
command -v ip >/dev/null || skip "iproute2 (ip) is not installed"
command -v nft >/dev/null || skip "nftables (nft) is not installed"
command -v python3 >/dev/null || skip "python3 is not installed"
ip netns list >/dev/null 2>&1 || skip "'ip netns' is not available"
# Can we really make one? (A container without CAP_SYS_ADMIN cannot.)
probe_ns=natlab-ci-canary-$$
if ! ip netns add "$probe_ns" 2>/dev/null; then skip "cannot create network namespaces here"; fi
if ! ip netns exec "$probe_ns" nft list ruleset >/dev/null 2>&1; then
    ip netns del "$probe_ns"
    skip "nftables does not work in a network namespace here"
fi
ip netns del "$probe_ns"

export NATLAB_QUIET=1
work=$(mktemp -d /tmp/natlab-ci.XXXXXX)
cleanup() { "$LAB" down >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "PASS $*"; }
ko() { fail=$((fail + 1)); echo "FAIL $*"; }

# Leftovers of an aborted run.
"$LAB" down || { echo "nat-lab: cannot remove stale natlab-* namespaces"; exit 1; }

echo "nat-lab: kernel $(uname -r), $(nft --version)"

# ---------------------------------------------------------------- classification
# type  mapping  filtering  port-preserved
expect_probe() {
    local type=$1 mapping=$2 filtering=$3 preserved=$4 json=$work/$1.json
    if ! "$LAB" probe "$type" "$json" > "$work/$type.out" 2>&1; then
        ko "probe $type: natlab.sh failed: $(tail -n 3 "$work/$type.out")"
        return
    fi
    local got
    got=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["mapping"], r["filtering"], str(r["port_preserved"]).lower())' "$json")
    if [ "$got" = "$mapping $filtering $preserved" ]; then
        ok "probe $type: $(tail -n 1 "$work/$type.out")"
    else
        ko "probe $type: expected '$mapping $filtering $preserved', got '$got': $(tail -n 1 "$work/$type.out")"
    fi
}

EIM=endpoint-independent
expect_probe full-cone        $EIM $EIM                       true
expect_probe restricted-cone  $EIM address-dependent          true
expect_probe port-restricted  $EIM address-and-port-dependent true
# masquerade random,fully-random: a random port for every new flow, so a
# new mapping per destination ip:port (and never the client's own port).
expect_probe symmetric        address-and-port-dependent address-and-port-dependent false
# Two masquerade layers keep the port twice: still EIM + APDF.
expect_probe double           $EIM address-and-port-dependent true

# ---------------------------------------------------------------- conntrack UDP timeouts
ip netns add natlab-ci-timeouts
t_unreplied=$(ip netns exec natlab-ci-timeouts cat /proc/sys/net/netfilter/nf_conntrack_udp_timeout 2>/dev/null || echo '?')
t_stream=$(ip netns exec natlab-ci-timeouts cat /proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream 2>/dev/null || echo '?')
ip netns del natlab-ci-timeouts
echo "nat-lab: conntrack UDP timeouts in a new namespace: ${t_unreplied}s unreplied, ${t_stream}s stream (recorded, not asserted)"

# ---------------------------------------------------------------- hole punching
# a starts punching first; b learns a's address at the same moment but waits
# 0.5 s, so a's first packets reach b's NAT before b has sent anything.
expect_punch() {
    local want=$1 ta=$2 tb=$3 line
    line=$("$LAB" punch "$ta" "$tb" 2>&1 | tail -n 1)
    case $line in
        *": direct "*) got=direct ;;
        *"FAILED"*) got=fail ;;
        *) ko "punch a=$ta b=$tb${NATLAB_WAN_INPUT:+ [WAN input $NATLAB_WAN_INPUT]}: no result: $line"; return ;;
    esac
    if [ "$got" = "$want" ]; then
        ok "$line${NATLAB_WAN_INPUT:+ [WAN input $NATLAB_WAN_INPUT]}"
    else
        ko "expected $want: $line${NATLAB_WAN_INPUT:+ [WAN input $NATLAB_WAN_INPUT]}"
    fi
}

# Routers drop unsolicited WAN input (the default, like home routers): the
# textbook table.
expect_punch direct port-restricted port-restricted
expect_punch direct double double
expect_punch direct full-cone symmetric
# restricted-cone accepts the symmetric side's new port (same address).
expect_punch direct restricted-cone symmetric
expect_punch fail   port-restricted symmetric
expect_punch fail   symmetric symmetric

# Kernel behaviour, not theory: when the router lets an unsolicited packet
# reach its own stack (no WAN input drop), conntrack confirms an entry for
# it (peer:port -> wan:P). b's own first packet to that peer would need the
# same tuple, so masquerade gives b a NEW source port for it: b's NAT acts
# like a symmetric one towards the early peer, and a port-restricted a drops
# it. See RESULTS.md ("the early-packet collision").
export NATLAB_WAN_INPUT=accept
expect_punch fail   port-restricted port-restricted
expect_punch fail   port-restricted restricted-cone
# ... whereas a restricted-cone a accepts b's new port (same address).
expect_punch direct restricted-cone port-restricted
unset NATLAB_WAN_INPUT

# ---------------------------------------------------------------- the project's binaries
# Relay in the public namespace, connector (fixed port 4434) behind a
# symmetric NAT, agent behind a port-restricted one: what the relay observes
# is each NAT's public side, and traffic flows. Needs built binaries
# (target/release or target/debug, or NATLAB_BIN); skipped without them.
strip() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }
if out=$("$LAB" up port-restricted symmetric 2>&1 && "$LAB" ztna-start 2>&1); then
    printf '  %s\n' "${out//$'\n'/$'\n'  }"
    d=${NATLAB_STATE:-/run/natlab}/ztna
    agent_local=$(strip "$d/agent.log" | sed -n 's/.*connecting local=\([0-9.:]*\).*/\1/p' | head -n 1)
    agent_obs=$(sed -n 's/^observed address //p' "$d/agent.log" | head -n 1)
    conn_obs=$(strip "$d/connector.log" | sed -n 's/.*observed address.*observed=\([0-9.:]*\).*/\1/p' | head -n 1)
    # port-restricted keeps the agent's port; symmetric replaces 4434.
    if [ "${agent_obs%:*}" = 198.51.100.101 ] && [ -n "$agent_local" ] && [ "${agent_obs##*:}" = "${agent_local##*:}" ]; then
        ok "ztna: agent $agent_local observed as $agent_obs (port-restricted keeps the port)"
    else
        ko "ztna: agent $agent_local observed as '$agent_obs', expected 198.51.100.101 with the same port"
    fi
    if [ "${conn_obs%:*}" = 198.51.100.102 ] && [ "${conn_obs##*:}" != 4434 ]; then
        ok "ztna: connector 192.168.2.2:4434 observed as $conn_obs (symmetric: a random port)"
    else
        ko "ztna: connector observed as '$conn_obs', expected 198.51.100.102 with a port other than 4434"
    fi
    replies=$("$LAB" exec a ping -n -q -c 3 -i 0.2 -W 1 100.100.0.10 | sed -n 's/.* \([0-9]*\) received.*/\1/p')
    if [ "$replies" = 3 ]; then ok "ztna: ping 100.100.0.10 through NAT, relay, NAT, connector: 3/3"; else ko "ztna: ping got ${replies:-0}/3"; fi
    "$LAB" down
else
    case $out in
        *"no ztna binaries"*) echo "SKIP ztna: no built ztna-relay/connector/agent/bench (cargo build --bins)" ;;
        *) ko "ztna: could not start: $(echo "$out" | tail -n 5)" ;;
    esac
    "$LAB" down
fi

elapsed=$(( $(date +%s) - start ))
echo "nat-lab: ${elapsed}s"
[ "$elapsed" -lt 120 ] || ko "took ${elapsed}s (budget 120 s)"
echo "nat-lab: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
