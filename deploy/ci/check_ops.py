#!/usr/bin/env python3
"""Checks behind deploy/ci/check-ops.sh (run in its virtualenv).

    check_ops.py terraform                         parse every .tf, cross-check variables and placeholders
    check_ops.py hcl-parse FILE                    parse one .tf file (negative self-test)
    check_ops.py template OUT                      check the cloud-init template, render it with sample values to OUT
    check_ops.py extract RENDERED DIR              write the rendered user data's files under DIR (decoded)
    check_ops.py dashboard RULES_OUT               check the dashboard; write its queries as recording rules
    check_ops.py metric-names [EXTRA.yml ...]      every metric used by dashboard and alerts is in metrics.txt
    check_ops.py live-metrics METRICS.txt          every family in metrics.txt is in a /metrics dump
    check_ops.py unit-diff RENDERED                the unit embedded in the rendered user data is the repo's unit
    check_ops.py sync-unit                         copy deploy/systemd/ztna-relay.service into relay.yaml

Exit status 0 = passed; otherwise a message on stderr says what is wrong.
"""

import base64
import json
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLOUD = os.path.join(ROOT, "deploy", "cloud")
TEMPLATE = os.path.join(CLOUD, "cloud-init", "relay.yaml")
TF_DIR = os.path.join(CLOUD, "terraform")
OBS = os.path.join(ROOT, "deploy", "observability")
DASHBOARD = os.path.join(OBS, "grafana", "ztna-relay.json")
ALERTS = os.path.join(OBS, "prometheus", "alerts.yml")
METRICS_TXT = os.path.join(OBS, "metrics.txt")
RELAY_UNIT = os.path.join(ROOT, "deploy", "systemd", "ztna-relay.service")

# The placeholders of the cloud-init template; both Terraform modules must
# pass exactly these to templatefile().
PLACEHOLDERS = {
    "trust_domain", "relay_cert_b64", "relay_key_b64", "client_ca_b64", "policy_b64",
    "release_url", "relay_sha256", "tune_sha256",
}
MODULES = ("digitalocean", "aws")
MODULE_FILES = ("versions.tf", "variables.tf", "outputs.tf", "main.tf")


class Fail(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Fail(msg)


def uq(s):
    """python-hcl2 >= 7 keeps the quotes of string literals and labels."""
    if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] == '"':
        return s[1:-1]
    return s


def strip_hcl_comments(text):
    # Good enough for our files: no '#' or '//' inside strings that matter.
    return "\n".join(re.sub(r"(^|\s)(#|//).*$", "", line) for line in text.splitlines())


# --------------------------------------------------------------- terraform

def hcl_load(path):
    import hcl2
    with open(path) as f:
        try:
            return hcl2.load(f)
        except Exception as e:  # lark raises several types
            raise Fail(f"{os.path.relpath(path, ROOT)}: HCL parse error: {e}")


def cmd_hcl_parse(path):
    hcl_load(path)


def templatefile_keys(main_text):
    m = re.search(r"templatefile\(\s*\"\$\{path\.module\}/\.\./\.\./cloud-init/relay\.yaml\"\s*,\s*\{(.*?)\}\s*\)",
                  main_text, re.S)
    need(m, "main.tf does not call templatefile(\"${path.module}/../../cloud-init/relay.yaml\", {...})")
    return set(re.findall(r"^\s*([a-z0-9_]+)\s*=", m.group(1), re.M))


def cmd_terraform():
    files = []
    for dirpath, _, names in os.walk(TF_DIR):
        files += [os.path.join(dirpath, n) for n in names if n.endswith(".tf")]
    need(files, "no .tf files under deploy/cloud/terraform")
    parsed = {f: hcl_load(f) for f in sorted(files)}
    for mod in MODULES:
        d = os.path.join(TF_DIR, mod)
        for n in MODULE_FILES:
            need(os.path.isfile(os.path.join(d, n)), f"terraform/{mod}/{n} is missing")
        text = {n: open(os.path.join(d, n)).read() for n in os.listdir(d) if n.endswith(".tf")}
        code = "\n".join(strip_hcl_comments(t) for t in text.values())
        # Providers pinned.
        tf = parsed[os.path.join(d, "versions.tf")].get("terraform", [])
        need(tf, f"terraform/{mod}/versions.tf has no terraform block")
        need(tf[0].get("required_version"), f"terraform/{mod}: no required_version")
        rp = tf[0].get("required_providers", [])
        need(rp, f"terraform/{mod}: no required_providers")
        for name, spec in rp[0].items():
            if name.startswith("__"):
                continue
            need(isinstance(spec, dict) and uq(spec.get("source", "")) and uq(spec.get("version", "")),
                 f"terraform/{mod}: provider {name} needs source and a version constraint")
        # Variables: declared == used.
        declared = set()
        for f in text:
            for block in parsed[os.path.join(d, f)].get("variable", []):
                for k, v in block.items():
                    declared.add(uq(k))
                    need(uq(v.get("description", "")), f"terraform/{mod}: variable {uq(k)} has no description")
        used = set(re.findall(r"\bvar\.([a-z0-9_]+)", code))
        need(not used - declared, f"terraform/{mod}: undeclared variables used: {sorted(used - declared)}")
        need(not declared - used, f"terraform/{mod}: variables declared but never used: {sorted(declared - used)}")
        # Locals: defined == used.
        defined = set()
        for f in text:
            for block in parsed[os.path.join(d, f)].get("locals", []):
                defined |= {k for k in block if not k.startswith("__")}
        lused = set(re.findall(r"\blocal\.([a-z0-9_]+)", code))
        need(not lused - defined, f"terraform/{mod}: undefined locals used: {sorted(lused - defined)}")
        need(not defined - lused, f"terraform/{mod}: locals defined but never used: {sorted(defined - lused)}")
        # Resources and data sources referenced exist.
        res, data = set(), set()
        for f in text:
            p = parsed[os.path.join(d, f)]
            for block in p.get("resource", []):
                for rtype, inner in block.items():
                    for rname in inner:
                        if not rname.startswith("__"):
                            res.add(f"{uq(rtype)}.{uq(rname)}")
            for block in p.get("data", []):
                for rtype, inner in block.items():
                    for rname in inner:
                        if not rname.startswith("__"):
                            data.add(f"data.{uq(rtype)}.{uq(rname)}")
        refs = set(re.findall(r"(?<![\w.])((?:digitalocean|aws)_[a-z0-9_]+\.[a-z0-9_]+)", code))
        need(not refs - res, f"terraform/{mod}: references to undefined resources: {sorted(refs - res)}")
        drefs = set(re.findall(r"\b(data\.[a-z0-9_]+\.[a-z0-9_]+)", code))
        need(not drefs - data, f"terraform/{mod}: references to undefined data sources: {sorted(drefs - data)}")
        # Secrets are sensitive; the admin CIDR variable has no default.
        for block in parsed[os.path.join(d, "variables.tf")].get("variable", []):
            for k, v in block.items():
                if uq(k) == "relay_key_pem":
                    need(v.get("sensitive") is True, f"terraform/{mod}: relay_key_pem must be sensitive")
                if uq(k) == "admin_cidrs":
                    need("default" not in v, f"terraform/{mod}: admin_cidrs must not have a default")
        # The user data gets exactly the template's placeholders.
        keys = templatefile_keys(text["main.tf"])
        need(keys == PLACEHOLDERS,
             f"terraform/{mod}: templatefile vars {sorted(keys)} != template placeholders {sorted(PLACEHOLDERS)}")
        # Ports of the firewall / security group.
        for port in ("4433", "4434", "9090", "22"):
            need(re.search(rf'(port_range\s*=\s*"{port}"|from_port\s*=\s*{port}\b)', code),
                 f"terraform/{mod}: no rule for port {port}")
        need(re.search(r"var\.admin_cidrs|local\.admin_v4", code), f"terraform/{mod}: admin CIDRs unused")


# ------------------------------------------------------------- cloud-init

def template_placeholders(text):
    need("%{" not in text, "relay.yaml contains '%{' (a Terraform template directive)")
    found = re.findall(r"\$\{([^}]*)\}", text)
    bad = [p for p in found if not re.fullmatch(r"[a-z0-9_]+", p)]
    need(not bad, f"relay.yaml: '${{...}}' that is not a plain placeholder: {bad}")
    return set(found)


SAMPLE = {
    "trust_domain": "corp.example",
    "relay_cert_b64": base64.b64encode(b"-----BEGIN CERTIFICATE-----\nsample\n-----END CERTIFICATE-----\n").decode(),
    "relay_key_b64": "",
    "client_ca_b64": base64.b64encode(b"-----BEGIN CERTIFICATE-----\nsample\n-----END CERTIFICATE-----\n").decode(),
    "policy_b64": base64.b64encode(b'[services.echo]\nconnectors = ["site-a"]\nagents = ["alice"]\n').decode(),
    "release_url": "https://downloads.example.org/ztna/v0.1.0/x86_64",
    "relay_sha256": "0" * 64,
    "tune_sha256": "1" * 64,
}


def render(text, values):
    return re.sub(r"\$\{([a-z0-9_]+)\}", lambda m: values[m.group(1)], text)


def cmd_template(out, values_json=None):
    import yaml
    text = open(TEMPLATE).read()
    need(text.startswith("#cloud-config\n"), "relay.yaml must start with '#cloud-config'")
    ph = template_placeholders(text)
    need(ph == PLACEHOLDERS, f"relay.yaml placeholders {sorted(ph)} != expected {sorted(PLACEHOLDERS)}")
    yaml.safe_load(text)  # the raw template is YAML too (placeholders sit in strings)
    values = dict(SAMPLE)
    if values_json:
        values.update(json.load(open(values_json)))
    rendered = render(text, values)
    doc = yaml.safe_load(rendered)
    need(isinstance(doc, dict), "rendered user data is not a mapping")
    users = [u for u in doc.get("users", []) if isinstance(u, dict)]
    need(any(u.get("name") == "ztna" and u.get("system") for u in users), "no system user ztna")
    need("default" in doc.get("users", []), "users: must keep 'default' (provider SSH keys)")
    files = {w["path"]: w for w in doc.get("write_files", [])}
    for p in ("/etc/ztna/relay.toml", "/etc/ztna/policy.toml", "/etc/ztna/relay.pem", "/etc/ztna/relay.key",
              "/etc/ztna/ca.pem", "/etc/systemd/system/ztna-relay.service", "/usr/local/lib/ztna/bootstrap.sh"):
        need(p in files, f"user data does not write {p}")
    for p, w in files.items():
        if p.startswith("/etc/ztna/"):
            need(w.get("owner") == "root:ztna" and w.get("permissions") == "0640" and w.get("defer") is True,
                 f"{p}: want owner root:ztna, permissions 0640, defer: true (written after the user exists)")
    unit = files["/etc/systemd/system/ztna-relay.service"]["content"]
    need(unit == open(RELAY_UNIT).read(),
         "the unit embedded in relay.yaml differs from deploy/systemd/ztna-relay.service; "
         "run: python3 deploy/ci/check_ops.py sync-unit")
    boot = files["/usr/local/lib/ztna/bootstrap.sh"]["content"]
    for must in ("ztna-tune apply --profile cloud", "sysctl --system", "systemctl enable ztna-relay.service",
                 "sha256sum -c"):
        need(must in boot, f"bootstrap.sh does not run '{must}'")
    need(any("bootstrap.sh" in json.dumps(c) for c in doc.get("runcmd", [])), "runcmd does not run bootstrap.sh")
    toml = files["/etc/ztna/relay.toml"]["content"]
    m = re.search(r"^shutdown_grace_ms\s*=\s*(\d+)", toml, re.M)
    need(m, "relay.toml sets no shutdown_grace_ms")
    grace = int(m.group(1))
    tm = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    need(tm and int(tm.group(1)) * 1000 > grace, "unit TimeoutStopSec must exceed relay.toml shutdown_grace_ms")
    with open(out, "w") as f:
        f.write(rendered)


def cmd_extract(rendered, outdir):
    """Writes the user data's files under outdir (path kept, b64 decoded)."""
    import yaml
    doc = yaml.safe_load(open(rendered))
    for w in doc["write_files"]:
        data = w.get("content", "")
        data = base64.b64decode(data) if w.get("encoding") in ("b64", "base64") else data.encode()
        dst = os.path.join(outdir, w["path"].lstrip("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(data)
        os.chmod(dst, int(w.get("permissions", "0644"), 8))


def cmd_sync_unit():
    """Rewrites the unit embedded in relay.yaml from deploy/systemd (a maintainer's helper)."""
    text = open(TEMPLATE).read()
    m = re.search(r"(  - path: /etc/systemd/system/ztna-relay\.service\n(?:    .*\n)*?    content: \|\n)((?:      .*\n|\n)*?)(?=  - path: )",
                  text)
    need(m, "relay.yaml: cannot find the embedded ztna-relay.service")
    unit = "".join(("      " + l) if l.strip() else l for l in open(RELAY_UNIT).read().splitlines(True))
    open(TEMPLATE, "w").write(text[: m.start(2)] + unit + text[m.end(2):])


def cmd_unit_diff(rendered):
    import yaml
    doc = yaml.safe_load(open(rendered))
    unit = [w for w in doc["write_files"] if w["path"] == "/etc/systemd/system/ztna-relay.service"][0]["content"]
    need(unit == open(RELAY_UNIT).read(), "embedded unit differs from deploy/systemd/ztna-relay.service")


# ------------------------------------------------------------ observability

def grafana_to_promql(expr):
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
            .replace("${job}", "ztna-relay").replace("$job", "ztna-relay")
            .replace("${instance}", ".+").replace("$instance", ".+"))


def dashboard_exprs(d):
    out = []
    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))
    walk(d.get("panels", []))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            need(m, f"template variable {v.get('name')}: unsupported query {q!r}")
            out.append((f"variable {v.get('name')}", m.group(1)))
    return out


def cmd_dashboard(rules_out):
    d = json.load(open(DASHBOARD))
    for k in ("uid", "title", "schemaVersion", "panels", "templating"):
        need(k in d, f"dashboard has no {k}")
    need(d.get("id") is None, "dashboard id must be null (set by Grafana on import)")
    vars_ = {v["name"]: v for v in d["templating"]["list"]}
    need(vars_.get("datasource", {}).get("type") == "datasource"
         and vars_["datasource"].get("query") == "prometheus", "no Prometheus datasource variable 'datasource'")
    ids, kinds = set(), set()
    def walk(panels):
        for p in panels:
            need(p.get("id") not in ids, f"duplicate panel id {p.get('id')}")
            ids.add(p.get("id"))
            kinds.add(p["type"])
            g = p.get("gridPos", {})
            need(g and g["x"] + g["w"] <= 24, f"panel {p.get('title')}: gridPos beyond 24 columns")
            if p["type"] != "row":
                need(p.get("datasource", {}).get("uid") == "${datasource}",
                     f"panel {p.get('title')}: datasource must be the ${{datasource}} variable")
                need(p.get("targets"), f"panel {p.get('title')} has no query")
                for t in p["targets"]:
                    need(t.get("datasource", {}).get("uid") == "${datasource}",
                         f"panel {p.get('title')}: target datasource must be ${{datasource}}")
            walk(p.get("panels", []))
    walk(d["panels"])
    need({"timeseries", "stat", "heatmap"} <= kinds, "dashboard needs timeseries, stat and heatmap panels")
    exprs = dashboard_exprs(d)
    text = " ".join(e for _, e in exprs)
    for must in ("ztna_relay_datagrams_forwarded_total", "ztna_relay_forwarded_bytes_total",
                 "ztna_relay_forward_latency_seconds_bucket", "histogram_quantile(0.5", "histogram_quantile(0.99",
                 "ztna_relay_drops_total", "ztna_relay_connections", "ztna_relay_registrations_total",
                 "ztna_relay_registrations_denied_total", "ztna_relay_auth_rejected_total",
                 "ztna_relay_handshakes_failed_total", "ztna_relay_handshakes_timed_out_total",
                 "ztna_relay_retries_sent_total", "ztna_relay_resets_sent_total", "ztna_relay_draining",
                 "by (instance, worker)"):
        need(must in text, f"dashboard has no query with {must}")
    # Every query as a recording rule, for `promtool check rules`.
    import yaml
    rules = [{"record": f"dashboard:q{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)]
    with open(rules_out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)


PROMQL_WORDS = {
    # functions, aggregations and keywords that can look like metric names
    "sum", "by", "on", "and", "or", "unless", "rate", "increase", "max", "min", "count", "avg", "vector",
    "histogram_quantile", "group_left", "group_right", "ignoring", "without", "absent", "clamp_min",
    "clamp_max", "offset", "bool", "label_values", "topk", "bottomk", "irate", "delta", "deriv", "abs",
    "time", "scalar", "le", "inf", "nan", "humanize", "humanizePercentage", "humanizeDuration",
}
HIST_SUFFIXES = ("_bucket", "_sum", "_count")


def load_metrics_txt(path=METRICS_TXT):
    out = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, kind = line.split()
            out[name] = kind
    return out


def metric_names(expr):
    """Names of series selected by a PromQL expression (ztna_* and up)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)       # label values
    e = re.sub(r"\{[^}]*\}", "", e)                       # matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", e))
    return {n for n in names if n.startswith("ztna_") or n == "up"}


def resolve(name, known):
    if name in known:
        return True
    for s in HIST_SUFFIXES:
        if name.endswith(s) and known.get(name[: -len(s)]) == "histogram":
            return True
    return False


def cmd_metric_names(*extra):
    import yaml
    known = load_metrics_txt()
    known["up"] = "gauge"
    used = []
    for title, e in dashboard_exprs(json.load(open(DASHBOARD))):
        used += [(f"dashboard: {title}", n) for n in metric_names(e)]
    for path in (ALERTS,) + extra:
        for g in yaml.safe_load(open(path))["groups"]:
            for r in g["rules"]:
                used += [(f"{os.path.basename(path)}: {r.get('alert') or r.get('record')}", n)
                         for n in metric_names(r["expr"])]
    bad = sorted({f"{where}: {n}" for where, n in used if not resolve(n, known)})
    need(not bad, "metrics not in deploy/observability/metrics.txt:\n  " + "\n  ".join(bad))
    need(used, "no metric names found")
    # Histograms are used through their series, never the bare family name.
    bare = sorted({n for _, n in used if known.get(n) == "histogram"})
    need(not bare, f"histogram families used without _bucket/_sum/_count: {bare}")


def cmd_live_metrics(dump):
    """Every family of metrics.txt is exported, with its type."""
    exported = {}
    for line in open(dump):
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            exported[m.group(1)] = m.group(2)
    series = {re.split(r"[{ ]", l, 1)[0] for l in open(dump) if l.strip() and not l.startswith("#")}
    missing = []
    for name, kind in load_metrics_txt().items():
        if not name.startswith("ztna_relay_"):
            continue  # connector families: checked by the connector's tests
        if exported.get(name) != kind:
            missing.append(f"{name} ({kind}; exported as {exported.get(name, 'nothing')})")
        elif kind == "histogram":
            missing += [name + s for s in HIST_SUFFIXES if name + s not in series]
    need(not missing, "listed in metrics.txt but not exported by the relay:\n  " + "\n  ".join(missing))
    # Label values the alerts and the dashboard match on (reason="...",
    # result=~"a|b") must occur in the dump.
    import yaml
    values = {}
    for l in open(dump):
        for k, v in re.findall(r'(\w+)="([^"]*)"', l.split(" ")[0] if not l.startswith("#") else ""):
            values.setdefault(k, set()).add(v)
    exprs = [e for _, e in dashboard_exprs(json.load(open(DASHBOARD)))]
    exprs += [r["expr"] for g in yaml.safe_load(open(ALERTS))["groups"] for r in g["rules"]]
    bad = []
    for e in exprs:
        for k, op, v in re.findall(r'\b(reason|result)\s*(=~|=)\s*"([^"]*)"', e):
            for alt in (v.split("|") if op == "=~" else [v]):
                if alt not in values.get(k, set()):
                    bad.append(f'{k}="{alt}"')
    need(not bad, f"label values used by alerts/dashboard but never exported: {sorted(set(bad))}")


def main(argv):
    cmds = {
        "terraform": cmd_terraform, "hcl-parse": cmd_hcl_parse, "template": cmd_template,
        "extract": cmd_extract, "dashboard": cmd_dashboard, "metric-names": cmd_metric_names,
        "live-metrics": cmd_live_metrics, "unit-diff": cmd_unit_diff, "sync-unit": cmd_sync_unit,
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        cmds[argv[1]](*argv[2:])
    except Fail as e:
        print(f"{argv[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
