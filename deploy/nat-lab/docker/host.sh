#!/bin/sh
# Entrypoint of a client container of the Docker lab: route everything via
# the site's NAT router instead of Docker's gateway, then run CMD (or idle,
# for `docker compose exec`).
#
#   host.sh ROUTER_ADDR [CMD...]
set -eu
[ $# -ge 1 ] || { echo "usage: $0 ROUTER_ADDR [CMD...]" >&2; exit 2; }
gw=$1
shift
ip route replace default via "$gw"
if [ $# -gt 0 ]; then exec "$@"; fi
exec sleep infinity
