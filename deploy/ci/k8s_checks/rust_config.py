"""The Rust config structs (the source of truth for TOML keys) and TOML value checks."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from k8s_checks.common import ROOT, Problems


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
    conn = ROOT / "dataplane" / "connector" / "src" / "config.rs"
    relay = ROOT / "dataplane" / "relay" / "src" / "server.rs"
    limits = ROOT / "dataplane" / "relay" / "src" / "limits.rs"
    want = [
        (conn, "ConnectorConfig", "relays", "Vec<String>"),
        (conn, "ConnectorConfig", "health", "Option<SocketAddr>"),
        (conn, "ConnectorConfig", "service", "Vec<ServiceConfig>"),
        (conn, "BackendRoute", "target", "Target"),
        (relay, "RelayConfig", "metrics", "Option<SocketAddr>"),
        (relay, "RelayConfig", "shutdown_grace_ms", "u64"),
        (limits, "Limits", "max_conns_per_ip", "u32"),
    ]
    out = []
    for src, struct, name, ty in want:
        got = (rust_struct_fields(src, struct) or {}).get(name)
        if got != ty:
            out.append(f"struct parser: {struct}.{name} read as {got!r} from {src.relative_to(ROOT)}, "
                       f"expected {ty!r} (did the source change shape?)")
    return out
