#!/usr/bin/env bash
# Quick start, command 1: install prerequisites, build, run the demo
# (an in-process relay with 2 workers, an echo connector and agents on
# loopback; no root needed for the demo itself).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release -p ztna-bench -p ztna-relay -p ztna-connector
exec ./target/release/ztna-bench demo "$@"
