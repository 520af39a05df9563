"""Helpers over rendered objects."""

from __future__ import annotations

import re

from k8s_checks.common import Problems
from k8s_checks.rust_config import host_port_ok


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[dict], kind: str, name: str) -> dict | None:
    for d in by_kind(docs, kind):
        if d["metadata"]["name"] == name:
            return d
    return None


def selects(selector: dict | None, labels: dict) -> bool:
    """Label selector (matchLabels and matchExpressions) semantics."""
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def pod_spec(d: dict) -> dict:
    return d["spec"]["template"]["spec"]


def pod_labels(d: dict) -> dict:
    return d["spec"]["template"]["metadata"].get("labels", {})


def port_of(container: dict, ref) -> dict | None:
    for p in container.get("ports") or []:
        if ref == p.get("name") or ref == p.get("containerPort"):
            return p
    return None


def cpu_cores(q: str) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def configmap_file(docs: list[dict], spec: dict, container: dict, mount_path: str) -> tuple[str | None, str | None]:
    """(configmap name, file text) of the file a container sees at mount_path."""
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"]
        v = vols.get(m["name"], {})
        if "configMap" not in v:
            continue
        cm = named(docs, "ConfigMap", v["configMap"]["name"])
        if cm is None:
            continue
        if m.get("subPath") and mp == mount_path:
            return cm["metadata"]["name"], cm.get("data", {}).get(m["subPath"])
        if not m.get("subPath") and mount_path.startswith(mp.rstrip("/") + "/"):
            key = mount_path[len(mp.rstrip("/")) + 1:]
            return cm["metadata"]["name"], cm.get("data", {}).get(key)
    return None, None


def mounted_from(spec: dict, container: dict, path: str) -> dict | None:
    """The volume a file path of the container lives on."""
    vols = {v["name"]: v for v in spec.get("volumes") or []}
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, vols.get(m["name"]))
    return best[1] if best else None


def host_port(addr: str) -> tuple[str, int]:
    h, _, p = addr.rpartition(":")
    return h.strip("[]"), int(p)


def check_backend_service(docs: list[dict], backend: dict, where: str, pr: Problems) -> None:
    """A backend target naming an in-cluster Service must name a rendered Service
    with that port and protocol (else the connector cannot start, or forwards nowhere)."""
    target = backend.get("target")
    if not isinstance(target, str) or not host_port_ok(target):
        return
    host, port = host_port(target)
    m = re.fullmatch(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?\.?", host)
    if not m:
        return
    name, ns = m.group(1), m.group(3)
    svc = next((d for d in by_kind(docs, "Service")
                if d["metadata"]["name"] == name and d["metadata"].get("namespace") == ns), None)
    if not pr.check(svc is not None, f"{where}: no Service {name} in namespace {ns} is rendered"):
        return
    proto = str(backend.get("protocol", "")).upper()
    pr.check(any(p.get("port") == port and p.get("protocol", "TCP") == proto for p in svc["spec"].get("ports") or []),
             f"{where}: Service {ns}/{name} has no {proto} port {port}")
