"""NetworkPolicy checks of the rendered manifests, used by check_k8s.py
(k8s_checks/rendered.py).

The relay's and the connector's metrics/health port (the container port
named `http`) must not be reachable from everywhere: every ingress rule of
every NetworkPolicy selecting their pods that admits that port must name its
peers, and each peer must be the monitoring side: a non-empty
namespaceSelector that does not select the workload's own namespace (with or
without a podSelector), or an ipBlock narrower than /8 (an NLB's VPC). A pod
selected by no ingress policy is open to all, and so is a rule without
`from`. Kubelet probes come from the node, which Cilium and Calico admit
regardless, so they need no rule.
"""

from __future__ import annotations

import ipaddress

WORKLOADS = ("ztna-relay", "ztna-connector")
HTTP_PORT_NAME = "http"
# An ipBlock this wide (or wider) counts as everyone.
WIDEST_PREFIX = 8


def selector_matches(sel: dict | None, labels: dict) -> bool:
    """NetworkPolicy label selector semantics: an empty selector selects everything."""
    sel = sel or {}
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if (op == "In" and labels.get(k) not in vals) or (op == "NotIn" and labels.get(k) in vals) \
                or (op == "Exists" and k not in labels) or (op == "DoesNotExist" and k in labels):
            return False
    return True


def isolates_ingress(policy: dict) -> bool:
    types = policy["spec"].get("policyTypes")
    # Without policyTypes, Ingress is always implied.
    return types is None or "Ingress" in types


def admits_port(rule: dict, number: int, name: str | None, protocol: str = "TCP") -> bool:
    ports = rule.get("ports")
    if not ports:
        return True  # no ports: every port
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        port = p.get("port")
        if port is None or port == number or (name is not None and port == name):
            return True
        end = p.get("endPort")
        if isinstance(port, int) and isinstance(end, int) and port <= number <= end:
            return True
    return False


def peer_problem(peer: dict, own_ns_labels: dict) -> str | None:
    """Why a `from` peer is not the monitoring side (None: it is)."""
    if "ipBlock" in peer:
        cidr = (peer["ipBlock"] or {}).get("cidr", "")
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            return f"ipBlock {cidr!r} is not a CIDR"
        if net.prefixlen < WIDEST_PREFIX:
            return f"ipBlock {cidr} admits everyone (prefix shorter than /{WIDEST_PREFIX})"
        return None
    ns = peer.get("namespaceSelector")
    if ns is None:
        return "a peer without namespaceSelector admits the workload's own namespace, not the monitoring side"
    if not (ns.get("matchLabels") or ns.get("matchExpressions")):
        return "namespaceSelector {} admits every namespace"
    if selector_matches(ns, own_ns_labels):
        return f"namespaceSelector {ns} selects the workload's own namespace"
    return None


def describe(peer: dict) -> str:
    if "ipBlock" in peer:
        return f"ipBlock {(peer['ipBlock'] or {}).get('cidr')}"
    parts = []
    for key in ("namespaceSelector", "podSelector"):
        sel = peer.get(key)
        if sel is not None:
            labels = ",".join(f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()) or str(sel)
            parts.append(f"{key.replace('Selector', '')} {labels}")
    return " + ".join(parts)


def check_metrics_ingress(docs: list[dict], err) -> list[str]:
    """Calls err(msg) for every way a workload's metrics port is open too wide.
    Returns descriptions of what is admitted, for the summary line."""
    ns_labels = {}
    for d in docs:
        if d.get("kind") == "Namespace":
            name = d["metadata"]["name"]
            ns_labels[name] = dict(d["metadata"].get("labels") or {}, **{"kubernetes.io/metadata.name": name})
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    workload_ns = {d["metadata"].get("namespace") for d in docs
                   if d.get("kind") == "Deployment" and d["metadata"]["name"] in WORKLOADS}
    for p in policies:
        if p["metadata"].get("namespace") not in workload_ns:
            err(f"NetworkPolicy/{p['metadata']['name']}: namespace {p['metadata'].get('namespace')!r} is not the "
                f"workloads' ({', '.join(sorted(str(n) for n in workload_ns))}); it would guard nothing of theirs")
    admitted: list[str] = []
    for d in docs:
        if d.get("kind") != "Deployment" or d["metadata"]["name"] not in WORKLOADS:
            continue
        wname = f"Deployment/{d['metadata']['name']}"
        ns = d["metadata"].get("namespace", "default")
        own = ns_labels.get(ns, {"kubernetes.io/metadata.name": ns})
        labels = d["spec"]["template"]["metadata"].get("labels") or {}
        containers = d["spec"]["template"]["spec"].get("containers") or []
        http = next((p for c in containers for p in c.get("ports") or [] if p.get("name") == HTTP_PORT_NAME), None)
        if http is None:
            err(f"{wname}: no container port named {HTTP_PORT_NAME!r} (the metrics/health port)")
            continue
        number, proto = http.get("containerPort"), http.get("protocol", "TCP")
        mine = [p for p in policies if p["metadata"].get("namespace", "default") == ns
                and selector_matches(p["spec"].get("podSelector"), labels) and isolates_ingress(p)]
        if not mine:
            err(f"{wname}: no NetworkPolicy isolates its ingress: metrics port {number} is open from everywhere")
            continue
        from_monitoring = []
        for p in mine:
            for i, rule in enumerate(p["spec"].get("ingress") or []):
                if not admits_port(rule, number, HTTP_PORT_NAME, proto):
                    continue
                where = f"NetworkPolicy/{p['metadata']['name']} ingress[{i}]"
                peers = rule.get("from") or []
                if not peers:
                    err(f"{where}: admits {wname}'s metrics port {number} from everywhere (no `from`)")
                    continue
                for peer in peers:
                    why = peer_problem(peer, own)
                    if why:
                        err(f"{where}: {wname}'s metrics port {number}: {why}")
                    elif "namespaceSelector" in peer:
                        from_monitoring.append(describe(peer))
                    else:
                        admitted.append(f"{d['metadata']['name']} {number} from {describe(peer)}")
        if not from_monitoring:
            err(f"{wname}: no NetworkPolicy admits the monitoring namespace to metrics port {number} "
                "(Prometheus could not scrape it)")
        admitted += [f"{d['metadata']['name']} {number} from {x}" for x in sorted(set(from_monitoring))]
    return admitted
