#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser a peer reaches (see fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
#
# Builds every fuzz target once (cargo-fuzz, libFuzzer + AddressSanitizer,
# optimised but with debug assertions and overflow checks, so an integer
# overflow in a parser is a crash rather than a silent wrap; on the stable
# toolchain through RUSTC_BOOTSTRAP=1, since cargo-fuzz passes -Z flags),
# then for each target:
#   1. replays the committed seed corpus fuzz/corpus/<target>/ and the crash
#      regressions fuzz/regressions/<target>/ once (-runs=0), so every known
#      crash is re-checked even when no fuzzing time is left;
#   2. fuzzes for SECONDS_PER_TARGET over a scratch copy of the corpus (new
#      inputs go to the copy: the committed corpus does not grow in CI), with
#      the regressions as extra seeds.
# Runs every target even after a failure; exits non-zero if any crashed,
# naming the crashing input (kept in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
export RUSTC_BOOTSTRAP=1
# What `cargo fuzz run` sets: BoringSSL trips ASan's ODR check.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

start=$(date +%s)
(cd fuzz && cargo fuzz build -O --debug-assertions)
built=$(date +%s)
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin="fuzz/target/$triple/release"

# Largest input per target: a few frames, packets or records.
max_len() {
  case "$1" in
    datagram) echo 2048 ;;
    control_frames | config_files | peer_identity | retry_token) echo 4096 ;;
    *) echo 8192 ;;
  esac
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()

report() { # target log phase
  failed+=("$1")
  echo "fuzz: $1 FAILED during $3" >&2
  grep -E "panicked at|ERROR: |SUMMARY: " "$2" | head -n 5 >&2 || true
  local input
  input="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p; s/^Running: \(.*\)$/\1/p' "$2" | tail -n 1)"
  local same=""
  if [ -n "$input" ] && [ -f "$input" ]; then
    for f in "fuzz/regressions/$1"/* "fuzz/corpus/$1"/*; do
      if [ -f "$f" ] && cmp -s "$input" "$f"; then same=" (same bytes as $f)"; break; fi
    done
  fi
  echo "fuzz: crashing input: ${input:-see $2}$same" >&2
  echo "fuzz: reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a $1 ../${input:-<input>})" >&2
}

for t in $(cd fuzz && cargo fuzz list); do
  art="fuzz/artifacts/$t/"
  mkdir -p "$art" "$work/$t"
  seeds=("fuzz/corpus/$t")
  if [ -d "fuzz/regressions/$t" ]; then seeds+=("fuzz/regressions/$t"); fi
  common=(-rss_limit_mb=2048 -timeout=30 -artifact_prefix="$art" -print_final_stats=1)

  log="$work/$t.replay.log"
  if ! "$bin/$t" "${common[@]}" -runs=0 "${seeds[@]}" >"$log" 2>&1; then
    report "$t" "$log" "replay of the corpus and regressions"
    cp "$log" "$art/replay.log"
    continue
  fi

  cp -R "fuzz/corpus/$t/." "$work/$t/"
  log="$work/$t.fuzz.log"
  if ! "$bin/$t" "${common[@]}" -max_len="$(max_len "$t")" -max_total_time="$secs" \
    "$work/$t" "${seeds[@]:1}" >"$log" 2>&1; then
    report "$t" "$log" "fuzzing"
    cp "$log" "$art/fuzz.log"
    continue
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
  cov="$(sed -n 's/^#[0-9]*[[:space:]]*DONE .*cov: \([0-9]*\).*/\1/p' "$log")"
  echo "fuzz: $t ok: ${runs:-?} runs in ${secs}s (${rate:-?} exec/s), coverage ${cov:-?} edges, corpus $(ls "fuzz/corpus/$t" | wc -l) -> $(ls "$work/$t" | wc -l)"
done

end=$(date +%s)
echo "fuzz: build $((built - start))s, fuzzing $((end - built))s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
