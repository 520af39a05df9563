#!/usr/bin/env bash
# Quick start, command 2: install prerequisites, then the whole test suite:
# formatting, clippy with warnings denied, and every test of the workspace
# (unit, property, and integration tests against real relays on 127.0.0.1
# with both I/O backends).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The C API test links the static library; build it explicitly.
cargo build -p ztna-agent-sys
cargo test --workspace
