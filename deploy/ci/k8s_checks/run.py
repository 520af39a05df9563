"""One target: render, validate, assert."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from k8s_checks.binaries import BinaryCheck
from k8s_checks.common import Problems, Target
from k8s_checks.render import render, validate_schemas
from k8s_checks.rendered import check_rendered


def run_target(kustomize, k8s_dir: Path, t: Target, k8s_version: str, crds, workdir: Path,
               bins: BinaryCheck | None = None) -> tuple[Problems, dict, int]:
    pr = Problems()
    try:
        out = render(kustomize, k8s_dir, t, workdir)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pr.err(str(e))
        return pr, {}, 0
    docs = [d for d in yaml.safe_load_all(out) if d]
    b, c = validate_schemas(docs, k8s_version, pr, crds)
    facts = check_rendered(docs, t, pr, bins)
    facts["counts"] = (b, c)
    return pr, facts, len(docs)
