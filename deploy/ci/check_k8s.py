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

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

import yaml

from check_k8s_netpol import check_metrics_ingress

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "ci" / "schemas"
SECCOMP_FILE = K8S / "seccomp" / "ztna-relay.json"
SECCOMP_LOCALHOST = "profiles/ztna-relay.json"

RELAY = "ztna-relay"
RELAY_LB = "ztna-relay"
RELAY_HEADLESS = "ztna-relay-headless"
CONNECTOR = "ztna-connector"
NAMESPACE = "ztna"
QUIC_PORT = 4433
PLACEHOLDER_IMAGE = "ztna"
# Commands the image provides besides its own binaries (Debian slim).
IMAGE_TOOLS = {"/bin/sh", "sh", "sleep", "test"}

BINARIES = ("ztna-relay", "ztna-connector")


@dataclass
class Target:
    name: str
    arch: str
    seccomp: str  # "Localhost" or "RuntimeDefault"
    overlay: str  # directory under deploy/k8s
    components: list[str] = field(default_factory=list)  # extra components (variants)
    expect_kinds: set[str] = field(default_factory=set)


TARGETS = [
    Target("overlays/pi", "arm64", "Localhost", "overlays/pi",
           expect_kinds={"CiliumLoadBalancerIPPool", "CiliumL2AnnouncementPolicy", "DaemonSet"}),
    Target("overlays/cloud", "amd64", "Localhost", "overlays/cloud", expect_kinds={"DaemonSet"}),
    Target("overlays/cloud+portable+podmonitor+aws-nlb", "amd64", "RuntimeDefault", "overlays/cloud",
           ["components/portable", "components/podmonitor", "components/aws-nlb"],
           expect_kinds={"PodMonitor"}),
    Target("overlays/pi+portable+podmonitor", "arm64", "RuntimeDefault", "overlays/pi",
           ["components/portable", "components/podmonitor"], expect_kinds={"PodMonitor"}),
]


class Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.notes: list[str] = []

    def err(self, msg: str) -> None:
        self.errors.append(msg)

    def check(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.err(msg)
        return cond


# --------------------------------------------------------------------------
# Rendering


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


# --------------------------------------------------------------------------
# Rust config structs (the source of truth for TOML keys)


def rust_struct_fields(src: Path, struct: str) -> dict[str, str] | None:
    """Field name (after serde rename, without serde(skip)) -> Rust type."""
    if not src.exists():
        return None
    text = src.read_text()
    m = re.search(r"pub struct " + re.escape(struct) + r"\s*\{", text)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    body = text[m.end():i - 1]
    fields: dict[str, str] = {}
    attrs: list[str] = []
    for line in body.splitlines():
        s = line.strip()
        if s.startswith("#["):
            attrs.append(s)
            continue
        fm = re.match(r"pub\s+(\w+)\s*:\s*(.+?),?$", re.sub(r"\s*//.*$", "", s))
        if fm:
            name, ty = fm.group(1), fm.group(2)
            skip = any(re.search(r"serde\([^)]*\bskip\b", a) for a in attrs)
            for a in attrs:
                rm = re.search(r'rename\s*=\s*"([^"]+)"', a)
                if rm:
                    name = rm.group(1)
            if not skip:
                fields[name] = ty
            attrs = []
        elif s and not s.startswith("//"):
            attrs = []
    return fields


def host_port_ok(v: str) -> bool:
    """`host:port` as the connector accepts it (relays, backend targets)."""
    host, sep, port = v.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def socket_addr_ok(v: str) -> bool:
    """A Rust SocketAddr literal: `1.2.3.4:5` or `[::1]:5`, no names."""
    host, sep, port = v.rpartition(":")
    if not (sep and port.isdigit() and int(port) < 65536):
        return False
    try:
        if host.startswith("[") and host.endswith("]"):
            return ipaddress.ip_address(host[1:-1]).version == 6
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


UINTS = {"u8": 2**8, "u16": 2**16, "u32": 2**32, "u64": 2**64, "usize": 2**64}


def value_problem(ty: str, v) -> str | None:
    """Why TOML value v cannot deserialize into Rust type ty (None: fine or unknown type)."""
    ty = ty.replace(" ", "")
    m = re.fullmatch(r"(Option|Vec)<(.+)>", ty)
    if m and m.group(1) == "Option":
        return value_problem(m.group(2), v)
    if m:
        if not isinstance(v, list):
            return f"a list ({ty}) expected, got {v!r}"
        for x in v:
            why = value_problem(m.group(2), x)
            if why:
                return why
        return None
    if ty in ("String", "PathBuf"):
        return None if isinstance(v, str) else f"a string expected, got {v!r}"
    if ty == "bool":
        return None if isinstance(v, bool) else f"true or false expected, got {v!r}"
    if ty in UINTS:
        ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < UINTS[ty]
        return None if ok else f"an unsigned integer ({ty}) expected, got {v!r}"
    if ty == "SocketAddr":
        return None if isinstance(v, str) and socket_addr_ok(v) else f"an IP:port (no name) expected, got {v!r}"
    if ty == "Target":
        return None if isinstance(v, str) and host_port_ok(v) else f"a host:port expected, got {v!r}"
    return None  # enums and nested structs: keys are checked where they are tables


def check_keys(table: dict, struct: str, src: Path, where: str, pr: Problems) -> dict[str, str] | None:
    """Every key is a field of the Rust struct, and its value fits the field's type."""
    fields = rust_struct_fields(src, struct)
    if fields is None:
        pr.err(f"{struct} not found in {src.relative_to(ROOT)}: cannot check {where}")
        return None
    for k, v in table.items():
        if k not in fields:
            pr.err(f"{where}: unknown key `{k}` (not a field of {struct} in {src.relative_to(ROOT)}; "
                   "the binary rejects unknown keys)")
            continue
        why = value_problem(fields[k], v)
        if why:
            pr.err(f"{where}: `{k}` ({fields[k]}): {why}")
    return fields


def check_parser() -> list[str]:
    """The struct parser reads the fields this checker relies on, with their types."""
    conn = ROOT / "dataplane" / "src" / "connector" / "config.rs"
    relay = ROOT / "dataplane" / "src" / "relay.rs"
    want = [
        (conn, "ConnectorConfig", "relays", "Vec<String>"),
        (conn, "ConnectorConfig", "health", "Option<SocketAddr>"),
        (conn, "ConnectorConfig", "service", "Vec<ServiceConfig>"),
        (conn, "Backend", "target", "Target"),
        (relay, "RelayConfig", "metrics", "Option<SocketAddr>"),
        (relay, "RelayConfig", "shutdown_grace_ms", "u64"),
    ]
    out = []
    for src, struct, name, ty in want:
        got = (rust_struct_fields(src, struct) or {}).get(name)
        if got != ty:
            out.append(f"struct parser: {struct}.{name} read as {got!r} from {src.relative_to(ROOT)}, "
                       f"expected {ty!r} (did the source change shape?)")
    return out


# --------------------------------------------------------------------------
# The real binaries' `check-config`


def find_bin_dir() -> tuple[Path | None, str]:
    """A directory with this repository's ztna-relay and ztna-connector: (dir, "") or (None, why not)."""
    if os.environ.get("ZTNA_BIN_DIR"):
        dirs = [Path(os.environ["ZTNA_BIN_DIR"])]
    else:
        tops = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
        tops.append(ROOT / "target")
        dirs = [t / p for t in tops for p in ("debug", "release")]
    found = [d for d in dirs if all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in BINARIES)]
    if not found:
        return None, f"no {' and '.join(BINARIES)} in {', '.join(str(d) for d in dirs)}"
    # The newest build, when both exist.
    return max(found, key=lambda d: min((d / b).stat().st_mtime for b in BINARIES)), ""


class BinaryCheck:
    """Runs `ztna-relay check-config` and `ztna-connector check-config` on rendered configs."""

    def __init__(self, bindir: Path, workdir: Path) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.pki: dict[str, Path] = {}
        self.runs = 0

    def _run(self, args: list[str]) -> tuple[int, str]:
        env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0", RUST_LOG="error")
        p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=self.workdir)
        self.runs += 1
        lines = [x.strip() for x in (p.stderr + p.stdout).splitlines() if x.strip() not in ("", "|")]
        if "Stack backtrace:" in lines:
            lines = lines[:lines.index("Stack backtrace:")]
        return p.returncode, " | ".join(lines[-6:])

    def _ca(self, trust_domain: str) -> Path:
        """A throw-away CA and relay certificate for the trust domain (cached per run)."""
        if trust_domain not in self.pki:
            d = Path(tempfile.mkdtemp(prefix="pki-", dir=self.workdir))
            r = str(self.bindir / "ztna-relay")
            for args in (["ca", "init", "--dir", str(d), "--trust-domain", trust_domain],
                         ["ca", "issue", "--dir", str(d), "--trust-domain", trust_domain,
                          "--kind", "relay", "--name", "relay", "--dns", "relay.example.org"]):
                rc, out = self._run([r] + args)
                if rc != 0:
                    raise RuntimeError(f"ztna-relay {' '.join(args[:2])} failed: {out}")
            self.pki[trust_domain] = d
        return self.pki[trust_domain]

    @staticmethod
    def _with_config(args: list[str], path: Path) -> list[str]:
        out, skip = [], False
        for a in args:
            if skip:
                out.append(str(path))
                skip = False
            elif a == "--config":
                out.append(a)
                skip = True
            elif a.startswith("--config="):
                out.append(f"--config={path}")
            else:
                out.append(a)
        return out

    def relay(self, relay_text: str, relay_toml: dict, policy_text: str | None, args: list[str],
              cfg_path: str, pr: Problems) -> None:
        """The relay's files laid out under a temporary root: relay.toml, policy.toml, and
        a throw-away CA's certificate, key and CA in place of the Secret's files."""
        root = Path(tempfile.mkdtemp(prefix="relay-", dir=self.workdir))
        try:
            pki = self._ca(str(relay_toml.get("trust_domain") or "example.org"))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            pr.err(f"ztna-relay check-config: cannot make a test CA: {e}")
            return
        files = {"cert": pki / "relay-relay.pem", "key": pki / "relay-relay.key", "client_ca": pki / "ca.pem"}
        text = relay_text
        for key in ("cert", "key", "client_ca", "policy"):
            v = relay_toml.get(key)
            if not isinstance(v, str) or not v.startswith("/"):
                continue
            dest = root / v.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if key == "policy":
                if policy_text is None:
                    continue
                dest.write_text(policy_text)
            else:
                shutil.copyfile(files[key], dest)
            text = re.sub(r"""(["'])""" + re.escape(v) + r"\1", lambda m: m.group(1) + str(dest) + m.group(1), text)
        cfg = root / cfg_path.lstrip("/")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(text)
        cmd = [str(self.bindir / "ztna-relay"), "check-config"] + self._with_config(args, cfg)
        rc, out = self._run(cmd)
        if rc != 0:
            pr.err(f"ztna-relay check-config rejects the rendered relay.toml/policy.toml (args {args}): {out}")

    def connector(self, text: str, args: list[str], cfg_path: str, pr: Problems) -> None:
        """Format only: check-config resolves no names and reads no certificate."""
        root = Path(tempfile.mkdtemp(prefix="connector-", dir=self.workdir))
        cfg = root / cfg_path.lstrip("/")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(text)
        cmd = [str(self.bindir / "ztna-connector"), "check-config"] + self._with_config(args, cfg)
        rc, out = self._run(cmd)
        if rc != 0:
            pr.err(f"ztna-connector check-config rejects the rendered connector.toml (args {args}): {out}")


# --------------------------------------------------------------------------
# Helpers over rendered objects


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


# --------------------------------------------------------------------------
# The assertions


def check_rendered(docs: list[dict], t: Target, pr: Problems, bins: BinaryCheck | None = None) -> dict:
    facts: dict = {}
    kinds = {d.get("kind") for d in docs}
    for k in t.expect_kinds:
        pr.check(k in kinds, f"expected a {k} in the output")

    # No Secret objects: keys are created by the operator, never committed.
    for s in by_kind(docs, "Secret"):
        pr.err(f"Secret/{s['metadata']['name']} is rendered: certificates and keys must not be in the repository")

    relay = named(docs, "Deployment", RELAY)
    if not pr.check(relay is not None, f"no Deployment {RELAY}"):
        return facts
    rspec = pod_spec(relay)
    rlabels = pod_labels(relay)
    rc = rspec["containers"][0]

    # --- the public UDP LoadBalancer: externalTrafficPolicy Local, UDP/4433
    lb = named(docs, "Service", RELAY_LB)
    if pr.check(lb is not None, f"no Service {RELAY_LB}"):
        sp = lb["spec"]
        pr.check(sp.get("type") == "LoadBalancer", f"Service {RELAY_LB}: type {sp.get('type')} (want LoadBalancer)")
        etp = sp.get("externalTrafficPolicy", "Cluster")
        pr.check(etp == "Local",
                 f"Service {RELAY_LB}: externalTrafficPolicy {etp} (want Local: with Cluster nodes SNAT clients "
                 "to a node address, which breaks QUIC address discovery and hole punching)")
        pr.check(selects({"matchLabels": sp.get("selector") or {}}, rlabels) and bool(sp.get("selector")),
                 f"Service {RELAY_LB}: selector does not select the relay pods")
        ports = sp.get("ports") or []
        udp = [p for p in ports if p.get("protocol", "TCP") == "UDP" and p.get("port") == QUIC_PORT]
        pr.check(len(udp) == 1, f"Service {RELAY_LB}: needs exactly one UDP port {QUIC_PORT}")
        pr.check(all(p.get("protocol", "TCP") == "UDP" for p in ports),
                 f"Service {RELAY_LB}: exposes non-UDP ports {[p.get('port') for p in ports if p.get('protocol', 'TCP') != 'UDP']}")
        for p in udp:
            cp = port_of(rc, p.get("targetPort", p["port"]))
            pr.check(cp is not None and cp.get("protocol") == "UDP" and cp.get("containerPort") == QUIC_PORT,
                     f"Service {RELAY_LB}: targetPort {p.get('targetPort')} is not the relay's UDP {QUIC_PORT}")
        facts["etp"] = etp

    # Only the relay is exposed outside the cluster.
    for s in by_kind(docs, "Service"):
        if s["metadata"]["name"] != RELAY_LB:
            pr.check(s["spec"].get("type", "ClusterIP") == "ClusterIP",
                     f"Service/{s['metadata']['name']}: type {s['spec'].get('type')} exposes it outside the cluster")

    # The echo backend admits the connector only (NetworkPolicy).
    echo = named(docs, "Deployment", "ztna-echo")
    if echo is not None:
        conn_labels = pod_labels(named(docs, "Deployment", CONNECTOR) or {"spec": {"template": {"metadata": {}}}})
        pols = [p for p in by_kind(docs, "NetworkPolicy") if selects(p["spec"].get("podSelector"), pod_labels(echo))]
        ok = bool(pols) and all(
            all(r.get("from") and all(selects(f.get("podSelector"), conn_labels) for f in r["from"])
                for r in p["spec"].get("ingress") or []) for p in pols)
        pr.check(ok, "NetworkPolicy: the echo backend must admit ingress from the connector pods only")

    # The metrics/health ports admit the monitoring side only.
    facts["metrics_from"] = sorted({a.split(" from ", 1)[1] for a in check_metrics_ingress(docs, pr.err)})

    # --- the headless Service the connectors resolve
    hl = named(docs, "Service", RELAY_HEADLESS)
    if pr.check(hl is not None, f"no Service {RELAY_HEADLESS}"):
        sp = hl["spec"]
        pr.check(sp.get("clusterIP") == "None", f"Service {RELAY_HEADLESS}: clusterIP {sp.get('clusterIP')} (want None)")
        pr.check(sp.get("publishNotReadyAddresses", False) is False,
                 f"Service {RELAY_HEADLESS}: publishNotReadyAddresses must be false (draining relays must leave DNS)")
        pr.check(selects({"matchLabels": sp.get("selector") or {}}, rlabels) and bool(sp.get("selector")),
                 f"Service {RELAY_HEADLESS}: selector does not select the relay pods")
        pr.check(any(p.get("protocol") == "UDP" and p.get("port") == QUIC_PORT for p in sp.get("ports") or []),
                 f"Service {RELAY_HEADLESS}: no UDP port {QUIC_PORT}")

    # --- every workload: probes, resources, security context, image, arch
    images = set()
    for d in by_kind(docs, "Deployment") + by_kind(docs, "DaemonSet") + by_kind(docs, "StatefulSet"):
        wname = f"{d['kind']}/{d['metadata']['name']}"
        spec = pod_spec(d)
        is_deploy = d["kind"] == "Deployment"
        ns = d["metadata"].get("namespace")
        psc = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            pr.check(not spec.get(flag), f"{wname}: {flag} is set")
        if ns == NAMESPACE:
            for v in spec.get("volumes") or []:
                pr.check("hostPath" not in v, f"{wname}: hostPath volume {v['name']} in namespace {NAMESPACE}")
        if is_deploy:
            pr.check(psc.get("runAsNonRoot") is True, f"{wname}: pod securityContext.runAsNonRoot must be true")
            pr.check(psc.get("runAsUser", 1) != 0, f"{wname}: runs as uid 0")
            sel = spec.get("nodeSelector") or {}
            pr.check(sel.get("kubernetes.io/arch") == t.arch,
                     f"{wname}: nodeSelector kubernetes.io/arch={sel.get('kubernetes.io/arch')} (want {t.arch})")
        pprof = (psc.get("seccompProfile") or {}).get("type")
        pr.check(pprof in ("RuntimeDefault", "Localhost"), f"{wname}: pod seccompProfile {pprof} (want RuntimeDefault or Localhost)")
        for kind_, cs in (("container", spec.get("containers") or []), ("initContainer", spec.get("initContainers") or [])):
            for c in cs:
                cname = f"{wname} {kind_} {c['name']}"
                img = c.get("image", "")
                images.add(img)
                pr.check(img != PLACEHOLDER_IMAGE and ":" in img.rsplit("/", 1)[-1] or "@" in img,
                         f"{cname}: image {img!r} (the overlay's images: must set name and tag)")
                pr.check(not img.endswith(":latest"), f"{cname}: image tag latest")
                cmd = (c.get("command") or [None])[0]
                if cmd is not None:
                    facts.setdefault("commands", set()).add(cmd)
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        pr.check(r in (res.get(part) or {}), f"{cname}: resources.{part}.{r} missing")
                if kind_ == "container":
                    for probe in ("livenessProbe", "readinessProbe"):
                        pb = c.get(probe)
                        if pr.check(bool(pb), f"{cname}: no {probe}"):
                            ref = (pb.get("httpGet") or pb.get("tcpSocket") or {}).get("port")
                            if ref is not None:
                                pr.check(port_of(c, ref) is not None,
                                         f"{cname}: {probe} port {ref!r} is not a declared container port")
                sc = c.get("securityContext") or {}
                pr.check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation must be false")
                pr.check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: readOnlyRootFilesystem must be true")
                pr.check(not sc.get("privileged"), f"{cname}: privileged")
                caps = sc.get("capabilities") or {}
                pr.check("ALL" in (caps.get("drop") or []), f"{cname}: capabilities.drop must contain ALL")
                pr.check(not caps.get("add"), f"{cname}: adds capabilities {caps.get('add')}")
                cprof = (sc.get("seccompProfile") or {}).get("type")
                pr.check(cprof in (None, "RuntimeDefault", "Localhost"), f"{cname}: seccompProfile {cprof}")
                # Non-root everywhere, except a DaemonSet's init container
                # (the seccomp installer writes into a root-owned host dir).
                if is_deploy or kind_ == "container":
                    pr.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cname}: runAsNonRoot must be true")
                    pr.check(sc.get("runAsUser", psc.get("runAsUser")) != 0, f"{cname}: runs as uid 0")
    pr.check(len(images) == 1, f"one image for every container, found {sorted(images)}")
    facts["image"] = next(iter(images)) if len(images) == 1 else sorted(images)

    # --- the relay pod
    prof = (rspec.get("securityContext") or {}).get("seccompProfile") or {}
    facts["seccomp"] = prof.get("type")
    if pr.check(prof.get("type") == t.seccomp,
                f"Deployment/{RELAY}: seccompProfile {prof.get('type')} (want {t.seccomp} for {t.name})"):
        if t.seccomp == "Localhost":
            pr.check(prof.get("localhostProfile") == SECCOMP_LOCALHOST,
                     f"Deployment/{RELAY}: localhostProfile {prof.get('localhostProfile')} (want {SECCOMP_LOCALHOST})")
        else:
            pr.check("localhostProfile" not in prof, f"Deployment/{RELAY}: RuntimeDefault with a localhostProfile")
    for c in rspec["containers"]:
        cprof = ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        pr.check(cprof in (None, t.seccomp), f"Deployment/{RELAY} container {c['name']}: seccompProfile {cprof} overrides the pod's")
    installer = [d for d in by_kind(docs, "DaemonSet") if "seccomp" in d["metadata"]["name"]]
    for ds in installer:
        for v in pod_spec(ds).get("volumes") or []:
            if "configMap" in v:
                cm = named(docs, "ConfigMap", v["configMap"]["name"])
                if pr.check(cm is not None, f"DaemonSet/{ds['metadata']['name']}: ConfigMap {v['configMap']['name']} not rendered"):
                    pr.check((cm.get("data") or {}).get("ztna-relay.json") == SECCOMP_FILE.read_text(),
                             f"ConfigMap/{cm['metadata']['name']}: ztna-relay.json differs from {SECCOMP_FILE.relative_to(ROOT)}")
    pr.check(relay["spec"].get("replicas", 1) >= 2, f"Deployment/{RELAY}: replicas {relay['spec'].get('replicas', 1)} (want >= 2)")
    aff = ((rspec.get("affinity") or {}).get("podAntiAffinity") or {})
    terms = aff.get("requiredDuringSchedulingIgnoredDuringExecution") or [
        t_["podAffinityTerm"] for t_ in aff.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    pr.check(any(x.get("topologyKey") == "kubernetes.io/hostname" and selects(x.get("labelSelector"), rlabels) for x in terms),
             f"Deployment/{RELAY}: no pod anti-affinity on kubernetes.io/hostname against other relays")
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget") if selects(p["spec"].get("selector"), rlabels)]
    pr.check(len(pdbs) == 1 and int(pdbs[0]["spec"].get("minAvailable", 0)) >= 1,
             f"Deployment/{RELAY}: needs one PodDisruptionBudget with minAvailable >= 1")

    # Prometheus annotations point at the HTTP port.
    for dname in (RELAY, CONNECTOR):
        d = named(docs, "Deployment", dname)
        if d is None:
            continue
        ann = d["spec"]["template"]["metadata"].get("annotations") or {}
        c = pod_spec(d)["containers"][0]
        pr.check(ann.get("prometheus.io/scrape") == "true", f"Deployment/{dname}: prometheus.io/scrape annotation")
        hp = port_of(c, "http")
        pr.check(hp is not None and ann.get("prometheus.io/port") == str(hp.get("containerPort")),
                 f"Deployment/{dname}: prometheus.io/port {ann.get('prometheus.io/port')} is not the `http` port")

    # --- relay.toml as the relay sees it
    args = rc.get("args") or []
    cfg_path = args[args.index("--config") + 1] if "--config" in args else None
    relay_toml = relay_text = None
    if pr.check(cfg_path is not None, f"Deployment/{RELAY}: no --config argument"):
        cm_name, relay_text = configmap_file(docs, rspec, rc, cfg_path)
        if pr.check(relay_text is not None, f"Deployment/{RELAY}: {cfg_path} is not a rendered ConfigMap file"):
            try:
                relay_toml = tomllib.loads(relay_text)
            except tomllib.TOMLDecodeError as e:
                pr.err(f"ConfigMap/{cm_name}: relay.toml: {e}")
    if relay_toml is not None:
        src = ROOT / "dataplane" / "src" / "relay.rs"
        check_keys(relay_toml, "RelayConfig", src, "relay.toml", pr)
        check_keys(relay_toml.get("limits") or {}, "LimitsConfig", src, "relay.toml [limits]", pr)
        grace_ms = relay_toml.get("shutdown_grace_ms")
        tgps = rspec.get("terminationGracePeriodSeconds", 30)
        if pr.check(isinstance(grace_ms, int), "relay.toml: set shutdown_grace_ms explicitly (the drain time)"):
            pr.check(tgps > grace_ms / 1000,
                     f"Deployment/{RELAY}: terminationGracePeriodSeconds {tgps} must exceed shutdown_grace_ms/1000 = "
                     f"{grace_ms / 1000:g} (else the kubelet SIGKILLs a draining relay)")
            facts["grace"] = (tgps, grace_ms / 1000)
        m = relay_toml.get("metrics")
        if pr.check(bool(m), "relay.toml: `metrics` (HTTP /healthz, /readyz, /metrics) must be set for the probes"):
            hp = port_of(rc, "http")
            pr.check(hp is not None and host_port(m)[1] == hp.get("containerPort"),
                     f"relay.toml: metrics {m} is not the relay's `http` container port")
            pr.check(host_port(m)[0] not in ("127.0.0.1", "::1", "localhost"),
                     f"relay.toml: metrics {m} listens on loopback only; the kubelet probes the pod IP")
        lp = host_port(relay_toml.get("listen", f"[::]:{QUIC_PORT}"))[1]
        pr.check(lp == QUIC_PORT, f"relay.toml: listen port {lp} is not the container's UDP {QUIC_PORT}")
        pr.check(not relay_toml.get("dev"), "relay.toml: dev = true (ephemeral CA) in a deployment")
        # Every replica of the Deployment (and the surge pod of a rollout) reads this one file
        # and shares the Secret's key: a node_id here would be the same on all of them, and
        # replicas with the same node id and key reset each other's connections.
        pr.check("node_id" not in relay_toml and not any(a.startswith("--node-id") for a in args),
                 f"Deployment/{RELAY}: node_id/--node-id in the shared config gives every replica the same CID "
                 "node id, so they reset each other's connections (leave it unset: random per start)")
        for key in ("cert", "key", "client_ca"):
            p = relay_toml.get(key)
            if pr.check(bool(p), f"relay.toml: `{key}` missing"):
                v = mounted_from(rspec, rc, p)
                pr.check(v is not None and "secret" in v, f"relay.toml: {key} {p} is not on a Secret volume")
        pol = relay_toml.get("policy")
        policy_text = None
        if pr.check(bool(pol), "relay.toml: no policy (default deny: nothing could register)"):
            cm_name, policy_text = configmap_file(docs, rspec, rc, pol)
            if pr.check(policy_text is not None, f"relay.toml: policy {pol} is not a rendered ConfigMap file"):
                try:
                    tomllib.loads(policy_text)
                except tomllib.TOMLDecodeError as e:
                    pr.err(f"ConfigMap/{cm_name}: policy.toml: {e}")
        if bins is not None:
            bins.relay(relay_text, relay_toml, policy_text, args, cfg_path, pr)
        wargs = [a for a in args if a.startswith("--workers")]
        workers = relay_toml.get("workers")
        if wargs:
            w = wargs[-1].split("=", 1)[1] if "=" in wargs[-1] else args[args.index(wargs[-1]) + 1]
            workers = int(w)
        lim = ((rc.get("resources") or {}).get("limits") or {}).get("cpu")
        if workers is not None and lim is not None:
            pr.check(workers <= cpu_cores(lim) + 1e-9,
                     f"Deployment/{RELAY}: {workers} workers but a CPU limit of {lim} (throttled worker threads)")
        facts["workers"] = workers if workers is not None else f"auto (cpu limit {lim})"

    # --- connector.toml as the connector sees it
    conn = named(docs, "Deployment", CONNECTOR)
    if pr.check(conn is not None, f"no Deployment {CONNECTOR}"):
        cspec = pod_spec(conn)
        cc = cspec["containers"][0]
        cargs = cc.get("args") or []
        ccfg = cargs[cargs.index("--config") + 1] if "--config" in cargs[:-1] else None
        text = None
        if pr.check(ccfg is not None, f"Deployment/{CONNECTOR}: no --config argument"):
            _, text = configmap_file(docs, cspec, cc, ccfg)
            pr.check(text is not None, f"Deployment/{CONNECTOR}: {ccfg} is not a rendered ConfigMap file")
        ct = None
        if text is not None:
            try:
                ct = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                pr.err(f"connector.toml: {e}")
        if ct is not None:
            src = ROOT / "dataplane" / "src" / "connector" / "config.rs"
            check_keys(ct, "ConnectorConfig", src, "connector.toml", pr)
            services = [s for s in ct.get("service") or [] if isinstance(s, dict)]
            pr.check(bool(services), "connector.toml: no [[service]]")
            for s in services:
                check_keys(s, "ServiceConfig", src, f"connector.toml service {s.get('name')}", pr)
                for b in s.get("backend") or []:
                    where = f"connector.toml service {s.get('name')} backend {b.get('target')}"
                    check_keys(b, "Backend", src, where, pr)
                    check_backend_service(docs, b, where, pr)
            relays = ct.get("relays") or []
            pr.check(bool(relays), "connector.toml: no relays")
            want = f"{RELAY_HEADLESS}.{NAMESPACE}.svc.cluster.local:{QUIC_PORT}"
            pr.check(want in relays, f"connector.toml: relays {relays} should contain {want} (every relay pod)")
            h = ct.get("health")
            if pr.check(bool(h), "connector.toml: `health` (HTTP /healthz, /readyz) must be set for the probes"):
                hp = port_of(cc, "http")
                pr.check(hp is not None and socket_addr_ok(str(h)) and host_port(h)[1] == hp.get("containerPort"),
                         f"connector.toml: health {h} is not the connector's `http` container port")
                pr.check(socket_addr_ok(str(h)) and host_port(h)[0] not in ("127.0.0.1", "::1"),
                         f"connector.toml: health {h} listens on loopback only; the kubelet probes the pod IP")
            pr.check(not ct.get("insecure"), "connector.toml: insecure = true")
            for key in ("cert", "key", "ca"):
                p = ct.get(key)
                if pr.check(isinstance(p, str) and bool(p), f"connector.toml: `{key}` missing"):
                    v = mounted_from(cspec, cc, p)
                    pr.check(v is not None and "secret" in v, f"connector.toml: {key} {p} is not on a Secret volume")
            if bins is not None:
                bins.connector(text, cargs, ccfg, pr)

    # --- Cilium L2: announce only from nodes that run a relay, from the pool
    pools = by_kind(docs, "CiliumLoadBalancerIPPool")
    pols = by_kind(docs, "CiliumL2AnnouncementPolicy")
    if pools or pols:
        lbl = (lb or {}).get("metadata", {}).get("labels", {})
        pr.check(any(selects(p["spec"].get("serviceSelector"), lbl) for p in pools),
                 f"no CiliumLoadBalancerIPPool selects Service {RELAY_LB}")
        for pol in pols:
            pr.check(selects(pol["spec"].get("serviceSelector"), lbl),
                     f"CiliumL2AnnouncementPolicy/{pol['metadata']['name']} does not select Service {RELAY_LB}")
            nsel = (pol["spec"].get("nodeSelector") or {}).get("matchLabels") or {}
            rsel = rspec.get("nodeSelector") or {}
            pr.check(bool(nsel) and all(rsel.get(k) == v for k, v in nsel.items()),
                     f"CiliumL2AnnouncementPolicy/{pol['metadata']['name']}: nodeSelector {nsel} must also confine "
                     f"the relay pods (relay nodeSelector {rsel}); with externalTrafficPolicy Local an announcing "
                     "node without a relay drops the traffic")
        want_ip = ((lb or {}).get("metadata", {}).get("annotations") or {}).get("lbipam.cilium.io/ips")
        nets = []
        for p in pools:
            for b in p["spec"].get("blocks") or []:
                try:
                    if "cidr" in b:
                        nets.append(ipaddress.ip_network(b["cidr"], strict=True))
                    else:
                        nets.append((ipaddress.ip_address(b["start"]), ipaddress.ip_address(b.get("stop", b["start"]))))
                except ValueError as e:
                    pr.err(f"CiliumLoadBalancerIPPool/{p['metadata']['name']}: {e}")
        if want_ip:
            for ip_s in want_ip.split(","):
                ip = ipaddress.ip_address(ip_s.strip())
                pr.check(any(ip in n if not isinstance(n, tuple) else n[0] <= ip <= n[1] for n in nets),
                         f"Service {RELAY_LB}: lbipam.cilium.io/ips {ip} is outside every pool block")

    # --- PodMonitor scrapes named ports the pods have
    for pm in by_kind(docs, "PodMonitor"):
        for ep in pm["spec"].get("podMetricsEndpoints") or []:
            for d in by_kind(docs, "Deployment"):
                if selects(pm["spec"].get("selector"), pod_labels(d)):
                    pr.check(any(port_of(c, ep.get("port")) for c in pod_spec(d)["containers"]),
                             f"PodMonitor/{pm['metadata']['name']}: Deployment/{d['metadata']['name']} has no port {ep.get('port')!r}")
    return facts


def check_seccomp_file(pr: Problems) -> None:
    try:
        p = json.loads(SECCOMP_FILE.read_text())
    except (OSError, json.JSONDecodeError) as e:
        pr.err(f"{SECCOMP_FILE.relative_to(ROOT)}: {e}")
        return
    pr.check(p.get("defaultAction") in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"),
             f"seccomp profile: defaultAction {p.get('defaultAction')} (want deny by default)")
    allowed = set()
    for s in p.get("syscalls", []):
        if s.get("action") == "SCMP_ACT_ALLOW":
            allowed.update(s.get("names", []))
        pr.check(set(s) <= {"names", "action", "args", "errnoRet", "comment"}, f"seccomp profile: unexpected keys {set(s)}")
    need = {"io_uring_setup", "io_uring_enter", "io_uring_register",  # the point of the profile
            "read", "write", "openat", "close", "mmap", "munmap", "mprotect", "brk", "futex", "clone", "execve",
            "exit_group", "rt_sigaction", "rt_sigprocmask", "epoll_wait", "epoll_pwait", "epoll_ctl", "eventfd2",
            "socket", "bind", "setsockopt", "getsockopt", "sendmmsg", "recvmmsg", "sendmsg", "recvmsg", "sendto",
            "recvfrom", "getrandom", "sched_getaffinity", "prctl", "sigaltstack", "set_robust_list", "rseq",
            "clock_gettime", "accept4", "listen", "fcntl", "ioctl", "newfstatat", "statx", "madvise", "gettid"}
    missing = sorted(need - allowed)
    pr.check(not missing, f"seccomp profile: does not allow {missing}")
    arches = set(p.get("architectures") or [])
    pr.check({"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"} <= arches, f"seccomp profile: architectures {sorted(arches)}")


def check_dockerfile(commands: set, pr: Problems) -> None:
    df = ROOT / "deploy" / "docker" / "Dockerfile"
    if not pr.check(df.exists(), "deploy/docker/Dockerfile missing"):
        return
    text = df.read_text()
    pr.check("--platform=$BUILDPLATFORM" in text, "Dockerfile: the builder must run on $BUILDPLATFORM (cross-compile)")
    pr.check(re.search(r"^USER 65532", text, re.M) is not None, "Dockerfile: runtime USER 65532 missing")
    for c in commands:
        if c in IMAGE_TOOLS:
            continue
        pr.check(re.search(r"\b" + re.escape(c) + r"\b", text) is not None,
                 f"Dockerfile: manifests run {c!r}, which the image does not install")


# --------------------------------------------------------------------------
# Driver


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


def self_test(kustomize, k8s_version: str, crds, workdir: Path, bins: BinaryCheck | None) -> list[str]:
    """Each broken variant must be rejected. Returns failures of the test."""
    failures = []
    base_t = TARGETS[0]

    # 1. Source level: a copy of deploy/k8s with externalTrafficPolicy Cluster.
    copy_dir = workdir / "k8s-copy"
    shutil.copytree(K8S, copy_dir)
    relay_yaml = copy_dir / "base" / "relay.yaml"
    src = relay_yaml.read_text()
    broken = src.replace("externalTrafficPolicy: Local", "externalTrafficPolicy: Cluster")
    if broken == src:
        failures.append("self-test: could not find `externalTrafficPolicy: Local` in base/relay.yaml to break")
    else:
        relay_yaml.write_text(broken)
        pr, _, _ = run_target(kustomize, copy_dir, base_t, k8s_version, crds, workdir)
        if not any("externalTrafficPolicy Cluster" in e for e in pr.errors):
            failures.append("self-test: externalTrafficPolicy Cluster in a source copy was NOT caught")

    # 2. Rendered level: mutate objects of the real render.
    docs = [d for d in yaml.safe_load_all(render(kustomize, K8S, base_t, workdir)) if d]

    def dep(ds, name):
        return next(d for d in ds if d["kind"] == "Deployment" and d["metadata"]["name"] == name)

    def cm_for(ds, prefix):
        return next(d for d in ds if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix))

    def set_relay_toml(ds, f):
        cm = cm_for(ds, "ztna-relay-config")
        cm["data"]["relay.toml"] = f(cm["data"]["relay.toml"])

    def set_connector_toml(ds, f):
        cm = cm_for(ds, "ztna-connector-config")
        cm["data"]["connector.toml"] = f(cm["data"]["connector.toml"])

    def svc(ds, name):
        return next(d for d in ds if d["kind"] == "Service" and d["metadata"]["name"] == name)

    def netpol(ds, name):
        return next(d for d in ds if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)

    mutations = [
        ("headless Service with a cluster IP", "clusterIP",
         lambda ds: next(d for d in ds if d["metadata"]["name"] == RELAY_HEADLESS)["spec"].__setitem__("clusterIP", "10.0.0.9")),
        ("LB Service on TCP", "exactly one UDP port",
         lambda ds: next(d for d in ds if d["kind"] == "Service" and d["metadata"]["name"] == RELAY_LB)["spec"]["ports"][0].__setitem__("protocol", "TCP")),
        ("connector without readinessProbe", "no readinessProbe",
         lambda ds: pod_spec(dep(ds, CONNECTOR))["containers"][0].pop("readinessProbe")),
        ("echo without resource limits", "resources.limits",
         lambda ds: pod_spec(dep(ds, "ztna-echo"))["containers"][0]["resources"].pop("limits")),
        ("drain longer than the grace period", "terminationGracePeriodSeconds",
         lambda ds: set_relay_toml(ds, lambda s: s.replace("shutdown_grace_ms = 20000", "shutdown_grace_ms = 45000"))),
        ("one node_id for every replica", "gives every replica the same CID node id",
         lambda ds: set_relay_toml(ds, lambda s: s.replace("\n[limits]", "\nnode_id = 3\n\n[limits]", 1))),
        ("unknown relay.toml key", "unknown key `listen_address`",
         lambda ds: set_relay_toml(ds, lambda s: s.replace('listen = "', 'listen_address = "'))),
        ("relay seccomp Unconfined", "seccompProfile Unconfined",
         lambda ds: pod_spec(dep(ds, RELAY))["securityContext"].__setitem__("seccompProfile", {"type": "Unconfined"})),
        ("relay as root with NET_ADMIN", "adds capabilities",
         lambda ds: pod_spec(dep(ds, RELAY))["containers"][0]["securityContext"]["capabilities"].__setitem__("add", ["NET_ADMIN"])),
        ("wrong architecture", "kubernetes.io/arch",
         lambda ds: pod_spec(dep(ds, RELAY)).__setitem__("nodeSelector", {"kubernetes.io/arch": "amd64"})),
        ("misspelt field (strict schema)", "readinessProbes",
         lambda ds: pod_spec(dep(ds, "ztna-echo"))["containers"][0].__setitem__("readinessProbes", {})),
        ("CRD field typo", "bloks",
         lambda ds: next(d for d in ds if d["kind"] == "CiliumLoadBalancerIPPool")["spec"].__setitem__("bloks", [])),
        ("L2 announcers not confined to relay nodes", "must also confine",
         lambda ds: next(d for d in ds if d["kind"] == "CiliumL2AnnouncementPolicy")["spec"].pop("nodeSelector")),
        ("echo Service exposed as NodePort", "exposes it outside the cluster",
         lambda ds: next(d for d in ds if d["kind"] == "Service" and d["metadata"]["name"] == "ztna-echo")["spec"].__setitem__("type", "NodePort")),
        ("echo open to every pod", "admit ingress from the connector pods only",
         lambda ds: next(d for d in ds if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "ztna-echo")["spec"]["ingress"][0].pop("from")),
        ("metrics port open to every source", "from everywhere (no `from`)",
         lambda ds: netpol(ds, "ztna-metrics")["spec"]["ingress"][0].pop("from")),
        ("metrics port open to every namespace", "admits every namespace",
         lambda ds: netpol(ds, "ztna-metrics")["spec"]["ingress"][0]["from"][0].__setitem__("namespaceSelector", {})),
        ("relay admitting every port from anywhere", "from everywhere (no `from`)",
         lambda ds: netpol(ds, RELAY)["spec"]["ingress"].append({})),
        ("connector metrics port to 0.0.0.0/0", "admits everyone",
         lambda ds: netpol(ds, "ztna-metrics")["spec"]["ingress"].append(
             {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 9091}]})),
        ("metrics policy gone", "no NetworkPolicy admits the monitoring namespace",
         lambda ds: ds.remove(netpol(ds, "ztna-metrics"))),
        ("a committed Secret", "must not be in the repository",
         lambda ds: ds.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ztna-relay-tls", "namespace": NAMESPACE},
                               "stringData": {"relay.key": "x"}})),
        ("unknown connector.toml key", "unknown key `listen_addr`",
         lambda ds: set_connector_toml(ds, lambda s: s.replace('listen = "', 'listen_addr = "'))),
        ("connector health as a bare port", "`health` (Option<SocketAddr>)",
         lambda ds: set_connector_toml(ds, lambda s: s.replace('health = "0.0.0.0:9091"', 'health = "9091"'))),
        ("backend target without a port", "a host:port expected",
         lambda ds: set_connector_toml(ds, lambda s: s.replace(".svc.cluster.local:7007", ".svc.cluster.local"))),
        ("backend Service renamed", "no Service ztna-echo in namespace ztna",
         lambda ds: svc(ds, "ztna-echo")["metadata"].__setitem__("name", "echo")),
        ("backend Service without the UDP port", "has no UDP port 7007",
         lambda ds: svc(ds, "ztna-echo")["spec"].__setitem__(
             "ports", [p for p in svc(ds, "ztna-echo")["spec"]["ports"] if p["protocol"] != "UDP"])),
        ("connector config not mounted", "is not a rendered ConfigMap file",
         lambda ds: pod_spec(dep(ds, CONNECTOR))["containers"][0].__setitem__(
             "args", ["--config", "/run/ztna/connector.toml"])),
    ]
    if bins is not None:
        # Only the binaries know these: values the Python checks cannot judge.
        mutations += [
            ("relay io_backend no backend has", "ztna-relay check-config rejects",
             lambda ds: set_relay_toml(ds, lambda s: s.replace('io_backend = "auto"', 'io_backend = "fast"'))),
            ("policy naming a connector by SPIFFE ID of another trust domain", "ztna-relay check-config rejects",
             lambda ds: next(d for d in ds if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ztna-policy"))
             ["data"].__setitem__("policy.toml", "[services.echo]\nconnectors = [\"spiffe://other.org/connector/x\"]\n")),
            ("connector tcp_buffer_bytes out of range", "ztna-connector check-config rejects",
             lambda ds: set_connector_toml(ds, lambda s: s.replace("max_tcp_connections = 512",
                                                                  "max_tcp_connections = 512\ntcp_buffer_bytes = 1024"))),
            ("unknown relay argument", "ztna-relay check-config rejects",
             lambda ds: pod_spec(dep(ds, RELAY))["containers"][0]["args"].append("--bogus-flag")),
        ]
    caught = 0
    for what, expect, mutate in mutations:
        ds = copy.deepcopy(docs)
        mutate(ds)
        pr = Problems()
        validate_schemas(ds, k8s_version, pr, crds)
        check_rendered(ds, base_t, pr, bins)
        if any(expect in e for e in pr.errors):
            caught += 1
        else:
            failures.append(f"self-test: {what} was NOT caught (expected an error containing {expect!r}; got {pr.errors[:3]})")
    # 3. The unmodified render passes (the checks are not simply always failing).
    pr = Problems()
    validate_schemas(docs, k8s_version, pr, crds)
    check_rendered(docs, base_t, pr, bins)
    if pr.errors:
        failures.append(f"self-test: the unmodified render fails: {pr.errors[:3]}")
    self_test.caught = caught + 1  # type: ignore[attr-defined]
    return failures


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
