#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test the
# project: cmake + clang/libclang (BoringSSL via boring-sys), pkg-config,
# iproute2, nftables/iptables and ping (network-namespace tests), and checks for a
# Rust toolchain new enough for quiche (>= 1.88). Idempotent; uses sudo
# when not root.
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

for p in build-essential cmake clang libclang-dev pkg-config iproute2 nftables iptables iputils-ping procps; do
  have_pkg "$p" || need+=("$p")
done

if [ ${#need[@]} -gt 0 ]; then
  if ! have_cmd apt-get; then
    echo "install-deps: missing ${need[*]} and no apt-get; install them by hand" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "install-deps: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! have_cmd cargo; then
  # Debian 13+/Ubuntu 24.04+ package rustup; older releases need rustup.rs.
  if have_cmd apt-get && apt-cache show rustup >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rustup >/dev/null
    rustup default stable
  else
    echo "install-deps: no Rust toolchain; install one from https://rustup.rs (stable >= 1.88)" >&2
    exit 1
  fi
fi
for comp in clippy rustfmt; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done
