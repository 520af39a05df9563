#!/usr/bin/env bash
# Print the nftables ruleset of one NAT router of the lab.
#
#   nat-rules.sh TYPE WAN_IF
#
# The network-namespace lab (natlab.sh) and the Docker routers
# (docker/router.sh) both load this script's output with `nft -f -`, so the
# two labs always run the same rules.
#
# TYPE (RFC 4787 terms; "mapping" = how the public ip:port is chosen,
# "filtering" = which inbound packets reach the client):
#   full-cone        endpoint-independent mapping, endpoint-independent filtering
#   restricted-cone  endpoint-independent mapping, address-dependent filtering
#   port-restricted  endpoint-independent mapping, address-and-port-dependent filtering
#   symmetric        address-and-port-dependent mapping (and filtering)
#
# Environment:
#   NATLAB_WAN_INPUT=drop|accept   what the router does with an unsolicited
#       packet to its own WAN address (default drop, like a home router's
#       firewall). "accept" leaves it to the stack (ICMP port unreachable) and
#       lets conntrack confirm an entry for it; see RESULTS.md for why that
#       matters to hole punching.
#   NATLAB_SYMMETRIC_FLAGS   masquerade flags of the symmetric type
#       (default "random,fully-random"; try "random" or "fully-random").
#   NATLAB_SYMMETRIC_PORTS   LO-HI: the symmetric type maps into this port
#       block only (like a carrier-grade NAT with port-block allocation;
#       default: the whole range). Port prediction can cover a small block.
#   NATLAB_MAP_TIMEOUT   lifetime of an idle full-cone/restricted-cone
#       mapping in the dynamic sets (default 120s, the kernel's assured UDP
#       conntrack timeout; refreshed by every outbound packet).
set -euo pipefail

usage() { echo "usage: $0 full-cone|restricted-cone|port-restricted|symmetric WAN_IF" >&2; exit 2; }
[ $# -eq 2 ] || usage
type=$1 wan=$2
wan_input=${NATLAB_WAN_INPUT:-drop}
sym_flags=${NATLAB_SYMMETRIC_FLAGS:-random,fully-random}
sym_ports=${NATLAB_SYMMETRIC_PORTS:-}
map_timeout=${NATLAB_MAP_TIMEOUT:-120s}
case $wan_input in drop|accept) ;; *) echo "NATLAB_WAN_INPUT must be drop or accept" >&2; exit 2 ;; esac
case $wan in *[!A-Za-z0-9_.-]*|'') echo "bad interface name: $wan" >&2; exit 2 ;; esac
case $sym_flags in *[!a-z,-]*) echo "bad NATLAB_SYMMETRIC_FLAGS: $sym_flags" >&2; exit 2 ;; esac
if [ -n "$sym_ports" ]; then
    lo=${sym_ports%%-*} hi=${sym_ports#*-}
    case "$lo$hi" in *[!0-9]*|'') echo "bad NATLAB_SYMMETRIC_PORTS: $sym_ports (LO-HI)" >&2; exit 2 ;; esac
    [ "$lo" -ge 1024 ] && [ "$lo" -le "$hi" ] && [ "$hi" -le 65535 ] ||
        { echo "bad NATLAB_SYMMETRIC_PORTS: $sym_ports (1024 <= LO <= HI <= 65535)" >&2; exit 2; }
fi

# Masquerade, the source NAT of every type. Without flags Linux keeps the
# client's source port whenever the resulting tuple is unique (port
# preservation), which makes the mapping endpoint-independent in practice.
case $type in
    full-cone|restricted-cone|port-restricted) masq="masquerade" ;;
    symmetric) masq="masquerade $sym_flags" ;;
    *) usage ;;
esac

cat <<EOF
# natlab NAT router: $type (WAN $wan)
table ip natlab
delete table ip natlab
table ip natlab {
EOF

if [ "$type" = full-cone ] || [ "$type" = restricted-cone ]; then
    cat <<EOF
    # Mappings learnt from outbound packets after source NAT:
    # public (mapped) port -> client address . client port.
    map mapping {
        type inet_service : ipv4_addr . inet_service
        flags timeout
        timeout $map_timeout
    }
EOF
fi
if [ "$type" = restricted-cone ]; then
    cat <<EOF
    # Remote addresses each mapping has sent to: mapped port . remote address.
    set contacted {
        type inet_service . ipv4_addr
        flags timeout
        timeout $map_timeout
    }
EOF
fi

cat <<EOF
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
EOF
case $type in
    full-cone) cat <<EOF
        # Endpoint-independent filtering: a new inbound flow to a mapped port
        # goes to the client, whoever sends it.
        iifname "$wan" meta l4proto udp dnat ip addr . port to udp dport map @mapping
EOF
    ;;
    restricted-cone) cat <<EOF
        # Address-dependent filtering: only from an address this mapping has
        # sent to (any port of it).
        iifname "$wan" meta l4proto udp udp dport . ip saddr @contacted dnat ip addr . port to udp dport map @mapping
EOF
    ;;
esac
cat <<EOF
    }

    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
EOF
# A port block applies to UDP and TCP (ports need a transport match); the
# rest (ICMP) is masqueraded as before.
[ -z "$sym_ports" ] || [ "$type" != symmetric ] ||
    echo "        oifname \"$wan\" meta l4proto { tcp, udp } masquerade to :$sym_ports $sym_flags"
cat <<EOF
        oifname "$wan" $masq
    }
EOF

if [ "$type" = full-cone ] || [ "$type" = restricted-cone ]; then
    # Priority 200 runs after source NAT (100): udp sport is the mapped port.
    # Flows that came in through the dnat above have "ct status dnat", not
    # snat, and do not re-learn (their reply already leaves by the mapping).
    cat <<EOF

    chain learn {
        type filter hook postrouting priority 200; policy accept;
        oifname "$wan" meta l4proto udp ct status snat update @mapping { udp sport : ct original ip saddr . ct original proto-src }
EOF
    if [ "$type" = restricted-cone ]; then
        cat <<EOF
        oifname "$wan" meta l4proto udp ct status snat update @contacted { udp sport . ip daddr }
EOF
    fi
    echo "    }"
fi

cat <<EOF

    # The router's firewall: the LAN may go out, only replies and the
    # inbound flows the NAT type forwards may come in.
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname != "$wan" accept
        iifname "$wan" ct status dnat accept
    }

    chain input {
        type filter hook input priority filter; policy accept;
        iifname "$wan" ct state established,related accept
        iifname "$wan" icmp type echo-request accept
EOF
if [ "$wan_input" = drop ]; then
    echo "        iifname \"$wan\" drop"
fi
cat <<EOF
    }
}
EOF
