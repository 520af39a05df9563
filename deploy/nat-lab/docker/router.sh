#!/bin/sh
# Entrypoint of a NAT router container of the Docker lab.
#
#   router.sh NAT_TYPE WAN_ADDR [DEFAULT_VIA]
#
# Finds the interface that holds WAN_ADDR (Docker does not promise which of
# eth0/eth1 is which network), points the default route at DEFAULT_VIA when
# given (the inner router of a double NAT), and loads the ruleset that
# nat-rules.sh prints: the same rules as the network-namespace lab.
# Needs cap_add NET_ADMIN and the sysctl net.ipv4.ip_forward=1.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 NAT_TYPE WAN_ADDR [DEFAULT_VIA]" >&2; exit 2; }
type=$1 wan_addr=$2 via=${3:-}
wan_if=$(ip -o -4 addr show | awk -v a="$wan_addr" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }')
[ -n "$wan_if" ] || { echo "router: no interface holds $wan_addr" >&2; ip -o -4 addr show >&2; exit 1; }
[ -z "$via" ] || ip route replace default via "$via"
[ "$(cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || { echo "router: set sysctl net.ipv4.ip_forward=1" >&2; exit 1; }
/natlab/nat-rules.sh "$type" "$wan_if" | nft -f -
echo "router: $type on $wan_if ($wan_addr)"
nft list ruleset
exec sleep infinity
