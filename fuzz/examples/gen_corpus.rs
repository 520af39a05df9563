//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/`
//! from the real encoders and builders (wire::Message::encode,
//! datagram::encode_into, packet::build_*, pki::issue), so the seeds are
//! valid inputs that start the fuzzer deep in each parser. Deterministic
//! except `peer_identity` (fresh keys and serials each run).
//!
//! Run from fuzz/: `cargo run --example gen_corpus` (a normal build, not a
//! fuzz build). Existing files of the same name are overwritten; files no
//! longer generated are not removed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use ztna_control::identity::Identity;
use ztna_control::packet::{self, TcpFlags, TcpHeader};
use ztna_control::wire::{Message, Role, ServiceName};
use ztna_control::{datagram, Code};
use ztna_fuzz::records::push_record;

struct Out {
    dir: PathBuf,
}

impl Out {
    fn target(name: &str) -> Out {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Out { dir }
    }
    fn put(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.join(name), bytes).unwrap();
    }
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn enc(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

fn all_messages() -> Vec<(&'static str, Message)> {
    let v4: SocketAddr = "203.0.113.7:4433".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    vec![
        ("hello", Message::Hello { version: ztna_control::wire::VERSION, software: "ztna-agent/0.1.0".into() }),
        ("hello_ack", Message::HelloAck { version: ztna_control::wire::VERSION }),
        ("error", Message::Error { code: Code::MALFORMED, reason: "malformed control frame".into() }),
        ("goodbye", Message::Goodbye { code: Code::NO_ERROR, reason: "relay shutting down".into() }),
        ("register_agent", Message::Register { request_id: 1, role: Role::Agent, service: svc("echo") }),
        (
            "register_connector",
            Message::Register { request_id: 2, role: Role::Connector, service: svc("web.internal") },
        ),
        ("register_ok", Message::RegisterOk { request_id: 1, flow: 1 }),
        (
            "register_error",
            Message::RegisterError { request_id: 1, code: Code::UNKNOWN_SERVICE, reason: "no connector".into() },
        ),
        ("unregister", Message::Unregister { flow: 1 }),
        ("observed_v4", Message::ObservedAddress { addr: v4 }),
        ("observed_v6", Message::ObservedAddress { addr: v6 }),
        ("flow_open_v4", Message::FlowOpen { flow: 2, service: 1, agent_addr: v4, agent_id: "agent-1".into() }),
        ("flow_open_v6", Message::FlowOpen { flow: 3, service: 1, agent_addr: v6, agent_id: String::new() }),
        ("flow_close", Message::FlowClose { flow: 2, code: Code::NO_ERROR }),
        ("unknown_ext", Message::Unknown { ty: 0x90 }),
    ]
}

/// A Register frame with an invalid (upper-case) service name.
fn bad_name_register(request_id: u32) -> Vec<u8> {
    let mut f = vec![0x10, 0, 10];
    f.extend_from_slice(&request_id.to_be_bytes());
    f.extend_from_slice(&[1, 4]);
    f.extend_from_slice(b"Echo");
    f
}

fn control_frames() {
    let o = Out::target("control_frames");
    // [n = 0][stream]: one message each.
    for (name, m) in all_messages() {
        let mut b = vec![0];
        b.extend(enc(&[m]));
        o.put(name, &b);
    }
    // A client's session, delivered in chunks of 1, 5 and 11 bytes.
    let session = enc(&[
        Message::Hello { version: ztna_control::wire::VERSION, software: "ztna-connector/0.1.0".into() },
        Message::Register { request_id: 1, role: Role::Connector, service: svc("echo") },
        Message::Register { request_id: 2, role: Role::Agent, service: svc("db") },
        Message::Unregister { flow: 1 },
    ]);
    let mut b = vec![3, 0, 4, 10];
    b.extend_from_slice(&session);
    o.put("client_session_chunked", &b);
    // A relay's answers.
    let relay = enc(&all_messages()
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.ty() != 0x01 && m.ty() != 0x10)
        .collect::<Vec<_>>());
    let mut b = vec![1, 6];
    b.extend_from_slice(&relay);
    o.put("relay_session_chunked", &b);
    // Recoverable bad name, then more.
    let mut b = vec![0];
    b.extend(bad_name_register(7));
    b.extend(enc(&[Message::HelloAck { version: ztna_control::wire::VERSION }]));
    o.put("bad_service_name_then_more", &b);
    // Largest extension frame, and a frame over the limit.
    let mut b = vec![0, 0x90, 0x04, 0x00];
    b.extend_from_slice(&[0x55; 1024]);
    o.put("max_body_extension", &b);
    o.put("too_large", &[0, 0x01, 0x04, 0x01, 0, 1]);
    o.put("reserved_type", &[0, 0x45, 0, 0]);
    o.put("trailing_bytes", &[0, 0x02, 0, 3, 0, 1, 0]);
}

fn datagram_corpus() {
    let o = Out::target("datagram");
    let mut d = Vec::new();
    for (name, flow, new_flow) in [
        ("flow1", 1u32, 9u32),
        ("flow_2byte", 1000, 2000),
        ("flow_4byte", 100_000, 3),
        ("flow_max", datagram::MAX_FLOW, 1),
    ] {
        datagram::encode_into(flow, b"\x45\x00hello", &mut d);
        let mut b = new_flow.to_le_bytes().to_vec();
        b.extend_from_slice(&d);
        o.put(name, &b);
    }
    o.put("non_minimal_varint", &[7, 0, 0, 0, 0x40, 0x05, 0xaa]);
    o.put("flow_zero", &[7, 0, 0, 0, 0x00, 0xaa]);
    o.put("flow_8byte_too_big", &[7, 0, 0, 0, 0xc0, 0, 0, 0, 0x40, 0, 0, 0, 0xaa]);
    o.put("truncated_varint", &[7, 0, 0, 0, 0x80, 0x01]);
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

const AGENT: [u8; 4] = [100, 64, 0, 1];
const SERVICE: [u8; 4] = [100, 100, 0, 10];

fn udp(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    packet::build_ipv4_udp(sa(AGENT, 40000), sa(SERVICE, dst_port), payload, &mut p).unwrap();
    p
}

fn tcp(dst_port: u16, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8], mss: Option<u16>) -> Vec<u8> {
    let mut p = Vec::new();
    let h = TcpHeader { seq, ack, flags, window: 64240, mss };
    packet::build_ipv4_tcp(sa(AGENT, 40001), sa(SERVICE, dst_port), &h, payload, &mut p).unwrap();
    p
}

fn echo_request(payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    packet::build_icmp_echo(Ipv4Addr::from(AGENT), Ipv4Addr::from(SERVICE), true, 0x1234, 1, payload, &mut p).unwrap();
    p
}

fn ipv6_udp() -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 12, 17, 64];
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[0x9c, 0x40, 0, 7, 0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    p
}

/// A UDP packet whose IPv4 header carries 4 bytes of options (NOP NOP NOP EOL).
fn with_options(p: &[u8]) -> Vec<u8> {
    let mut o = p[..20].to_vec();
    o[0] = 0x46;
    let total = u16::from_be_bytes([o[2], o[3]]) + 4;
    o[2..4].copy_from_slice(&total.to_be_bytes());
    o.extend_from_slice(&[1, 1, 1, 0]);
    o.extend_from_slice(&p[20..]);
    ztna_fuzz::ip::fix_checksums(&mut o);
    o
}

fn records(rs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (tag, d) in rs {
        push_record(&mut b, *tag, d);
    }
    b
}

fn ip_packet() -> Vec<(String, Vec<u8>)> {
    let o = Out::target("ip_packet");
    let syn = tcp(80, 1000, 0, TcpFlags::SYN, &[], Some(1360));
    let big = udp(7, &[0x42; 1400]);
    let singles: Vec<(&str, Vec<u8>)> = vec![
        ("udp_echo", udp(7, b"hello tunnel\n")),
        ("udp_dns", udp(53, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")),
        ("udp_not_allowed", udp(9999, b"x")),
        ("udp_options", with_options(&udp(7, b"opt"))),
        ("icmp_echo", echo_request(b"ping payload")),
        ("tcp_syn", syn.clone()),
        ("tcp_syn_closed_port", tcp(22, 5, 0, TcpFlags::SYN, &[], None)),
        ("tcp_ack_no_conn", tcp(80, 5, 77, TcpFlags::ACK, b"data", None)),
        ("tcp_rst", tcp(80, 5, 0, TcpFlags::RST, &[], None)),
        ("too_big_df", big.clone()),
        ("ipv6_udp", ipv6_udp()),
    ];
    for (name, p) in &singles {
        o.put(&format!("raw_{name}"), p);
        o.put(name, &records(&[(0, p)]));
    }
    // A TCP connection: SYN, ACK of the SYN-ACK (bit 1 patches the ack
    // number), data, FIN; then time for the close.
    let ack = tcp(80, 1001, 0, TcpFlags::ACK, &[], None);
    let data = tcp(80, 1001, 0, TcpFlags::ACK | TcpFlags::PSH, b"GET / HTTP/1.0\r\n\r\n", None);
    let fin = tcp(80, 1019, 0, TcpFlags::ACK | TcpFlags::FIN, &[], None);
    let conv = records(&[(0, &syn), (2, &ack), (2, &data), (2 | (4 * 20), &fin), (2 | (4 * 50), &ack)]);
    o.put("tcp_conversation", &conv);
    let rst_mid = records(&[(0, &syn), (2, &ack), (0, &tcp(80, 1001, 0, TcpFlags::RST, &[], None))]);
    o.put("tcp_reset_by_agent", &rst_mid);
    // Corrupted checksum: fixed up by tag bit 0.
    let mut bad = udp(7, b"fix me");
    bad[30] ^= 0xff;
    o.put("udp_bad_checksum_fixed", &records(&[(1, &bad)]));
    singles.into_iter().map(|(n, p)| (n.to_owned(), p)).chain([("big".to_owned(), big)]).collect()
}

/// Seeds for agent_c_api: `[flags]` + records (see the target's doc).
fn agent_c_api(pkts: &[(String, Vec<u8>)]) {
    let o = Out::target("agent_c_api");
    let get = |n: &str| pkts.iter().find(|(k, _)| k == n).map(|(_, p)| p.clone()).unwrap();
    let reply = {
        let mut p = Vec::new();
        packet::build_ipv4_udp(sa(SERVICE, 7), sa(AGENT, 40000), b"hello tunnel\n", &mut p).unwrap();
        p
    };
    let spoofed = {
        let mut p = Vec::new();
        packet::build_ipv4_udp(sa([100, 100, 1, 5], 7), sa(AGENT, 40000), b"not echo", &mut p).unwrap();
        p
    };
    let dg = |flow: u32, p: &[u8]| {
        let mut d = Vec::new();
        datagram::encode_into(flow, p, &mut d);
        d
    };
    let poll = [0x05u8, 0xdc, 3]; // cap 1500, 4 buffers
    let cfg =
        b"127.0.0.1:4433\x00127.0.0.1:5000\x00relay.example\x00echo\x00100.100.0.10/32\x00db\x00fd00::/64".to_vec();
    let bad_cfg = b"not an address\x00127.0.0.1:5000\x00\x00Echo\x00100.100.0.10/33".to_vec();

    // Not connected: every packet is refused, raw UDP goes nowhere.
    let mut b = vec![0];
    b.extend(records(&[
        (0, &get("udp_echo")),
        (0, &udp(7, b"")[..19]),
        (0, &ipv6_udp()),
        (8, b"\x45garbage"),
        (1, &[0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0]),
        (2, &[6, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x11, 0x51, 0x40, 1, 2]),
        (2, &[9, 1, 2, 3, 4]),
        (5, &[0x13, 0x88]),
        (6, &poll),
        (7, &cfg),
        (7, &bad_cfg),
        (7, b""),
    ]));
    o.put("offline", &b);

    // Connected to the relay stand-in (echo = flow 1, db = 2, v6 = 3).
    let mut b = vec![1];
    b.extend(records(&[
        (0, &get("udp_echo")),
        (0, &get("icmp_echo")),
        (0, &get("tcp_syn")),
        (0, &udp(7, &[0x42; 1400])),
        (0, &[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, 1, 192, 0, 2, 1]),
        (4, &dg(1, &reply)),
        (4, &dg(1, &spoofed)),
        (4, &dg(9, &reply)),
        (4, &[0x40]),
        (6, &poll),
        (6, &[0, 10, 0]),
    ]));
    o.put("connected_traffic", &b);

    let mut b = vec![1];
    b.extend(records(&[
        (3, &enc(&[Message::ObservedAddress { addr: "198.51.100.9:61000".parse().unwrap() }])),
        (3, &enc(&[Message::FlowClose { flow: 1, code: Code::NO_ERROR }])),
        (5, &[0x07, 0xd0]),
        (3, &enc(&[Message::RegisterError { request_id: 9, code: Code::LIMIT, reason: "limit".into() }])),
        (3, &enc(&[Message::Unknown { ty: 0x99 }])),
        (3, &enc(&[Message::Goodbye { code: Code::NO_ERROR, reason: "bye".into() }])),
        (6, &poll),
        (5, &[0x2a, 0xf8]),
        (6, &poll),
    ]));
    o.put("connected_control", &b);

    let mut b = vec![1];
    b.extend(records(&[(3, &bad_name_register(1)), (6, &poll), (5, &[0x27, 0x10]), (6, &poll)]));
    o.put("connected_bad_frame_reconnect", &b);
}

/// Seeds for relay_worker: `[flags]` + records (see the target's doc).
fn relay_worker() {
    let o = Out::target("relay_worker");
    let hello = |sw: &str| Message::Hello { version: ztna_control::wire::VERSION, software: sw.into() };
    let a_ctrl =
        enc(&[hello("ztna-agent/0.1.0"), Message::Register { request_id: 1, role: Role::Agent, service: svc("echo") }]);
    let b_ctrl = enc(&[
        hello("ztna-connector/0.1.0"),
        Message::Register { request_id: 1, role: Role::Connector, service: svc("echo") },
    ]);
    let dg = |flow: u32, p: &[u8]| {
        let mut d = Vec::new();
        datagram::encode_into(flow, p, &mut d);
        d
    };
    let req = udp(7, b"ping");
    let mut reply = Vec::new();
    packet::build_ipv4_udp(sa(SERVICE, 7), sa(AGENT, 40000), b"ping", &mut reply).unwrap();

    // Agent (A, flow 1) and connector (B: service handle 1, agent leg 2).
    let mut b = vec![3];
    b.extend(records(&[
        (1, &b_ctrl),
        (0, &a_ctrl),
        (2, &dg(1, &req)),
        (3, &dg(2, &reply)),
        (3, &dg(2000, &reply)),
        (2, &[0x40]),
        (0, &enc(&[Message::Unregister { flow: 1 }])),
        (2, &dg(1, &req)),
        (5, &[0x03, 0xe8]),
        (6 | 8, b""),
        (5, &[0x03, 0xe8]),
    ]));
    o.put("agent_connector_forwarding", &b);

    // Protocol errors.
    let mut b = vec![1];
    b.extend(records(&[(0, &enc(&[Message::Register { request_id: 1, role: Role::Agent, service: svc("echo") }]))]));
    o.put("register_before_hello", &b);
    let mut b = vec![1];
    b.extend(records(&[(0, &enc(&[Message::Hello { version: 2, software: String::new() }]))]));
    o.put("unsupported_version", &b);
    let mut b = vec![1];
    let mut s = enc(&[hello("x")]);
    s.extend(bad_name_register(5));
    s.extend(enc(&[Message::Unknown { ty: 0x80 }, Message::HelloAck { version: ztna_control::wire::VERSION }]));
    b.extend(records(&[(0, &s), (5, &[0, 200])]));
    o.put("bad_name_then_unexpected", &b);
    // Registration rate limit and many registrations.
    let mut s = enc(&[hello("x")]);
    for i in 0..12u32 {
        Message::Register { request_id: i + 1, role: Role::Agent, service: svc(&format!("s{i}")) }.encode(&mut s);
    }
    let mut b = vec![1];
    b.extend(records(&[(0, &s)]));
    o.put("registration_limits", &b);

    // Raw packets: an Initial of an unknown version (version negotiation),
    // a short header for no connection, garbage, a short Initial.
    let mut vn = vec![0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9];
    vn.resize(1200, 0);
    let mut short = vec![0x40, 0x0f, 0, 7, 0];
    short.resize(60, 0xab);
    let mut init = vec![0xc0, 0, 0, 0, 1, 16, 0x0f, 0, 7, 0];
    init.resize(40, 0x11);
    let mut b = vec![0];
    b.extend(records(&[
        (4, &[&[0x11u8, 0x51][..], &vn].concat()),
        (4, &[&[0u8, 1][..], &short].concat()),
        (4 | 8, &init),
        (4, b""),
    ]));
    o.put("raw_packets", &b);

    let mut b = vec![3];
    b.extend(records(&[(1, &b_ctrl), (0, &a_ctrl), (7, b""), (5, &[0, 150]), (0, &enc(&[hello("late")]))]));
    o.put("shutdown", &b);

    // Retry before every connection, then the same forwarding.
    let mut b = vec![3 | 4];
    b.extend(records(&[(1, &b_ctrl), (0, &a_ctrl), (2, &dg(1, &req)), (3, &dg(2, &reply))]));
    o.put("retry_forwarding", &b);

    // B is agent mallory: no policy rule names it.
    let mut b = vec![3 | 8];
    let m_ctrl = enc(&[
        hello("ztna-agent/0.1.0"),
        Message::Register { request_id: 1, role: Role::Connector, service: svc("echo") },
        Message::Register { request_id: 2, role: Role::Agent, service: svc("web") },
        Message::Register { request_id: 3, role: Role::Agent, service: svc("echo") },
    ]);
    b.extend(records(&[(0, &a_ctrl), (1, &m_ctrl), (3, &dg(1, &req))]));
    o.put("policy_denials", &b);

    // A connector refuses a flow (its allow-list): FlowClose from B.
    let mut b = vec![3];
    b.extend(records(&[
        (1, &b_ctrl),
        (0, &a_ctrl),
        (1, &enc(&[Message::FlowClose { flow: 2, code: Code::DENIED }])),
        (2, &dg(1, &req)),
        (1, &enc(&[Message::FlowClose { flow: 1, code: Code::DENIED }])),
    ]));
    o.put("connector_refuses_flow", &b);
}

fn config_files() {
    let o = Out::target("config_files");
    o.put("relay_dev.toml", b"listen = \"127.0.0.1:4500\"\nworkers = 2\ndev = true\n[limits]\nmax_registrations = 8\n");
    o.put(
        "relay_full.toml",
        br#"listen = "[::]:4433"
workers = 4
cert = "/etc/ztna/relay.pem"
key = "/etc/ztna/relay.key"
dev = false
trust_domain = "corp.example"
client_ca = "/etc/ztna/ca.pem"
policy = "/etc/ztna/policy.toml"
metrics = "127.0.0.1:9100"
io_backend = "auto"
steering = true
pin_cores = false
node_id = 3
shutdown_grace_ms = 2000

[limits]
max_conns_per_worker = 50000
max_registrations = 64
max_flows_per_conn = 65536
max_control_backlog = 262144
registrations_per_sec = 10
data_queue_depth = 8192
ctrl_queue_depth = 65536
max_conns = 100000
max_conns_per_ip = 1000
handshakes_per_sec_per_ip = 100
retry = "auto"
retry_above_handshakes_per_sec = 200
agent_datagrams_per_sec = 100000
agent_bytes_per_sec = 125000000
connector_datagrams_per_sec = 1000000
connector_bytes_per_sec = 1250000000
stateless_resets_per_sec = 100
"#,
    );
    o.put("relay_bad_key.toml", b"listen = \"127.0.0.1:4500\"\ndev = true\nworkerz = 2\n");
    o.put(
        "connector.toml",
        br#"relays = ["127.0.0.1:4433", "[::1]:4433"]
listen = "0.0.0.0:4434"
server_name = "relay.example"
ca = "/etc/ztna/ca.pem"
cert = "/etc/ztna/connector.pem"
key = "/etc/ztna/connector.key"
insecure = false
max_udp_flows = 4096
max_udp_flows_per_agent = 256
udp_idle_secs = 60
max_tcp_flows = 1024
max_tcp_per_flow = 64
max_tcp_connections = 2048
tcp_buffer_bytes = 262144
tcp_idle_secs = 600

[[service]]
name = "echo"
icmp = true
backend = [
  { protocol = "udp", port = 7, target = "127.0.0.1:7007" },
  { protocol = "tcp", port = 7, target = "127.0.0.1:7007" },
]

[[service]]
name = "web"
backend = [{ protocol = "tcp", port = 80, target = "[::1]:8080" }]
allow_agents = ["spiffe://corp.example/agent/alice"]
"#,
    );
    o.put("connector_bad.toml", b"relays = [\"127.0.0.1:4433\"]\ncert = \"c.pem\"\nkey = \"c.key\"\ntcp_buffer_bytes = 10\n[[service]]\nname = \"web\"\n");
    o.put(
        "agent.toml",
        br#"relay = "192.0.2.1:4433"
server_name = "relay.example"
ca = "/etc/ztna/ca.pem"
cert = "/etc/ztna/agent.pem"
key = "/etc/ztna/agent.key"

[tun]
name = "zt0"
address = "100.64.0.7/32"
mtu = 1280

[[service]]
name = "echo"
cidrs = ["100.100.0.10/32", "100.100.1.0/24"]

[[service]]
name = "db"
cidrs = ["fd00:64::/64"]
"#,
    );
    o.put(
        "agent_minimal.toml",
        b"relay = \"192.0.2.1:4433\"\ninsecure = true\ncert = \"a.pem\"\nkey = \"a.key\"\nlisten = \"0.0.0.0:0\"\n[[service]]\nname = \"all\"\ncidrs = [\"0.0.0.0/0\"]\n",
    );
    o.put(
        "policy.toml",
        br#"[groups]
engineering = ["alice", "spiffe://corp.example/agent/bob"]

[services.echo]
connectors = ["echo-1"]
agents = ["carol"]
groups = ["engineering"]

[services.web]
connectors = ["spiffe://corp.example/connector/wiki-1"]
agents = ["*"]
"#,
    );
    o.put("policy_unknown_group.toml", b"[services.echo]\nconnectors = [\"echo-1\"]\ngroups = [\"nobody\"]\n");
    o.put(
        "values.txt",
        b"100.100.0.10/32\nfd00::/64\n10.0.0.0/8\n::ffff:1.2.3.4/128\necho\nweb.internal-1_x\nspiffe://corp.example/agent/alice-laptop\nspiffe://corp.example/relay/r1\n",
    );
}

/// Seeds for retry_token: `[family][16 ip][port][dcid len][dcid][odcid
/// len][odcid][age][flip][trigger][token]` (see the target's doc).
fn retry_token() {
    let o = Out::target("retry_token");
    let seed =
        |family: u8, ip: &[u8], port: u16, dcid: &[u8], odcid: &[u8], age: u16, flip: u16, trig: u16, tok: &[u8]| {
            let mut b = vec![family];
            let mut a = [0u8; 16];
            a[..ip.len()].copy_from_slice(ip);
            b.extend_from_slice(&a);
            b.extend_from_slice(&port.to_be_bytes());
            b.push(dcid.len() as u8);
            b.extend_from_slice(dcid);
            b.push(odcid.len() as u8);
            b.extend_from_slice(odcid);
            b.extend_from_slice(&age.to_be_bytes());
            b.extend_from_slice(&flip.to_be_bytes());
            b.extend_from_slice(&trig.to_be_bytes());
            b.extend_from_slice(tok);
            b
        };
    let relay_cid = [0x0f, 0, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    // A token-shaped forgery: version 1, issued 5, 8-byte ODCID, zero MAC.
    let mut forged = vec![1, 0, 0, 0, 5, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    forged.extend_from_slice(&[0; 16]);
    o.put("v4_fresh", &seed(0, &[127, 0, 0, 1], 50000, &relay_cid, &[0xaa; 8], 3, 7, 1200, &forged));
    o.put("v6_expired", &seed(1, &[0x20, 0x01, 0x0d, 0xb8], 443, &relay_cid, &[0xbb; 20], 11, 40, 60, b""));
    o.put("long_cids", &seed(0, &[10, 0, 0, 1], 1, &[0xcc; 20], &[0xdd; 23], 0, 0, 22, &[1; 60]));
    o.put("empty_cids_small_trigger", &seed(0, &[10, 0, 0, 1], 65535, b"", b"", 10, 5, 21, &[1]));
}

fn peer_identity() {
    let o = Out::target("peer_identity");
    let dir = std::env::temp_dir().join(format!("ztna-gen-corpus-{}", std::process::id()));
    let ca = ztna_relay::pki::init_ca(&dir.join("ca"), "corp.example", 7).unwrap();
    let der = |pem: &Path| boring::x509::X509::from_pem(&std::fs::read(pem).unwrap()).unwrap().to_der().unwrap();
    for (name, uri, dns) in [
        ("agent_cert.der", "spiffe://corp.example/agent/alice-laptop", vec![]),
        ("relay_cert.der", "spiffe://corp.example/relay/r1", vec!["relay.example".to_owned()]),
        ("other_domain_cert.der", "spiffe://other.example/connector/db", vec![]),
    ] {
        let id = Identity::parse(uri).unwrap();
        let (cert, _) = ztna_relay::pki::issue(&ca, &id, &dns, &[], 7, &dir.join(name)).unwrap();
        o.put(name, &der(&cert));
    }
    o.put("ca_cert_no_uri.der", &der(&ca.cert));
    o.put("uri.txt", b"spiffe://corp.example/connector/db-1");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn main() {
    control_frames();
    datagram_corpus();
    let pkts = ip_packet();
    agent_c_api(&pkts);
    relay_worker();
    retry_token();
    config_files();
    peer_identity();
    println!("corpus written to {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
