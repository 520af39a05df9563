#!/usr/bin/env bash
# Builds ZtnaAgent.xcframework (static library + header) for a macOS/iOS
# packet-tunnel extension. Runs on macOS with Xcode and rustup only; it
# cannot run on the Linux CI machine (no Apple SDKs there).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname)" = "Darwin" ] || { echo "build-xcframework.sh needs macOS with Xcode" >&2; exit 1; }

targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
rustup target add "${targets[@]}"
for t in "${targets[@]}"; do
  cargo build --release -p ztna-agent-sys --lib --target "$t"
done

out=target/apple
rm -rf "$out" && mkdir -p "$out/headers" "$out/ios-sim" "$out/macos"
cp include/ztna_agent.h "$out/headers/"
cat > "$out/headers/module.modulemap" <<'MAP'
module ZtnaAgent {
    header "ztna_agent.h"
    link "ztna_agent"
    link "c++"
    export *
}
MAP
T=../target
lipo -create "$T/aarch64-apple-ios-sim/release/libztna_agent.a" "$T/x86_64-apple-ios/release/libztna_agent.a" \
  -output "$out/ios-sim/libztna_agent.a"
lipo -create "$T/aarch64-apple-darwin/release/libztna_agent.a" "$T/x86_64-apple-darwin/release/libztna_agent.a" \
  -output "$out/macos/libztna_agent.a"
xcodebuild -create-xcframework \
  -library "$T/aarch64-apple-ios/release/libztna_agent.a" -headers "$out/headers" \
  -library "$out/ios-sim/libztna_agent.a" -headers "$out/headers" \
  -library "$out/macos/libztna_agent.a" -headers "$out/headers" \
  -output "$out/ZtnaAgent.xcframework"
echo "built $out/ZtnaAgent.xcframework"
