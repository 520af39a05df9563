#!/usr/bin/env bash
# NAT lab on network namespaces: a small "public internet" with two STUN-like
# servers and a relay address, and one or two sites each behind a chosen NAT
# type. Everything lives in namespaces named natlab-*; nothing touches the
# host's own interfaces, routes or firewall. Needs root, iproute2, nftables
# and python3. See README.md beside this file.
#
#   natlab.sh up TYPE_A [TYPE_B]    build the lab (site A, and site B if given)
#   natlab.sh down                  remove every natlab-* namespace
#   natlab.sh status                topology, nodes and addresses
#   natlab.sh exec NODE CMD...      run a command in a node
#   natlab.sh shell NODE            interactive shell in a node
#   natlab.sh rules NODE            the nftables ruleset of a router
#   natlab.sh conntrack NODE        the conntrack table of a router
#   natlab.sh servers start|stop    probe servers (STUN-like, rendezvous) on s1, s2
#   natlab.sh probe TYPE            build TYPE, classify it, tear it down
#   natlab.sh probe-all             probe every NAT type
#   natlab.sh probe-site [SITE]     classify the NAT of a site of the running lab
#   natlab.sh punch TYPE_A TYPE_B   build A and B, try a UDP hole punch, tear down
#   natlab.sh punch-matrix          punch every ordered pair of NAT types
#   natlab.sh ztna-start            relay, connector (site b), agent (site a) in the
#                                   running lab, from target/release (or NATLAB_BIN)
#   natlab.sh ztna-stop             stop them
#   natlab.sh p2p-matrix [--json FILE]  the real agent, connector and relay
#                                   for every ordered pair of NAT types (agent
#                                   on site a, connector on site b): direct or
#                                   relay, against RESULTS.md's punch matrix
#
# TYPE: full-cone (fc), restricted-cone (rc), port-restricted (prc),
#       symmetric (sym), double[:OUTER[:INNER]] (two NATs, default both
#       port-restricted), none (client with a public address).
# NODE: inet (the bridge), relay, s1, s2, a, a-nat, a-nat2, b, b-nat, b-nat2.
set -eEuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
P=${NATLAB_PREFIX:-natlab-}
STATE=${NATLAB_STATE:-/run/${P%-}}
PUB=198.51.100            # TEST-NET-2, "the internet" (only inside the lab)
RELAY_IP=$PUB.10
S1_IP=$PUB.11
S2_IP=$PUB.12
PORT1=3478
PORT2=3479
PYTHON=${PYTHON:-python3}
ALL_TYPES="full-cone restricted-cone port-restricted symmetric double"

die() { echo "natlab: $*" >&2; exit 1; }
log() { [ -n "${NATLAB_QUIET:-}" ] || echo "natlab: $*" >&2; }

ns() { echo "${P}$1"; }
in_ns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

lab_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}" || true
}

lab_is_up() { [ -n "$(lab_namespaces)" ]; }

canon_type() {
    case $1 in
        fc|full-cone|fullcone) echo full-cone ;;
        rc|arc|restricted-cone|address-restricted|address-restricted-cone) echo restricted-cone ;;
        prc|port-restricted|port-restricted-cone) echo port-restricted ;;
        sym|symmetric) echo symmetric ;;
        none|public) echo none ;;
        double) echo double:port-restricted:port-restricted ;;
        double:*)
            local rest=${1#double:} outer inner
            outer=${rest%%:*}
            inner=${rest#*:}
            [ "$inner" != "$rest" ] || inner=port-restricted
            outer=$(canon_type "$outer") inner=$(canon_type "$inner")
            case "$outer $inner" in *double*|*none*) die "double takes two plain NAT types" ;; esac
            echo "double:$outer:$inner" ;;
        *) die "unknown NAT type '$1' (full-cone, restricted-cone, port-restricted, symmetric, double[:OUTER[:INNER]], none)" ;;
    esac
}

# ------------------------------------------------------------------ building

add_node() {
    local n; n=$(ns "$1")
    ip netns add "$n"
    ip -n "$n" link set lo up
    # IPv4 only, and quiet: no IPv6 link-local chatter on the lab's links.
    in_ns "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || true
}

# Attach NODE to the public bridge as interface IFNAME with address IP.
pub_link() {
    local node=$1 ifname=$2 ip=$3
    ip -n "$(ns inet)" link add "p-$node" type veth peer name "$ifname" netns "$(ns "$node")"
    ip -n "$(ns inet)" link set "p-$node" master br0 up
    in_ns "$node" sysctl -qw "net.ipv6.conf.$ifname.disable_ipv6=1" || true
    ip -n "$(ns "$node")" addr add "$ip/24" dev "$ifname"
    ip -n "$(ns "$node")" link set "$ifname" up
}

# A point-to-point segment: NODE1's IF1 (IP1) <-> NODE2's IF2 (IP2), a /24.
p2p_link() {
    local n1=$1 if1=$2 ip1=$3 n2=$4 if2=$5 ip2=$6
    ip -n "$(ns "$n1")" link add "$if1" type veth peer name "$if2" netns "$(ns "$n2")"
    ip -n "$(ns "$n1")" addr add "$ip1/24" dev "$if1"
    ip -n "$(ns "$n2")" addr add "$ip2/24" dev "$if2"
    ip -n "$(ns "$n1")" link set "$if1" up
    ip -n "$(ns "$n2")" link set "$if2" up
}

make_router() {
    add_node "$1"
    in_ns "$1" sysctl -qw net.ipv4.ip_forward=1
}

load_rules() {
    local node=$1 type=$2
    "$HERE/nat-rules.sh" "$type" wan0 | in_ns "$node" nft -f -
}

build_public() {
    add_node inet
    ip -n "$(ns inet)" link add br0 type bridge
    ip -n "$(ns inet)" link set br0 up
    # The bridge is a plain switch: no netfilter on bridged frames here.
    in_ns inet sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
    local node ip
    for node in relay s1 s2; do
        case $node in relay) ip=$RELAY_IP ;; s1) ip=$S1_IP ;; s2) ip=$S2_IP ;; esac
        add_node "$node"
        pub_link "$node" eth0 "$ip"
    done
}

# build_site SITE INDEX TYPE  (SITE a|b, INDEX 1|2)
build_site() {
    local s=$1 i=$2 type=$3
    case $type in
        none)
            add_node "$s"
            pub_link "$s" eth0 "$PUB.2$i"
            ;;
        double:*)
            local rest=${type#double:}
            local outer=${rest%%:*} inner=${rest#*:}
            # s-nat: the carrier-grade NAT (100.64.0.0/10 shared address space
            # inside, the public address outside); s-nat2: the home router.
            make_router "$s-nat"
            pub_link "$s-nat" wan0 "$PUB.10$i"
            make_router "$s-nat2"
            p2p_link "$s-nat" lan0 "100.64.$i.1" "$s-nat2" wan0 "100.64.$i.2"
            ip -n "$(ns "$s-nat2")" route add default via "100.64.$i.1"
            add_node "$s"
            p2p_link "$s-nat2" lan0 "192.168.$i.1" "$s" eth0 "192.168.$i.2"
            ip -n "$(ns "$s")" route add default via "192.168.$i.1"
            load_rules "$s-nat" "$outer"
            load_rules "$s-nat2" "$inner"
            ;;
        *)
            make_router "$s-nat"
            pub_link "$s-nat" wan0 "$PUB.10$i"
            add_node "$s"
            p2p_link "$s-nat" lan0 "192.168.$i.1" "$s" eth0 "192.168.$i.2"
            ip -n "$(ns "$s")" route add default via "192.168.$i.1"
            load_rules "$s-nat" "$type"
            ;;
    esac
}

cmd_down() {
    local n pid pids
    for n in $(lab_namespaces); do
        pids=$(ip netns pids "$n" 2>/dev/null || true)
        for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    done
    for n in $(lab_namespaces); do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            [ -n "$(ip netns pids "$n" 2>/dev/null)" ] || break
            sleep 0.1
        done
        for pid in $(ip netns pids "$n" 2>/dev/null || true); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$n" 2>/dev/null || true
    done
    rm -rf "$STATE"
    if lab_is_up; then die "could not remove: $(lab_namespaces | tr '\n' ' ')"; fi
}

cmd_up() {
    if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "usage: up TYPE_A [TYPE_B]"; fi
    local ta tb=""
    ta=$(canon_type "$1")
    [ $# -lt 2 ] || tb=$(canon_type "$2")
    check_env
    if lab_is_up; then die "a lab is up ($(cat "$STATE/topology" 2>/dev/null || echo unknown)); run 'natlab.sh down' first"; fi
    trap 'echo "natlab: up failed, cleaning up" >&2; cmd_down' ERR
    mkdir -p "$STATE"
    build_public
    build_site a 1 "$ta"
    [ -z "$tb" ] || build_site b 2 "$tb"
    trap - ERR
    { echo "a=$ta"; [ -z "$tb" ] || echo "b=$tb"; } > "$STATE/topology"
    log "up: site a=$ta${tb:+, site b=$tb}"
}

cmd_status() {
    if ! lab_is_up; then echo "no lab is up"; return 0; fi
    echo "topology: $(tr '\n' ' ' < "$STATE/topology" 2>/dev/null || echo unknown)"
    local n node
    for n in $(lab_namespaces); do
        node=${n#"$P"}
        printf '%-8s %s\n' "$node" "$(ip -n "$n" -4 -br addr show | awk '$1 != "lo" {sub(/@.*/, "", $1); print $1"="$3}' | tr '\n' ' ')"
    done
    echo "public: relay $RELAY_IP, s1 $S1_IP, s2 $S2_IP (probe ports $PORT1,$PORT2)"
}

node_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$(ns "$1")"; }

cmd_exec() {
    [ $# -ge 2 ] || die "usage: exec NODE CMD..."
    local node=$1; shift
    node_exists "$node" || die "no node '$node' (see 'natlab.sh status')"
    exec ip netns exec "$(ns "$node")" "$@"
}

# ------------------------------------------------------------------ probing

servers_start() {
    mkdir -p "$STATE"
    local node ip peer
    for node in s1 s2; do
        if [ -f "$STATE/$node.pid" ] && kill -0 "$(cat "$STATE/$node.pid")" 2>/dev/null; then continue; fi
        case $node in s1) ip=$S1_IP peer=$S2_IP ;; s2) ip=$S2_IP peer=$S1_IP ;; esac
        rm -f "$STATE/$node.ready"
        in_ns "$node" "$PYTHON" "$HERE/probe.py" server --bind "$ip" --ports "$PORT1,$PORT2" \
            --peer "$peer:$PORT1" --ready-file "$STATE/$node.ready" </dev/null >"$STATE/$node.log" 2>&1 &
        echo $! > "$STATE/$node.pid"
    done
    for _ in $(seq 50); do
        [ -f "$STATE/s1.ready" ] && [ -f "$STATE/s2.ready" ] && return 0
        sleep 0.1
    done
    die "probe servers did not start: $(cat "$STATE"/s?.log 2>/dev/null)"
}

servers_stop() {
    local node pid
    for node in s1 s2; do
        [ -f "$STATE/$node.pid" ] || continue
        pid=$(cat "$STATE/$node.pid")
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "$STATE/$node.pid" "$STATE/$node.ready"
    done
}

site_type() { sed -n "s/^$1=//p" "$STATE/topology" 2>/dev/null; }

# probe_site SITE LABEL [JSON_OUT]
probe_site() {
    local site=$1 label=$2 out=${3:-}
    node_exists "$site" || die "no site '$site' in the running lab"
    in_ns "$site" "$PYTHON" "$HERE/probe.py" client --s1 "$S1_IP" --s2 "$S2_IP" \
        --ports "$PORT1,$PORT2" --label "$label" --local-port 40000 ${out:+--json-out "$out"}
}

cmd_probe_site() {
    local site=${1:-a} started=""
    lab_is_up || die "no lab is up"
    [ -f "$STATE/s1.pid" ] || started=1
    servers_start
    local rc=0
    probe_site "$site" "$(site_type "$site")" "${NATLAB_JSON:-}" || rc=$?
    [ -z "$started" ] || servers_stop
    return $rc
}

# A throw-away lab for one command; fails if one is already up.
ephemeral() {
    if lab_is_up; then die "a lab is up ($(tr '\n' ' ' < "$STATE/topology" 2>/dev/null)); 'natlab.sh down' first"; fi
    trap 'servers_stop; cmd_down' EXIT
    trap 'exit 130' INT TERM
}

cmd_probe() {
    [ $# -ge 1 ] || die "usage: probe TYPE [JSON_OUT]"
    local type label
    type=$(canon_type "$1")
    case $1 in double*) label=$1 ;; *) label=$type ;; esac
    check_env
    ephemeral
    NATLAB_QUIET=1 cmd_up "$type"
    servers_start
    probe_site a "$label" "${2:-}"
}

cmd_probe_all() {
    local t rc=0
    for t in $ALL_TYPES; do
        "$0" probe "$t" "${1:+$1/$t.json}" || rc=1
    done
    return $rc
}

# punch_run OUT_A OUT_B : both clients at once; b starts punching after
# NATLAB_B_DELAY seconds (default 0.5), so a's first packets reach b's NAT
# before b has sent anything, as happens in real life.
punch_run() {
    local pa pb rc=0
    in_ns a "$PYTHON" "$HERE/probe.py" punch --server "$S1_IP:$PORT1" --name a --local-port 40000 \
        --duration "${NATLAB_PUNCH_SECS:-2}" > "$1" &
    pa=$!
    in_ns b "$PYTHON" "$HERE/probe.py" punch --server "$S1_IP:$PORT1" --name b --local-port 40000 \
        --duration "${NATLAB_PUNCH_SECS:-2}" --delay "${NATLAB_B_DELAY:-0.5}" > "$2" &
    pb=$!
    wait "$pa" || rc=1
    wait "$pb" || rc=1
    return $rc
}

cmd_punch() {
    [ $# -eq 2 ] || die "usage: punch TYPE_A TYPE_B"
    local ta tb
    ta=$(canon_type "$1") tb=$(canon_type "$2")
    check_env
    ephemeral
    NATLAB_QUIET=1 cmd_up "$ta" "$tb"
    servers_start
    local tmp="$STATE/punch"
    mkdir -p "$tmp"
    punch_run "$tmp/a.json" "$tmp/b.json" || true
    "$PYTHON" - "$1" "$2" "$tmp/a.json" "$tmp/b.json" <<'EOF'
import json, sys
ta, tb, fa, fb = sys.argv[1:]
def load(f):
    try:
        return json.load(open(f))
    except Exception as e:
        return {"success": False, "error": str(e)}
a, b = load(fa), load(fb)
ok = bool(a.get("success") and b.get("success"))
print(json.dumps({"a": ta, "b": tb, "success": ok, "side_a": a, "side_b": b}))
print(f"punch a={ta} (first) b={tb} (late): {'direct' if ok else 'FAILED (relay needed)'}"
      f" (a {a.get('mapped')} saw {a.get('received_from')}; b {b.get('mapped')} saw {b.get('received_from')})")
EOF
}

# Every ordered pair (a starts punching first, b NATLAB_B_DELAY later):
# the kernel's result can depend on who is early, see RESULTS.md.
cmd_punch_matrix() {
    local types ta tb line
    read -ra types <<< "${NATLAB_PUNCH_TYPES:-$ALL_TYPES}"
    printf '%-16s' "a \\ b (late)"
    for tb in "${types[@]}"; do printf ' %-16s' "$tb"; done
    echo
    for ta in "${types[@]}"; do
        printf '%-16s' "$ta"
        for tb in "${types[@]}"; do
            line=$("$0" punch "$ta" "$tb" | tail -n 1)
            case $line in *": direct "*) printf ' %-16s' direct ;; *) printf ' %-16s' FAIL ;; esac
            [ -z "${NATLAB_VERBOSE:-}" ] || echo "$line" >&2
        done
        echo
    done
}

# ------------------------------------------------------------------ ztna

# The project's binaries: NATLAB_BIN, else the newer build of
# target/release and target/debug (a stale release build must not win).
ztna_bin_dir() {
    local root d best=""
    root=$(cd "$HERE/../.." && pwd)
    for d in ${NATLAB_BIN:-} "$root/target/release" "$root/target/debug"; do
        if [ -x "$d/ztna-relay" ] && [ -x "$d/ztna-connector" ] && [ -x "$d/ztna-agent" ] && [ -x "$d/ztna-bench" ]; then
            [ -n "${NATLAB_BIN:-}" ] && [ "$d" = "$NATLAB_BIN" ] && { echo "$d"; return 0; }
            if [ -z "$best" ] || [ "$d/ztna-relay" -nt "$best/ztna-relay" ]; then
                best=$d
            fi
        fi
    done
    [ -n "$best" ] && echo "$best"
}

# wait_line FILE PATTERN SECONDS
wait_line() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "natlab: timed out waiting for '$2' in $1:" >&2
    tail -n 5 "$1" >&2
    return 1
}

# Relay on 198.51.100.10:4433 (lab CA, mutual TLS, policy: connector
# "site" serves "echo" to agent "laptop"), an echo backend and the connector
# (fixed port 4434) on site b, the agent (TUN zt0, service 100.100.0.10/32)
# on site a. They run until 'ztna-stop' or 'down'; files in $STATE/ztna.
cmd_ztna_start() {
    lab_is_up || die "no lab is up"
    node_exists b || die "needs two sites: natlab.sh up TYPE_A TYPE_B"
    local bin d=$STATE/ztna
    bin=$(ztna_bin_dir) || die "no ztna binaries (cargo build --release, or NATLAB_BIN=DIR)"
    [ ! -f "$d/relay.pid" ] || die "already started (natlab.sh ztna-stop)"
    mkdir -p "$d"
    [ -f "$d/ca.pem" ] || "$bin/ztna-relay" ca init --dir "$d" --trust-domain lab.ztna >/dev/null
    "$bin/ztna-relay" ca issue --dir "$d" --trust-domain lab.ztna --kind relay --name relay \
        --dns relay.natlab --ip "$RELAY_IP" >/dev/null
    "$bin/ztna-relay" ca issue --dir "$d" --trust-domain lab.ztna --kind connector --name site >/dev/null
    "$bin/ztna-relay" ca issue --dir "$d" --trust-domain lab.ztna --kind agent --name laptop >/dev/null
    printf '[services.echo]\nconnectors = ["site"]\nagents = ["laptop"]\n' > "$d/policy.toml"
    cat > "$d/connector.toml" <<EOF
relays = ["$RELAY_IP:4433"]
listen = "0.0.0.0:4434"
server_name = "relay.natlab"
ca = "$d/ca.pem"
cert = "$d/connector-site.pem"
key = "$d/connector-site.key"

[[service]]
name = "echo"
icmp = true

[[service.backend]]
protocol = "udp"
port = 7
target = "127.0.0.1:7007"

[[service.backend]]
protocol = "tcp"
port = 7
target = "127.0.0.1:7007"
EOF
    case ${NATLAB_PORT_PREDICTION:-0} in *[!0-9]*|'') die "NATLAB_PORT_PREDICTION must be a number" ;; esac
    [ -z "${NATLAB_PORT_PREDICTION:-}" ] || sed -i "1i port_prediction = $NATLAB_PORT_PREDICTION" "$d/connector.toml"
    cat > "$d/agent.toml" <<EOF
relay = "$RELAY_IP:4433"
server_name = "relay.natlab"
ca = "$d/ca.pem"
cert = "$d/agent-laptop.pem"
key = "$d/agent-laptop.key"

[tun]
name = "zt0"
address = "100.64.0.1/32"
mtu = 1280

[[service]]
name = "echo"
cidrs = ["100.100.0.10/32"]
EOF
    [ -z "${NATLAB_PORT_PREDICTION:-}" ] || printf '\n[direct]\nport_prediction = %s\n' "$NATLAB_PORT_PREDICTION" >> "$d/agent.toml"
    in_ns relay "$bin/ztna-relay" --listen "$RELAY_IP:4433" --cert "$d/relay-relay.pem" --key "$d/relay-relay.key" \
        --client-ca "$d/ca.pem" --trust-domain lab.ztna --policy "$d/policy.toml" --workers 1 \
        </dev/null >"$d/relay.log" 2>&1 &
    echo $! > "$d/relay.pid"
    in_ns b "$bin/ztna-bench" echo --udp 127.0.0.1:7007 --tcp 127.0.0.1:7007 </dev/null >"$d/echo.log" 2>&1 &
    echo $! > "$d/echo.pid"
    wait_line "$d/relay.log" "^listening on" 10
    wait_line "$d/echo.log" "^echo udp" 10
    in_ns b "$bin/ztna-connector" --config "$d/connector.toml" </dev/null >"$d/connector.log" 2>&1 &
    echo $! > "$d/connector.pid"
    wait_line "$d/connector.log" "registered" 15
    in_ns a "$bin/ztna-agent" --config "$d/agent.toml" </dev/null >"$d/agent.log" 2>&1 &
    echo $! > "$d/agent.pid"
    wait_line "$d/agent.log" "^registered echo" 15
    local conn_obs agent_obs
    conn_obs=$(grep -m1 "observed address" "$d/connector.log" | sed 's/\x1b\[[0-9;]*m//g' | sed -n 's/.*observed=\([0-9.:]*\).*/\1/p')
    agent_obs=$(sed -n 's/^observed address //p' "$d/agent.log" | head -n 1)
    echo "connector (site b, 192.168.2.2:4434) observed by the relay as $conn_obs"
    echo "agent (site a) observed by the relay as $agent_obs"
    echo "try: natlab.sh exec a ping 100.100.0.10   (configs and logs in $d)"
}

cmd_ztna_stop() {
    local d=$STATE/ztna p pid
    for p in agent connector echo relay; do
        [ -f "$d/$p.pid" ] || continue
        pid=$(cat "$d/$p.pid")
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "$d/$p.pid"
    done
}

# What RESULTS.md's punch matrix (routers drop unsolicited WAN input)
# predicts for an agent behind TYPE_A (it probes first) and a connector
# behind TYPE_B (it punches one relay RTT later). A public host (none) is
# reachable from anyone and learns the other side's port as peer-reflexive.
p2p_expected() {
    local a=${1%%:*} b=${2%%:*}
    case "$a $b" in
        none\ *|*\ none) echo direct ;;
        full-cone\ *|restricted-cone\ *|*\ full-cone|*\ restricted-cone) echo direct ;;
        "port-restricted port-restricted"|"port-restricted double"|"double port-restricted"|"double double") echo direct ;;
        *) echo relay ;;
    esac
}

# p2p-matrix [--json FILE]: for each ordered pair, build the lab, start the
# relay, connector and agent, send 400 UDP echoes (10 ms apart) through the
# tunnel and see whether the agent reports a direct path within
# NATLAB_P2P_WAIT seconds (default 6). NATLAB_P2P_TYPES picks the types;
# NATLAB_PORT_PREDICTION=N turns port prediction on at both ends (pairs
# expected on the relay may then go either way: "either"). Prints a markdown table; with
# --json, one object per pair. Fails if a pair differs from the expectation
# or more than 5 % of the echoes are lost (traffic must not stop while
# punching).
cmd_p2p_matrix() {
    local json="" types ta tb d bin line ttd path exp sent got rows=() fails=0
    [ "${1:-}" != "--json" ] || json=${2:?--json FILE}
    read -ra types <<< "${NATLAB_P2P_TYPES:-$ALL_TYPES none}"
    check_env
    bin=$(ztna_bin_dir) || die "no ztna binaries (cargo build, or NATLAB_BIN=DIR)"
    d=$STATE/ztna
    for ta in "${types[@]}"; do
        for tb in "${types[@]}"; do
            NATLAB_QUIET=1 cmd_up "$ta" "$tb" >/dev/null
            NATLAB_QUIET=1 cmd_ztna_start >/dev/null
            in_ns a "$bin/ztna-bench" udp-probe --to 100.100.0.10:7 --count 400 --size 200 --interval-ms 10 \
                --wait-ms 1000 --min 0 </dev/null >"$d/probe.out" 2>&1 &
            local probe=$!
            line=""
            for _ in $(seq $((${NATLAB_P2P_WAIT:-6} * 10))); do
                line=$(grep -m1 "^path service=echo via=direct" "$d/agent.log" 2>/dev/null || true)
                [ -z "$line" ] || break
                sleep 0.1
            done
            wait "$probe" || true
            sent=$(sed -n 's/^udp-probe .*sent=\([0-9]*\).*/\1/p' "$d/probe.out")
            got=$(sed -n 's/^udp-probe .*received=\([0-9]*\).*/\1/p' "$d/probe.out")
            if [ -n "$line" ]; then path=direct ttd=${line##*time_to_direct_ms=}; else path=relay ttd=null; fi
            exp=$(p2p_expected "$(canon_type "$ta")" "$(canon_type "$tb")")
            # With port prediction on, a pair the matrix puts on the relay
            # may go either way: it is what is being measured.
            [ "${NATLAB_PORT_PREDICTION:-0}" = 0 ] || [ "$exp" = direct ] || exp=either
            local ok=yes
            [ "$path" = "$exp" ] || [ "$exp" = either ] || ok=no
            [ -n "$sent" ] && [ -n "$got" ] && [ $((got * 100)) -ge $((sent * 95)) ] || ok=no
            [ "$ok" = yes ] || fails=$((fails + 1))
            rows+=("$ta|$tb|$path|$exp|$ttd|${sent:-0}|${got:-0}|$ok")
            log "p2p $ta -> $tb: $path (expected $exp), time_to_direct_ms=$ttd, echoes ${got:-?}/${sent:-?}"
            cmd_ztna_stop
            cmd_down >/dev/null 2>&1 || true
        done
    done
    echo "| agent (a) | connector (b) | path | expected | time to direct (ms) | UDP echoes | ok |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    local r f
    for r in "${rows[@]}"; do
        IFS='|' read -ra f <<< "$r"
        echo "| ${f[0]} | ${f[1]} | ${f[2]} | ${f[3]} | ${f[4]/null/-} | ${f[6]}/${f[5]} | ${f[7]} |"
    done
    if [ -n "$json" ]; then
        printf '%s\n' "${rows[@]}" | "$PYTHON" -c '
import json, sys
out = []
for line in sys.stdin.read().split():
    a, b, path, exp, ttd, sent, got, ok = line.split("|")
    out.append({"a": a, "b": b, "path": path, "expected": exp,
                "time_to_direct_ms": None if ttd == "null" else int(ttd),
                "echo_sent": int(sent), "echo_received": int(got), "ok": ok == "yes"})
json.dump(out, open(sys.argv[1], "w"), indent=1)
' "$json"
    fi
    echo "p2p-matrix: $((${#rows[@]} - fails)) as expected, $fails not"
    [ "$fails" -eq 0 ]
}

check_env() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, nftables)"
    command -v ip >/dev/null || die "needs iproute2 (ip)"
    command -v nft >/dev/null || die "needs nftables (nft)"
    command -v "$PYTHON" >/dev/null || die "needs python3"
}

main() {
    [ $# -ge 1 ] || { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
    local cmd=$1; shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        status) cmd_status ;;
        exec) cmd_exec "$@" ;;
        shell) [ $# -eq 1 ] || die "usage: shell NODE"; cmd_exec "$1" "${SHELL:-/bin/bash}" ;;
        rules) [ $# -eq 1 ] || die "usage: rules NODE"; cmd_exec "$1" nft list ruleset ;;
        conntrack) [ $# -eq 1 ] || die "usage: conntrack NODE"; cmd_exec "$1" cat /proc/net/nf_conntrack ;;
        probe) cmd_probe "$@" ;;
        probe-all) cmd_probe_all "$@" ;;
        probe-site) cmd_probe_site "$@" ;;
        punch) cmd_punch "$@" ;;
        punch-matrix) cmd_punch_matrix ;;
        ztna-start) cmd_ztna_start ;;
        ztna-stop) cmd_ztna_stop ;;
        p2p-matrix) cmd_p2p_matrix "$@" ;;
        servers)
            lab_is_up || die "no lab is up"
            case ${1:-} in
                start) servers_start; log "probe servers on $S1_IP and $S2_IP, UDP $PORT1,$PORT2 (logs in $STATE)" ;;
                stop) servers_stop ;;
                *) die "usage: servers start|stop" ;;
            esac ;;
        -h|--help|help) main ;;
        *) die "unknown command '$cmd' (run without arguments for help)" ;;
    esac
}

main "$@"
