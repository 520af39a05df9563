#!/usr/bin/env python3
"""Offline checks of the ZTNA Kubernetes material (deploy/k8s).

Run through deploy/ci/check-k8s.sh, which finds a Kustomize v5 and a Python
with PyYAML, jsonschema and kubernetes-validate. For every target (the two
overlays, plus variants with the optional components) it

  1. renders the kustomization (`kubectl kustomize` or `kustomize build`);
  2. validates every object offline: built-in kinds against the Kubernetes
     JSON schemas bundled in kubernetes-validate (strict: unknown fields are
     errors), custom resources against deploy/ci/schemas/*.json, any other
     kind is an error;
  3. asserts what the data plane needs (see `check_rendered`): the relay's
     UDP LoadBalancer with externalTrafficPolicy Local, the headless Service,
     probes and resources on every container, non-root and no capabilities,
     the seccomp profile, the nodes' architecture, the drain time against
     terminationGracePeriodSeconds, the TOML configs against the Rust config
     structs (keys and value types), backend Service names against the
     rendered Services, and more;
  4. when this repository's ztna-relay and ztna-connector are built
     (target/debug or target/release; $ZTNA_BIN_DIR or $CARGO_TARGET_DIR
     override), runs their `check-config` on the rendered relay.toml (with
     policy.toml and a throw-away CA in place of the Secret) and
     connector.toml, with the containers' own arguments. Skipped with a note
     when they are not built.

Then a self-test breaks things on purpose (one edit of a copy of the source
tree, and several edits of rendered objects) and requires each to be caught.

Quiet on success: one line per target and one for the self-test.
"""

# The checks live in deploy/ci/k8s_checks/, one module per concern; this file is the entry point
# (its docstring is the --help text).

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from k8s_checks.binaries import BinaryCheck, find_bin_dir
from k8s_checks.common import K8S, QUIC_PORT, TARGETS, Problems
from k8s_checks.files import check_dockerfile, check_seccomp_file
from k8s_checks.render import crd_schemas
from k8s_checks.run import run_target
from k8s_checks.rust_config import check_parser
from k8s_checks.selftest import self_test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kustomize", required=True, help="command that renders a directory, e.g. 'kubectl kustomize'")
    ap.add_argument("--k8s-version", default="1.30.0")
    ap.add_argument("--no-self-test", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    kustomize = a.kustomize.split()
    crds = crd_schemas()
    failed = False
    pr0 = Problems()
    pr0.errors += check_parser()
    check_seccomp_file(pr0)
    commands: set = set()
    bindir, why_not = find_bin_dir()
    with tempfile.TemporaryDirectory(prefix="ztna-k8s-check-") as tmp:
        workdir = Path(tmp)
        bins = BinaryCheck(bindir, workdir) if bindir else None
        notes: list[str] = []
        for t in TARGETS:
            pr, facts, n = run_target(kustomize, K8S, t, a.k8s_version, crds, workdir, bins)
            commands |= facts.get("commands", set())
            notes += [x for x in pr.notes if x not in notes]
            if pr.errors:
                failed = True
                print(f"FAIL {t.name}:")
                for e in pr.errors:
                    print(f"     - {e}")
            else:
                b, c = facts["counts"]
                tg, gr = facts.get("grace", ("?", "?"))
                print(f"ok   {t.name}: {n} objects valid (k8s {a.k8s_version}: {b}, CRD schemas: {c}); "
                      f"relay LB UDP/{QUIC_PORT} ETP={facts.get('etp')}, seccomp={facts.get('seccomp')}, "
                      f"arch={t.arch}, workers={facts.get('workers')}, grace {tg}s > drain {gr:g}s; "
                      f"image {facts.get('image')}; metrics/health ports from {'; '.join(facts.get('metrics_from', []))}")
        if bins is not None:
            if not failed:
                print(f"ok   check-config: {bins.runs} runs of {bindir}/ztna-relay and ztna-connector accept the "
                      "rendered relay.toml + policy.toml (throw-away CA) and connector.toml of every target")
        elif os.environ.get("ZTNA_BIN_DIR"):
            failed = True
            print(f"FAIL check-config: ZTNA_BIN_DIR is set, but {why_not}")
        else:
            print(f"skip check-config: {why_not}; build first (cargo build --workspace --bins) "
                  "to have the binaries check the rendered configs too")
        check_dockerfile(commands, pr0)
        if pr0.errors:
            failed = True
            print("FAIL struct parser / seccomp profile / Dockerfile:")
            for e in pr0.errors:
                print(f"     - {e}")
        for x in notes:
            print(f"note {x}")
        if not a.no_self_test:
            fails = self_test(kustomize, a.k8s_version, crds, workdir, bins)
            if fails:
                failed = True
                print("FAIL self-test:")
                for f in fails:
                    print(f"     - {f}")
            else:
                print(f"ok   self-test: {self_test.caught} deliberately broken variants rejected, unmodified render accepted")  # type: ignore[attr-defined]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
