"""Rendering the kustomizations and validating the objects against schemas."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import yaml

from k8s_checks.common import SCHEMAS, Problems, Target


def render(kustomize: list[str], k8s_dir: Path, t: Target, workdir: Path) -> str:
    path = k8s_dir / t.overlay
    if t.components:
        # A throw-away overlay on top of the real one, with extra components.
        # Kustomize loads other kustomization directories (not files) from
        # outside a kustomization's root, by relative path only.
        d = Path(tempfile.mkdtemp(prefix="variant-", dir=workdir))
        (d / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(path, d)],
            "components": [os.path.relpath(k8s_dir / c, d) for c in t.components],
        }))
        path = d
    p = subprocess.run(kustomize + [str(path)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"kustomize failed for {t.name}:\n{p.stderr.strip()}")
    return p.stdout


# --------------------------------------------------------------------------
# Schema validation


def crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for f in sorted(SCHEMAS.glob("*.json")):
        s = json.loads(f.read_text())
        props = s["properties"]
        out[(props["apiVersion"]["const"], props["kind"]["const"])] = s
    return out


def validate_schemas(docs: list[dict], k8s_version: str, pr: Problems, crds: dict) -> tuple[int, int]:
    import jsonschema
    import kubernetes_validate as kv

    builtin = custom = 0
    for d in docs:
        key = (d.get("apiVersion", ""), d.get("kind", ""))
        name = f"{key[1]}/{d.get('metadata', {}).get('name')}"
        if key in crds:
            v = jsonschema.Draft7Validator(crds[key])
            for e in sorted(v.iter_errors(d), key=lambda e: list(e.absolute_path)):
                path = "/".join(str(p) for p in e.absolute_path)
                pr.err(f"{name}: schema ({key[0]}): {path}: {e.message}")
            custom += 1
            continue
        try:
            kv.validate(d, k8s_version, strict=True)
            builtin += 1
        except kv.SchemaNotFoundError:
            pr.err(f"{name}: no schema for {key[0]} {key[1]} (add one under deploy/ci/schemas/)")
        except kv.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            pr.err(f"{name}: schema (Kubernetes {k8s_version}): {path}: {e.message}")
    return builtin, custom
