"""The assertions on one rendered target (`check_rendered`)."""

from __future__ import annotations

import ipaddress

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from check_k8s_netpol import check_metrics_ingress
from k8s_checks.binaries import BinaryCheck
from k8s_checks.common import (
    CONNECTOR, NAMESPACE, PLACEHOLDER_IMAGE, QUIC_PORT, RELAY, RELAY_HEADLESS, RELAY_LB, ROOT, SECCOMP_FILE,
    SECCOMP_LOCALHOST, Problems, Target,
)
from k8s_checks.objects import (
    by_kind, check_backend_service, configmap_file, cpu_cores, host_port, mounted_from, named, pod_labels, pod_spec,
    port_of, selects,
)
from k8s_checks.rust_config import check_keys, socket_addr_ok


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
        src = ROOT / "dataplane" / "relay" / "src" / "server.rs"
        check_keys(relay_toml, "RelayConfig", src, "relay.toml", pr)
        limits_src = ROOT / "dataplane" / "relay" / "src" / "limits.rs"
        check_keys(relay_toml.get("limits") or {}, "Limits", limits_src, "relay.toml [limits]", pr)
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
            src = ROOT / "dataplane" / "connector" / "src" / "config.rs"
            check_keys(ct, "ConnectorConfig", src, "connector.toml", pr)
            services = [s for s in ct.get("service") or [] if isinstance(s, dict)]
            pr.check(bool(services), "connector.toml: no [[service]]")
            for s in services:
                check_keys(s, "ServiceConfig", src, f"connector.toml service {s.get('name')}", pr)
                for b in s.get("backend") or []:
                    where = f"connector.toml service {s.get('name')} backend {b.get('target')}"
                    check_keys(b, "BackendRoute", src, where, pr)
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
