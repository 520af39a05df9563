#!/usr/bin/env bash
# Cross-compiles the ZTNA binaries for 64-bit ARM Linux (Raspberry Pi 3/4/5
# on a 64-bit OS) on an x86_64 Debian 12 host, without Docker.
#
#   deploy/cross/build-aarch64.sh [--no-install] [--smoke] [--no-dist]
#
#   --no-install  do not apt-get / rustup anything; fail if a tool is missing
#   --smoke       afterwards run `ztna-relay --version` and `ztna-tune check`
#                 under qemu-aarch64 (installs qemu-user unless --no-install)
#   --no-dist     do not copy the binaries to dist/aarch64/ (where they are
#                 stripped of debug info: ~7 MB instead of ~50 MB each)
#
# Environment: CARGO_TARGET_DIR (default: target/ of the checkout),
# CARGO_BUILD_JOBS, ZTNA_CROSS_VERBOSE=1 for cargo's full output.
# Output: $CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/{ztna-relay,
# ztna-connector,ztna-agent,ztna-tune,ztna-bench} (with debug info), and
# stripped copies in dist/aarch64/.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail

TARGET=aarch64-unknown-linux-gnu
TRIPLE=aarch64-linux-gnu
SYSROOT=/usr/$TRIPLE
BINS=(ztna-relay ztna-connector ztna-agent ztna-tune ztna-bench)

install=1 smoke=0 dist=1
for a in "$@"; do
    case "$a" in
        --no-install) install=0 ;;
        --smoke) smoke=1 ;;
        --no-dist) dist=0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-aarch64.sh: unknown argument $a (try --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
say() { echo "build-aarch64: $*"; }
die() { echo "build-aarch64: error: $*" >&2; exit 1; }

# --- host packages -----------------------------------------------------------
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}

# Installs the Debian packages of "$@" that are not installed yet.
apt_ensure() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$install" -eq 1 ] || die "missing Debian packages: ${missing[*]} (run without --no-install)"
    command -v apt-get >/dev/null || die "no apt-get; install the equivalent of: ${missing[*]}"
    say "installing ${missing[*]}"
    local log
    log=$(mktemp)
    if ! as_root env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes sh -c \
        'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"' sh "${missing[@]}" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$log"
}

# cmake builds BoringSSL (boring-sys); clang/libclang-dev serve bindgen;
# git applies boring-sys's patches; file checks the result.
apt_ensure gcc-$TRIPLE g++-$TRIPLE libc6-dev-arm64-cross cmake clang libclang-dev git file make perl

command -v cargo >/dev/null || die "cargo not found (install Rust with rustup first)"
if ! rustc --print target-libdir --target $TARGET >/dev/null 2>&1 ||
    [ ! -d "$(rustc --print target-libdir --target $TARGET)" ]; then
    [ "$install" -eq 1 ] || die "Rust target $TARGET missing (rustup target add $TARGET)"
    command -v rustup >/dev/null || die "Rust target $TARGET missing and no rustup to add it"
    say "rustup target add $TARGET"
    rustup target add $TARGET >/dev/null
fi

# --- toolchain environment ---------------------------------------------------
# Rust links with the cross gcc; the cc crate (and through it the cmake crate)
# compiles C/C++ with it.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# boring-sys builds BoringSSL with CMake. With a toolchain file it adds no
# cross flags of its own (and the cmake crate no compilers), so ours names
# compilers, system and find root.
export CMAKE_TOOLCHAIN_FILE_aarch64_unknown_linux_gnu=$ROOT/deploy/cross/aarch64-linux-gnu.cmake
# bindgen (boring-sys's BoringSSL bindings) runs libclang with
# --target=aarch64-unknown-linux-gnu; point it at the cross libc's headers.
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=$SYSROOT"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$CARGO_TARGET_DIR/$TARGET/release

# --- build -------------------------------------------------------------------
quiet=(--quiet)
[ "${ZTNA_CROSS_VERBOSE:-0}" = 1 ] && quiet=()
bin_args=()
for b in "${BINS[@]}"; do bin_args+=(--bin "$b"); done
say "cargo build --release --target $TARGET (${BINS[*]}) into $CARGO_TARGET_DIR"
start=$(date +%s)
cargo build "${quiet[@]}" --locked --release --target $TARGET \
    -p ztna-relay -p ztna-connector -p ztna-agent-linux -p ztna-tuning -p ztna-bench "${bin_args[@]}"
say "built in $(($(date +%s) - start)) s"

# --- verify ------------------------------------------------------------------
for b in "${BINS[@]}"; do
    f=$OUT/$b
    [ -x "$f" ] || die "$f was not built"
    desc=$(file -b "$f")
    case "$desc" in
        "ELF 64-bit LSB"*"ARM aarch64"*) ;;
        *) die "$f is not an aarch64 ELF: $desc" ;;
    esac
    say "ok $b: ${desc%%, BuildID*}"
done

if [ "$dist" -eq 1 ]; then
    mkdir -p dist/aarch64
    for b in "${BINS[@]}"; do aarch64-linux-gnu-strip --strip-debug -o "dist/aarch64/$b" "$OUT/$b"; done
    say "stripped copies in $ROOT/dist/aarch64/ ($(du -sh dist/aarch64 | cut -f1) in all)"
fi

# --- optional smoke test under user-mode QEMU --------------------------------
if [ "$smoke" -eq 1 ]; then
    apt_ensure qemu-user
    qemu=(qemu-aarch64 -L "$SYSROOT")
    v=$("${qemu[@]}" "$OUT/ztna-relay" --version) || die "ztna-relay --version failed under qemu"
    say "qemu: $v"
    fake=$(mktemp -d)
    trap 'rm -rf "$fake"' EXIT
    mkdir -p "$fake/proc/sys/net/core" "$fake/proc/sys/kernel"
    echo 212992 >"$fake/proc/sys/net/core/rmem_max"
    echo 0 >"$fake/proc/sys/kernel/io_uring_disabled"
    mkdir -p "$fake/sys/class/net/eth0/device" "$fake/sys/class/net/eth0/queues/rx-0"
    echo 0 >"$fake/sys/class/net/eth0/queues/rx-0/rps_cpus"
    printf '      CPU0   CPU1\n 27:  50000  10  GICv2 189 Level  eth0\n' >"$fake/proc/interrupts"
    report=$("${qemu[@]}" "$OUT/ztna-tune" check --profile pi --root "$fake") ||
        die "ztna-tune check failed under qemu"
    grep -q "^WARN net/core/rmem_max" <<<"$report" && grep -q "^WARN eth0 interrupts: CPU0 takes 99%" <<<"$report" ||
        die "unexpected ztna-tune report under qemu: $report"
    say "qemu: ztna-tune check --profile pi on a fake root ran ($(grep -c '^WARN' <<<"$report") warnings)"
fi
