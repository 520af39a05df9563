"""The self-test: things broken on purpose must be caught."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

from k8s_checks.binaries import BinaryCheck
from k8s_checks.common import CONNECTOR, K8S, NAMESPACE, RELAY, RELAY_HEADLESS, RELAY_LB, TARGETS, Problems
from k8s_checks.objects import pod_spec
from k8s_checks.render import render, validate_schemas
from k8s_checks.rendered import check_rendered
from k8s_checks.run import run_target


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
