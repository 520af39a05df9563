#!/usr/bin/env bash
# Quick start, command 2: install prerequisites, then the whole test suite:
# formatting, clippy with warnings denied, and every test of the workspace
# (unit, property, and integration tests against real relays on 127.0.0.1
# with both I/O backends), then a bounded fuzzing run of every parser a peer
# reaches (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# Dependencies point down (ARCHITECTURE.md, "Crates and what each may import").
./scripts/check-deps.sh
# The C API test links the static library (ztna-agent-sys), and the
# network-namespace tests (agent-linux/tests/netns/, run as root) start the
# Linux agent (ztna-agent-linux), ztna-relay, ztna-connector and ztna-bench
# from the target directory: build them explicitly.
cargo build -p ztna-agent-sys -p ztna-agent-linux
cargo build --workspace --bins
# Deployment material, validated offline (deploy/README.md): Kubernetes
# overlays rendered and schema-checked, systemd units, Terraform and
# cloud-init, Prometheus rules and the Grafana dashboard against a live
# relay, and the NAT lab's classification of each NAT type.
./deploy/ci/check-k8s.sh
./deploy/ci/check-ops.sh
./deploy/ci/check-nat-lab.sh
# Direct paths through every ordered pair of NAT types, with the real agent,
# connector and relay (docs/protocol/direct.md, deploy/nat-lab/README.md).
./deploy/ci/check-p2p-matrix.sh
cargo test --workspace
# The Raspberry Pi binaries must keep building: cross-compile for aarch64
# (build only, plus a --version/--check smoke run under qemu-user).
./deploy/cross/build-aarch64.sh --no-dist --smoke
# Coverage-guided fuzzing (fuzz/README.md): replay the committed seed corpus
# and crash regressions, then 20 s of fuzzing per target; any crash fails.
./scripts/fuzz.sh 20
