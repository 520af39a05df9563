#!/usr/bin/env python3
"""NAT behaviour probe of the NAT lab (standard library only).

Roles:

  server   STUN-like UDP server. Answers every datagram with the source
           ip:port it saw, and on request answers from its other port or
           has a peer server (another host) answer, to test filtering.
           It is also the rendezvous of the hole-punching test.
  client   From one local socket asks S1:p1, S1:p2 and S2:p1 for its mapped
           address (mapping behaviour), then from a fresh socket that has
           contacted only S1:p1 asks S1:p1 to answer from S1:p1, S1:p2 and
           S2:p1 (filtering behaviour). Prints JSON and one human line.
  punch    One side of a UDP hole-punching attempt between two clients that
           learn each other's mapped address from the server.

Messages are small JSON objects; the probe never sends to an address it was
not given on the command line or told by the server.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time



def addr_str(a: tuple[str, int]) -> str:
    return f"{a[0]}:{a[1]}"


def parse_addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> dict | None:
    try:
        msg = json.loads(data)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


# ---------------------------------------------------------------- server


def run_server(args: argparse.Namespace) -> int:
    socks: list[socket.socket] = []
    for port in args.ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.bind, port))
        socks.append(s)
    peers = [parse_addr(p) for p in args.peer]
    peer_ips = {p[0] for p in peers}
    sessions: dict[str, dict[str, tuple[str, int]]] = {}
    deadline = time.monotonic() + args.duration if args.duration else None
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write("ready\n")
    while deadline is None or time.monotonic() < deadline:
        timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        ready, _, _ = select.select(socks, [], [], timeout)
        for s in ready:
            try:
                data, src = s.recvfrom(2048)
            except OSError:
                continue
            msg = decode(data)
            if msg is None:
                continue
            here = addr_str(s.getsockname())
            op = msg.get("op")
            seen = addr_str(src)
            if op == "echo":
                s.sendto(encode({"op": "echo-reply", "id": msg.get("id"), "seen": seen, "from": here}), src)
            elif op == "reflect":
                via = msg.get("via")
                reply = {"op": "reflected", "id": msg.get("id"), "via": via, "seen": seen}
                if via == "same":
                    reply["from"] = here
                    s.sendto(encode(reply), src)
                elif via == "other-port":
                    other = next((o for o in socks if o is not s), None)
                    if other is not None:
                        reply["from"] = addr_str(other.getsockname())
                        other.sendto(encode(reply), src)
                elif via == "other-host" and peers:
                    # The peer server (another IP) sends it from its first port.
                    s.sendto(encode({"op": "send-for", "to": seen, "msg": reply}), peers[0])
            elif op == "send-for" and src[0] in peer_ips:
                inner = msg.get("msg")
                if isinstance(inner, dict):
                    inner["from"] = addr_str(socks[0].getsockname())
                    socks[0].sendto(encode(inner), parse_addr(str(msg.get("to"))))
            elif op == "register":
                # Rendezvous for two punch clients: tell each the other's
                # mapped address, as the relay will tell agent and connector.
                sess = sessions.setdefault(str(msg.get("session")), {})
                name = str(msg.get("name"))
                sess[name] = src
                others = {n: a for n, a in sess.items() if n != name}
                reply = {"op": "registered", "seen": seen}
                if others:
                    reply["peer"] = addr_str(next(iter(others.values())))
                s.sendto(encode(reply), src)
    return 0


# ---------------------------------------------------------------- client


def request(sock: socket.socket, dst: tuple[str, int], msg: dict, want: str, tries: int, wait: float) -> dict | None:
    """Send msg to dst until a reply with op `want` and the same id arrives."""
    for _ in range(tries):
        sock.sendto(encode(msg), dst)
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, _src = sock.recvfrom(2048)
            r = decode(data)
            if r and r.get("op") == want and r.get("id") == msg.get("id"):
                return r
    return None


def local_ip(dst: tuple[str, int]) -> str:
    """The source address the kernel picks towards dst (connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(dst)
        return s.getsockname()[0]


def classify_mapping(m11: str | None, m12: str | None, m21: str | None) -> str:
    if None in (m11, m12, m21):
        return "unknown"
    if m11 == m12 == m21:
        return "endpoint-independent"
    if m11 == m12:
        return "address-dependent"
    return "address-and-port-dependent"


def classify_filtering(other_port: bool, other_host: bool) -> str:
    if other_host and other_port:
        return "endpoint-independent"
    if other_port and not other_host:
        return "address-dependent"
    if not other_port and not other_host:
        return "address-and-port-dependent"
    return "inconsistent (other host passes, other port of the same host does not)"


def classic_name(mapping: str, filtering: str) -> str:
    if mapping == "endpoint-independent":
        return {
            "endpoint-independent": "full-cone",
            "address-dependent": "restricted-cone",
            "address-and-port-dependent": "port-restricted",
        }.get(filtering, "unknown")
    if mapping in ("address-dependent", "address-and-port-dependent"):
        return "symmetric"
    return "unknown"


def run_client(args: argparse.Namespace) -> int:
    s1p1 = (args.s1, args.ports[0])
    s1p2 = (args.s1, args.ports[1])
    s2p1 = (args.s2, args.ports[0])
    result: dict = {"label": args.label}

    # Mapping: one socket, three destinations.
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("0.0.0.0", args.local_port))
    local = (local_ip(s1p1), a.getsockname()[1])
    result["local"] = addr_str(local)
    mapped: dict[str, str | None] = {}
    for i, (name, dst) in enumerate((("s1:p1", s1p1), ("s1:p2", s1p2), ("s2:p1", s2p1))):
        r = request(a, dst, {"op": "echo", "id": f"m{i}"}, "echo-reply", args.tries, args.wait)
        mapped[name] = r["seen"] if r else None
    a.close()
    result["mapped"] = mapped
    result["mapping"] = classify_mapping(mapped["s1:p1"], mapped["s1:p2"], mapped["s2:p1"])
    first = mapped["s1:p1"]
    result["port_preserved"] = first is not None and parse_addr(first)[1] == local[1]

    # Filtering: a fresh socket (fresh mapping) that only ever sends to S1:p1.
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind(("0.0.0.0", args.local_port + 1 if args.local_port else 0))
    result["filter_local"] = addr_str((local[0], b.getsockname()[1]))
    got: dict[str, str | None] = {"same": None, "other-port": None, "other-host": None}
    # Open the mapping first and learn it; then ask for the three replies.
    r = request(b, s1p1, {"op": "echo", "id": "f0"}, "echo-reply", args.tries, args.wait)
    result["filter_mapped"] = r["seen"] if r else None
    for attempt in range(args.tries):
        for via in got:
            if got[via] is None:
                b.sendto(encode({"op": "reflect", "id": f"f-{via}-{attempt}", "via": via}), s1p1)
        end = time.monotonic() + args.wait * 2
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([b], [], [], left)
            if not ready:
                break
            data, src = b.recvfrom(2048)
            m = decode(data)
            if m and m.get("op") == "reflected" and m.get("via") in got:
                got[m["via"]] = addr_str(src)
        if all(got.values()):
            break
    b.close()
    result["filter_replies"] = got
    if got["same"] is None:
        result["filtering"] = "unknown (no reply even from S1:p1)"
    else:
        result["filtering"] = classify_filtering(got["other-port"] is not None, got["other-host"] is not None)
    result["classic"] = classic_name(result["mapping"], result["filtering"])

    human = (
        f"{args.label}: mapping={result['mapping']} filtering={result['filtering']}"
        f" (classic: {result['classic']}, port-preserved={'yes' if result['port_preserved'] else 'no'},"
        f" mapped {mapped['s1:p1']} / {mapped['s1:p2']} / {mapped['s2:p1']})"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    print(json.dumps(result))
    print(human, file=sys.stderr if args.human_stderr else sys.stdout)
    return 0 if result["mapping"] != "unknown" and got["same"] is not None else 1


# ---------------------------------------------------------------- punch


def run_punch(args: argparse.Namespace) -> int:
    server = parse_addr(args.server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.local_port))
    result: dict = {"name": args.name, "local": addr_str(sock.getsockname())}
    peer = None
    mapped = None
    end = time.monotonic() + args.register_timeout
    while peer is None and time.monotonic() < end:
        sock.sendto(encode({"op": "register", "session": args.session, "name": args.name}), server)
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            data, src = sock.recvfrom(2048)
            m = decode(data)
            if m and m.get("op") == "registered" and src == server:
                mapped = m.get("seen")
                if m.get("peer"):
                    peer = parse_addr(m["peer"])
    result["mapped"] = mapped
    result["peer"] = addr_str(peer) if peer else None
    if peer is None:
        result.update(success=False, error="no peer from the rendezvous")
        print(json.dumps(result))
        return 1
    # Keep telling the server until the other side surely learnt us too.
    sock.sendto(encode({"op": "register", "session": args.session, "name": args.name}), server)
    if args.delay:
        time.sleep(args.delay)
    received_from: set[str] = set()
    learnt: list[str] = []
    acked_by: set[str] = set()
    peer_acked = False
    seq = 0
    start = time.monotonic()
    end = start + args.duration
    next_send = start
    done_at = None
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_send:
            sock.sendto(encode({"op": "punch", "name": args.name, "seq": seq, "acked": bool(acked_by)}), peer)
            seq += 1
            next_send = now + args.interval
        ready, _, _ = select.select([sock], [], [], max(0.0, min(next_send, end) - time.monotonic()))
        if not ready:
            continue
        data, src = sock.recvfrom(2048)
        m = decode(data)
        if not m or src == server:
            continue
        if m.get("op") == "punch":
            received_from.add(addr_str(src))
            if src != peer and addr_str(peer) not in received_from:
                # A peer-reflexive address (as in ICE): the peer's NAT gave it
                # another mapping towards us than towards the rendezvous. Aim
                # there from now on.
                learnt.append(addr_str(src))
                peer = src
            peer_acked = peer_acked or bool(m.get("acked"))
            sock.sendto(encode({"op": "punch-ack", "name": args.name}), src)
        elif m.get("op") == "punch-ack":
            acked_by.add(addr_str(src))
        if acked_by and peer_acked and done_at is None:
            # Both directions work; linger so the peer sees our acks too.
            done_at = time.monotonic()
            end = min(end, done_at + 0.3)
    result["sent"] = seq
    result["received_from"] = sorted(received_from)
    result["acked_by"] = sorted(acked_by)
    result["peer_reflexive"] = learnt
    result["success"] = bool(acked_by) and bool(received_from)
    result["elapsed_s"] = round((done_at or time.monotonic()) - start, 3)
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- main


def ports(s: str) -> list[int]:
    return [int(p) for p in s.split(",") if p]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)

    sv = sub.add_parser("server", help="STUN-like reflector and rendezvous")
    sv.add_argument("--bind", required=True, help="address to bind")
    sv.add_argument("--ports", type=ports, default=[3478, 3479], help="comma-separated (default 3478,3479)")
    sv.add_argument("--peer", action="append", default=[], help="peer server ip:port that answers 'other-host'")
    sv.add_argument("--duration", type=float, default=0, help="exit after N seconds (0: run until killed)")
    sv.add_argument("--ready-file", help="write this file once the sockets are bound")

    cl = sub.add_parser("client", help="classify the NAT in front of this host")
    cl.add_argument("--s1", required=True)
    cl.add_argument("--s2", required=True)
    cl.add_argument("--ports", type=ports, default=[3478, 3479])
    cl.add_argument("--label", default="nat")
    cl.add_argument("--local-port", type=int, default=0, help="mapping socket's port (filtering uses +1)")
    cl.add_argument("--tries", type=int, default=3)
    cl.add_argument("--wait", type=float, default=0.4, help="seconds to wait for each reply")
    cl.add_argument("--json-out", help="also write the JSON result here")
    cl.add_argument("--human-stderr", action="store_true", help="human line on stderr")

    pu = sub.add_parser("punch", help="one side of a hole-punching attempt")
    pu.add_argument("--server", required=True, help="rendezvous ip:port")
    pu.add_argument("--name", required=True)
    pu.add_argument("--session", default="punch")
    pu.add_argument("--local-port", type=int, default=0)
    pu.add_argument("--delay", type=float, default=0.0, help="seconds to wait after learning the peer")
    pu.add_argument("--duration", type=float, default=3.0)
    pu.add_argument("--interval", type=float, default=0.1)
    pu.add_argument("--register-timeout", type=float, default=5.0)

    args = p.parse_args()
    if args.role in ("server", "client") and len(args.ports) != 2:
        p.error("--ports takes exactly two ports")
    return {"server": run_server, "client": run_client, "punch": run_punch}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
