#!/bin/sh
# Renders a config template: every @dns:NAME@ outside comment lines becomes
# NAME's first IPv4 address (getent, i.e. the pod's resolver). Fails, and so makes the kubelet
# retry the init container, while a name does not resolve yet.
# Usage: render-config.sh TEMPLATE OUTPUT
set -eu
in=$1
out=$2
tmp="$out.tmp"
trap 'rm -f "$tmp" "$tmp.2"' EXIT
cp "$in" "$tmp"
for name in $(grep -v '^[[:space:]]*#' "$in" | grep -o '@dns:[^@]*@' | sed 's/^@dns:\(.*\)@$/\1/' | sort -u); do
    ip=$(getent ahostsv4 "$name" | head -n 1 | cut -d ' ' -f 1)
    if [ -z "$ip" ]; then
        echo "render-config: cannot resolve $name" >&2
        exit 1
    fi
    sed "s|@dns:$name@|$ip|g" "$tmp" > "$tmp.2"
    mv "$tmp.2" "$tmp"
    echo "render-config: $name -> $ip"
done
mv "$tmp" "$out"
