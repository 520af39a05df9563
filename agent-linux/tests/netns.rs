#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! End-to-end tests of the Linux agent in network namespaces: the real
//! `ztna-agent` (TUN device, routes), `ztna-relay`, `ztna-connector` and an
//! echo service, each in its own namespace, the agent behind a NAT.
//!
//! ```text
//!  agent ns                 nat ns                      wan ns (bridge br0)
//!  zt0 100.64.0.1/32        lan0 10.201.1.1/24          ├── relay ns eth0 10.201.0.2  ztna-relay :4433
//!  eth0 10.201.1.2/24 ───── wan0 10.201.0.1/24 ─────────┤
//!  ztna-agent               nft masquerade on wan0      └── site ns  eth0 10.201.0.3  ztna-connector
//!                           (+ 5% loss rules later)                                   echo on 127.0.0.1:7007
//! ```
//!
//! `agent_through_nat_relay_restart_and_loss`: ping and UDP echo to the
//! service VIP, the observed address is the NAT's, an unmapped destination
//! is dropped in the agent (agent counters and relay metrics), the agent
//! reconnects after a relay restart, UDP and ping under 5% loss each way.
//! `tcp_10mb_through_tunnel_with_uplink_loss`: 10 MB through a kernel TCP
//! socket and the connector's userspace TCP, verified, with 5% loss on the
//! NAT's outgoing uplink. Both run in parallel in about 10-15 s.
//!
//! Every namespace is created by the test with a name carrying the test
//! process id and deleted by a Drop guard whatever happens; child
//! processes are killed first. Only private addresses inside these
//! namespaces are used; the root namespace's interfaces, routes and
//! firewall are never touched. Needs root, iproute2, nftables and ping;
//! without root the tests are skipped with a message (under CI=true they
//! fail instead).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RELAY_IP: &str = "10.201.0.2";
const NAT_WAN_IP: &str = "10.201.0.1";
const AGENT_IP: &str = "10.201.1.2";
const SITE_IP: &str = "10.201.0.3";
/// The echo service's virtual address, routed into the agent's TUN.
const VIP: &str = "100.100.0.10";
/// Inside the agent's TUN route (the test adds 100.100.0.0/24) but in no
/// service: the agent must drop it.
const UNMAPPED: &str = "100.100.0.99";

// ---------------------------------------------------------------- helpers

fn target_dir() -> PathBuf {
    // target/<profile>/deps/netns-<hash> → target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn workspace_bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(p.exists(), "{} missing: run `cargo build --workspace --bins` first (scripts/test.sh does)", p.display());
    p
}

/// True when the tests can run; prints why not otherwise.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "nft", "ping"].iter().all(|t| Command::new(t).arg("-V").output().is_ok());
    if root && tools {
        return true;
    }
    let why = if root { "ip, nft or ping missing (scripts/install-deps.sh)" } else { "not root" };
    assert!(std::env::var("CI").is_err(), "netns tests cannot run under CI: {why}");
    eprintln!("SKIPPED: network-namespace tests need root, iproute2, nftables and ping ({why})");
    false
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    ok(Command::new("ip").args(args))
}

fn in_ns(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(prog).env("NO_COLOR", "1");
    c
}

/// Runs `f` on a thread that joined namespace `ns` (setns affects only the
/// calling thread; sockets keep the namespace they were created in).
fn with_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        // SAFETY: `fd` is an open network-namespace file; setns changes the
        // namespace of this (short-lived) thread only.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// A child process in a namespace; stdout and stderr lines are collected.
/// Killed (SIGKILL) on drop if still running; its output is printed when
/// the test is failing.
struct Proc {
    name: String,
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

fn collect(r: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
}

impl Proc {
    fn spawn(ns: &str, name: &str, prog: &Path, args: &[&str]) -> Proc {
        let mut child = in_ns(ns, prog)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let (out, err) = (Arc::default(), Arc::default());
        collect(child.stdout.take().unwrap(), Arc::clone(&out));
        collect(child.stderr.take().unwrap(), Arc::clone(&err));
        Proc { name: name.to_owned(), child, out, err }
    }

    fn out_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// First stdout line at index ≥ `from` that satisfies `pred`.
    fn wait_out(&mut self, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        Self::wait(&self.out, from, timeout, pred)
    }

    fn wait_err(&mut self, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        Self::wait(&self.err, from, timeout, pred)
    }

    fn wait(lines: &Mutex<Vec<String>>, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = lines.lock().unwrap().iter().skip(from).find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs the
        // program, so the pid is the program's).
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// SIGTERM, then wait up to `grace` (SIGKILL after that).
    fn stop(&mut self, grace: Duration) -> bool {
        self.signal(libc::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // Let the reader threads finish the last lines.
            std::thread::sleep(Duration::from_millis(50));
            let tail = |v: &Mutex<Vec<String>>| {
                let v = v.lock().unwrap();
                v.iter().skip(v.len().saturating_sub(60)).cloned().collect::<Vec<_>>().join("\n")
            };
            eprintln!("----- {} stdout -----\n{}", self.name, tail(&self.out));
            eprintln!("----- {} stderr -----\n{}", self.name, tail(&self.err));
        }
    }
}

/// The namespaces of one test and a scratch directory; deleted on drop.
struct Lab {
    agent: String,
    nat: String,
    wan: String,
    relay: String,
    site: String,
    dir: PathBuf,
}

const PREFIX: &str = "ztna-e2e-";

/// Deletes namespaces left by earlier test processes that were killed
/// before their guards ran (names carry the pid; only dead pids).
fn reap_stale_namespaces() {
    let list = ip(&["netns", "list"]);
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(Command::new("ip").args(["netns", "del", name]));
        }
    }
}

impl Lab {
    fn new(test: &str) -> Lab {
        reap_stale_namespaces();
        let ns = |role: &str| format!("{PREFIX}{}-{test}-{role}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{PREFIX}{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab { agent: ns("agent"), nat: ns("nat"), wan: ns("wan"), relay: ns("relay"), site: ns("site"), dir };
        // From here on, Drop cleans up whatever was created.
        for n in lab.all() {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let (a, n, w, r, s) = (&lab.agent, &lab.nat, &lab.wan, &lab.relay, &lab.site);
        // The wan segment: a bridge in its own namespace.
        ip(&["-n", w, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", w, "link", "set", "br0", "up"]);
        // Every veth is created inside a test namespace, never in the root.
        ip(&["-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", n]);
        ip(&["-n", n, "link", "add", "wan0", "type", "veth", "peer", "name", "p-nat", "netns", w]);
        ip(&["-n", r, "link", "add", "eth0", "type", "veth", "peer", "name", "p-relay", "netns", w]);
        ip(&["-n", s, "link", "add", "eth0", "type", "veth", "peer", "name", "p-site", "netns", w]);
        for port in ["p-nat", "p-relay", "p-site"] {
            ip(&["-n", w, "link", "set", port, "master", "br0", "up"]);
        }
        let addr = |ns: &str, dev: &str, cidr: &str| {
            ip(&["-n", ns, "addr", "add", cidr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        };
        addr(a, "eth0", &format!("{AGENT_IP}/24"));
        addr(n, "lan0", "10.201.1.1/24");
        addr(n, "wan0", &format!("{NAT_WAN_IP}/24"));
        addr(r, "eth0", &format!("{RELAY_IP}/24"));
        addr(s, "eth0", &format!("{SITE_IP}/24"));
        // Only the agent has a default route (to its NAT); the relay cannot
        // reach 10.201.1.0/24 except through the NAT's translation.
        ip(&["-n", a, "route", "add", "default", "via", "10.201.1.1"]);
        ok(in_ns(n, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        lab.nft(n, "table ip ztna_nat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan0\" masquerade\n }\n}\n");
        lab
    }

    fn all(&self) -> [&String; 5] {
        [&self.agent, &self.nat, &self.wan, &self.relay, &self.site]
    }

    fn nft(&self, ns: &str, ruleset: &str) {
        let f = self.dir.join("rules.nft");
        std::fs::write(&f, ruleset).unwrap();
        ok(in_ns(ns, "nft").arg("-f").arg(&f));
    }

    /// 5% random loss on the NAT's uplink (no netem here): on packets
    /// leaving through it, and with `both` also on packets arriving.
    fn add_uplink_loss(&self, both: bool) {
        let inbound = if both { "  iifname \"wan0\" numgen random mod 100 < 5 counter drop\n" } else { "" };
        self.nft(
            &self.nat,
            &format!(
                "table ip ztna_loss {{\n chain uplink_loss {{\n  type filter hook forward priority 0; policy accept;\n  \
                 oifname \"wan0\" numgen random mod 100 < 5 counter drop\n{inbound} }}\n}}\n"
            ),
        );
    }

    /// Packets the loss rules dropped so far.
    fn loss_drops(&self) -> u64 {
        let t = ok(in_ns(&self.nat, "nft").args(["list", "table", "ip", "ztna_loss"]));
        let words: Vec<&str> = t.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in self.all() {
            let _ = run(Command::new("ip").args(["netns", "del", n]));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `stats k=v …` line → map.
fn parse_stats(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Asks the agent for its counters (SIGUSR1) and returns them.
fn agent_stats(agent: &mut Proc) -> HashMap<String, u64> {
    let from = agent.out_len();
    agent.signal(libc::SIGUSR1);
    let line = agent.wait_out(from, Duration::from_secs(5), |l| l.starts_with("stats ")).expect("agent prints stats");
    parse_stats(&line)
}

/// Sum of a counter over the relay's workers, from its Prometheus
/// endpoint inside the relay namespace.
fn relay_counter(lab: &Lab, metrics: SocketAddr, name: &'static str) -> u64 {
    let text = with_netns(&lab.relay, move || {
        let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    });
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Bins {
    relay: PathBuf,
    connector: PathBuf,
    bench: PathBuf,
    agent: PathBuf,
}

fn bins() -> Bins {
    Bins {
        relay: workspace_bin("ztna-relay"),
        connector: workspace_bin("ztna-connector"),
        bench: workspace_bin("ztna-bench"),
        agent: PathBuf::from(env!("CARGO_BIN_EXE_ztna-agent")),
    }
}

/// The relay with a fixed certificate (so a restart keeps the CA the
/// clients trust), mutual TLS against the same CA, a policy letting
/// connector `site` serve `echo` to agents `laptop` and `phone`, one
/// worker, metrics on the wan address.
fn start_relay(lab: &Lab, b: &Bins, pki: &ztna_dataplane::pki::DevPki) -> Proc {
    start_relay_at(lab, b, pki, RELAY_IP)
}

fn start_relay_at(lab: &Lab, b: &Bins, pki: &ztna_dataplane::pki::DevPki, ip: &str) -> Proc {
    let policy =
        lab.write("policy.toml", "[services.echo]\nconnectors = [\"site\"]\nagents = [\"laptop\", \"phone\"]\n");
    let mut relay = Proc::spawn(
        &lab.relay,
        &format!("relay {ip}"),
        &b.relay,
        &[
            "--listen",
            &format!("{ip}:4433"),
            "--cert",
            pki.cert.to_str().unwrap(),
            "--key",
            pki.key.to_str().unwrap(),
            "--client-ca",
            pki.ca.to_str().unwrap(),
            "--trust-domain",
            ztna_dataplane::pki::DEV_TRUST_DOMAIN,
            "--policy",
            policy.to_str().unwrap(),
            "--workers",
            "1",
            "--metrics",
            &format!("{ip}:9090"),
        ],
    );
    relay.wait_out(0, Duration::from_secs(10), |l| l.starts_with("listening on")).expect("relay listening");
    relay
}

/// Everything up to an agent registered for `echo`.
struct Running {
    pki: ztna_dataplane::pki::DevPki,
    relay: Proc,
    connector: Proc,
    agent: Proc,
    _echo: Proc,
}

fn bring_up(lab: &Lab, b: &Bins) -> Running {
    let pki = ztna_dataplane::pki::generate(&lab.dir).unwrap();
    let (ccert, ckey) = pki.issue(ztna_control::identity::Kind::Connector, "site").unwrap();
    let (acert, akey) = pki.issue(ztna_control::identity::Kind::Agent, "laptop").unwrap();
    let relay = start_relay(lab, b, &pki);

    let mut echo =
        Proc::spawn(&lab.site, "echo", &b.bench, &["echo", "--udp", "127.0.0.1:7007", "--tcp", "127.0.0.1:7007"]);
    echo.wait_out(0, Duration::from_secs(10), |l| l.starts_with("echo udp")).expect("echo service up");

    let ccfg = lab.write(
        "connector.toml",
        &format!(
            "relays = [\"{RELAY_IP}:4433\"]\nlisten = \"{SITE_IP}:4434\"\nserver_name = \"localhost\"\nca = \"{}\"\n\
             cert = \"{}\"\nkey = \"{}\"\n\n\
             [[service]]\nname = \"echo\"\nicmp = true\n\n\
             [[service.backend]]\nprotocol = \"udp\"\nport = 7\ntarget = \"127.0.0.1:7007\"\n\n\
             [[service.backend]]\nprotocol = \"tcp\"\nport = 7\ntarget = \"127.0.0.1:7007\"\n",
            pki.ca.display(),
            ccert.display(),
            ckey.display()
        ),
    );
    let mut connector = Proc::spawn(&lab.site, "connector", &b.connector, &["--config", ccfg.to_str().unwrap()]);
    connector.wait_err(0, Duration::from_secs(10), |l| l.contains("registered")).expect("connector registered");

    let acfg = lab.write(
        "agent.toml",
        &format!(
            "relay = \"{RELAY_IP}:4433\"\nserver_name = \"localhost\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [tun]\nname = \"zt0\"\naddress = \"100.64.0.1/32\"\nmtu = 1280\n\n\
             [[service]]\nname = \"echo\"\ncidrs = [\"{VIP}/32\"]\n",
            pki.ca.display(),
            acert.display(),
            akey.display()
        ),
    );
    ok(Command::new(&b.agent).args(["check-config", "--config", acfg.to_str().unwrap()]));
    let mut agent = Proc::spawn(&lab.agent, "agent", &b.agent, &["--config", acfg.to_str().unwrap()]);
    agent.wait_out(0, Duration::from_secs(15), |l| l.starts_with("registered echo")).expect("agent registered");
    Running { pki, relay, connector, agent, _echo: echo }
}

/// `ping -c N` from the agent namespace; returns replies received.
fn ping(lab: &Lab, to: &str, count: u32) -> u32 {
    ping_from(&lab.agent, to, count)
}

fn ping_from(ns: &str, to: &str, count: u32) -> u32 {
    let out = run(in_ns(ns, "ping").args(["-n", "-q", "-c", &count.to_string(), "-i", "0.2", "-W", "1", to]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" packets transmitted, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// `ztna-bench udp-probe` from the agent namespace to the VIP's echo port.
fn udp_probe(lab: &Lab, b: &Bins, count: u32, interval_ms: u32) -> (u64, u64) {
    udp_probe_from(&lab.agent, &b.bench, count, interval_ms)
}

fn udp_probe_from(ns: &str, bench: &Path, count: u32, interval_ms: u32) -> (u64, u64) {
    let out = run(in_ns(ns, bench).args([
        "udp-probe",
        "--to",
        &format!("{VIP}:7"),
        "--count",
        &count.to_string(),
        "--size",
        "200",
        "--interval-ms",
        &interval_ms.to_string(),
        "--wait-ms",
        "1500",
        "--min",
        "0",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("udp-probe "))
        .unwrap_or_else(|| panic!("udp-probe printed no result: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let m = parse_stats(line);
    (m["sent"], m["received"])
}

// ------------------------------------------------------------------ tests

/// Ping and UDP echo through NAT → relay → connector; the observed address
/// is the NAT's; an unmapped destination never leaves the agent; the agent
/// survives a relay restart; traffic flows with 5% loss on the uplink.
#[test]
fn agent_through_nat_relay_restart_and_loss() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let b = bins();
    let lab = Lab::new("main");
    let Running { pki, mut relay, mut connector, mut agent, _echo } = bring_up(&lab, &b);
    eprintln!("up after {:?}", t0.elapsed());

    // The relay sees the NAT's public side, not the agent's address.
    let obs = agent.wait_out(0, Duration::from_secs(5), |l| l.starts_with("observed address ")).expect("observed");
    let obs: SocketAddr = obs.trim_start_matches("observed address ").parse().unwrap();
    assert_eq!(obs.ip().to_string(), NAT_WAN_IP, "observed address is the NAT's wan side");
    assert_ne!(obs.ip().to_string(), AGENT_IP);

    // ICMP echo, answered by the connector.
    assert_eq!(ping(&lab, VIP, 3), 3, "ping {VIP} through the tunnel");

    // UDP echo through the tunnel to the backend.
    let (sent, got) = udp_probe(&lab, &b, 50, 5);
    assert_eq!((sent, got), (50, 50), "UDP echo without loss");

    // An unmapped destination inside the TUN's routes never leaves the
    // agent: the agent counts it, sends nothing, the relay forwards nothing.
    ip(&["-n", &lab.agent, "route", "add", "100.100.0.0/24", "dev", "zt0"]);
    let metrics: SocketAddr = format!("{RELAY_IP}:9090").parse().unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // relay publishes counters every second
    let fwd_before = relay_counter(&lab, metrics, "ztna_relay_datagrams_forwarded_total");
    let before = agent_stats(&mut agent);
    assert_eq!(ping(&lab, UNMAPPED, 3), 0, "no reply from an unmapped destination");
    let after = agent_stats(&mut agent);
    std::thread::sleep(Duration::from_millis(1100));
    let fwd_after = relay_counter(&lab, metrics, "ztna_relay_datagrams_forwarded_total");
    // 3 pings and 50 datagrams, each forwarded both ways.
    assert!(fwd_before >= 106, "relay counted the earlier traffic ({fwd_before})");
    assert!(after["drop_unmapped"] >= before["drop_unmapped"] + 3, "unmapped drops counted: {before:?} → {after:?}");
    assert_eq!(after["packets_out"], before["packets_out"], "nothing tunneled for the unmapped destination");
    assert_eq!(fwd_after, fwd_before, "the relay forwarded nothing meanwhile");
    eprintln!("checks before restart done after {:?}", t0.elapsed());

    // Relay restart on the same address with the same certificate: agent
    // and connector reconnect with backoff, traffic resumes.
    let (a_mark, c_mark) = (agent.out_len(), connector.err.lock().unwrap().len());
    assert!(relay.stop(Duration::from_secs(5)), "relay exits cleanly on SIGTERM");
    agent
        .wait_out(a_mark, Duration::from_secs(5), |l| l.starts_with("disconnected retry_in_ms="))
        .expect("agent disconnect");
    let restart = Instant::now();
    relay = start_relay(&lab, &b, &pki);
    connector.wait_err(c_mark, Duration::from_secs(20), |l| l.contains("registered")).expect("connector re-registered");
    agent.wait_out(a_mark, Duration::from_secs(20), |l| l.starts_with("registered echo")).expect("agent re-registered");
    eprintln!("agent re-registered {:?} after the relay restart", restart.elapsed());
    assert_eq!(ping(&lab, VIP, 3), 3, "ping after the relay restart");
    let (_, got) = udp_probe(&lab, &b, 20, 5);
    assert_eq!(got, 20, "UDP echo after the relay restart");
    let s = agent_stats(&mut agent);
    assert!(s["connects"] >= 2 && s["disconnects"] >= 1, "reconnect counted: {s:?}");

    // 5% random loss each way on the NAT's uplink: traffic still flows.
    lab.add_uplink_loss(true);
    let (sent, got) = udp_probe(&lab, &b, 200, 5);
    eprintln!("UDP echo under 5% loss each way: {got}/{sent}");
    assert!(got * 100 >= sent * 70, "UDP echo under 5% loss each way: {got}/{sent}");
    assert!(lab.loss_drops() > 0, "the loss rules dropped packets");
    let replies = ping(&lab, VIP, 5);
    assert!(replies >= 1, "ping under loss: {replies}/5");

    // Clean exit: SIGTERM prints final counters and removes the device.
    let mark = agent.out_len();
    assert!(agent.stop(Duration::from_secs(5)), "agent exits cleanly on SIGTERM");
    assert!(agent.wait_out(mark, Duration::from_secs(1), |l| l.starts_with("stats ")).is_some(), "final stats");
    let links = ip(&["-n", &lab.agent, "link", "show"]);
    assert!(!links.contains("zt0"), "TUN device gone after exit: {links}");
    let routes = ip(&["-n", &lab.agent, "route", "show"]);
    assert!(!routes.contains("100.100.0."), "routes gone with the device: {routes}");
    drop(relay);
    eprintln!("total {:?}", t0.elapsed());
}

/// `ztna-bench tcp-probe` from the agent namespace: `bytes` through the
/// VIP's TCP echo port, verified byte for byte. Returns (verified, line).
fn tcp_probe(lab: &Lab, b: &Bins, bytes: u64, timeout_s: u32) -> (bool, String) {
    tcp_probe_from(&lab.agent, &b.bench, bytes, None, timeout_s)
}

fn tcp_probe_from(ns: &str, bench: &Path, bytes: u64, rate_kbps: Option<u64>, timeout_s: u32) -> (bool, String) {
    let rate = rate_kbps.map(|r| r.to_string());
    let mut args = vec!["tcp-probe", "--to", &format!("{VIP}:7")].into_iter().map(str::to_owned).collect::<Vec<_>>();
    args.extend(["--bytes".into(), bytes.to_string(), "--timeout".into(), timeout_s.to_string()]);
    if let Some(r) = rate {
        args.extend(["--rate-kbps".into(), r]);
    }
    let out = run(in_ns(ns, bench).args(&args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("tcp-probe "))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("tcp-probe printed no result: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success() && line.contains("verified=true"), line)
}

/// 1 MB without loss, then 10 MB with 5% loss, through a TCP connection
/// from a real socket in the agent namespace (kernel TCP → TUN → agent →
/// relay → connector's userspace TCP → backend echo, and back); every byte
/// verified.
fn tcp_10mb(test: &str, loss_both_ways: bool, timeout_s: u32) {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let b = bins();
    let lab = Lab::new(test);
    let Running { pki: _pki, relay: _relay, connector: _connector, mut agent, _echo } = bring_up(&lab, &b);
    let (ok, line) = tcp_probe(&lab, &b, 1_000_000, 20);
    eprintln!("{line} (no loss)");
    assert!(ok, "1 MB TCP echo without loss: {line}");
    lab.add_uplink_loss(loss_both_ways);
    let (ok, line) = tcp_probe(&lab, &b, 10_000_000, timeout_s);
    eprintln!("{line} (5% loss, both ways: {loss_both_ways})");
    assert!(ok, "10 MB TCP echo under 5% loss: {line}");
    let dropped = lab.loss_drops();
    eprintln!("loss rule dropped {dropped} packets");
    assert!(dropped > 100, "the loss rule dropped packets ({dropped})");
    let s = agent_stats(&mut agent);
    assert_eq!(s["drop_too_large"], 0, "the TUN MTU fits the tunnel: {s:?}");
    eprintln!("total {:?}", t0.elapsed());
}

/// 5% loss on packets leaving the NAT through its uplink (agent → relay:
/// the upload and the agent's ACKs).
#[test]
fn tcp_10mb_through_tunnel_with_uplink_loss() {
    tcp_10mb("tcp", false, 40);
}

/// 5% loss both ways on the uplink: the echo's return leg (the connector's
/// smoltcp as the sender) loses segments too. Known slow: 10 MB took 40 s+
/// and did not finish in some runs (smoltcp retransmits go-back-N from the
/// first unacknowledged byte and doubles its RTO up to 10 s on repeated
/// losses), so it is outside the default run.
#[test]
#[ignore = "slow: connector-side TCP recovers poorly from downstream loss; run with --ignored"]
fn tcp_10mb_through_tunnel_with_loss_both_ways() {
    tcp_10mb("tcpboth", true, 120);
}

// ------------------------------------------------------- scale-out, drain

const RELAY2_IP: &str = "10.201.0.4";
const PHONE_IP: &str = "10.201.0.5";
/// What a Kubernetes headless Service would be: one name, every relay.
const RELAYS_NAME: &str = "relays.ztna.test";

/// A namespace beyond the lab's five, and its `/etc/netns/<ns>` directory
/// (files there are bind-mounted over `/etc` by `ip netns exec`); both
/// removed on drop.
struct ExtraNs(String);

impl Drop for ExtraNs {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

/// `/etc/netns/<ns>`: per-namespace /etc files, removed on drop.
struct EtcNetns(PathBuf);

impl EtcNetns {
    fn hosts(ns: &str, text: &str) -> EtcNetns {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), text).unwrap();
        EtcNetns(dir)
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn agent_config(lab: &Lab, pki: &ztna_dataplane::pki::DevPki, name: &str, relay: &str, fallback: &str) -> PathBuf {
    let (cert, key) = pki.issue(ztna_control::identity::Kind::Agent, name).unwrap();
    lab.write(
        &format!("agent-{name}.toml"),
        &format!(
            "relay = \"{relay}:4433\"\nfallback_relays = [\"{fallback}:4433\"]\nserver_name = \"localhost\"\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [tun]\nname = \"zt0\"\naddress = \"100.64.0.1/32\"\nmtu = 1280\n\n\
             [[service]]\nname = \"echo\"\ncidrs = [\"{VIP}/32\"]\n",
            pki.ca.display(),
            cert.display(),
            key.display()
        ),
    )
}

fn count_lines(lines: &Mutex<Vec<String>>, pred: impl Fn(&str) -> bool) -> usize {
    lines.lock().unwrap().iter().filter(|l| pred(l)).count()
}

fn wait_count(lines: &Mutex<Vec<String>>, n: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if count_lines(lines, &pred) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn http_get_in(ns: &str, addr: SocketAddr, path: &'static str) -> (u16, String) {
    with_netns(ns, move || ztna_dataplane::http::get(addr, path).unwrap_or((0, String::new())))
}

/// Scale-out as on Kubernetes: two relays; the connector finds both
/// through one DNS name (a headless Service: here a per-namespace hosts
/// file) and registers at each; agent `laptop` starts on relay 1 and agent
/// `phone` on relay 2, each with the other relay as fallback. SIGTERM on
/// relay 1 drains it: the laptop moves to relay 2 (the loss during the
/// move is measured) and its TCP stream carries on, relay 1 exits early.
/// After relay 1 is back, SIGKILL on relay 2: both agents notice when the
/// relay stays silent (15 s) and resume through relay 1.
#[test]
fn two_relays_connector_on_both_drain_and_failover() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let b = bins();
    let lab = Lab::new("scale");
    let pki = ztna_dataplane::pki::generate(&lab.dir).unwrap();
    // Relay 2 shares the relay namespace; the phone sits on the wan bridge
    // without NAT.
    ip(&["-n", &lab.relay, "addr", "add", &format!("{RELAY2_IP}/24"), "dev", "eth0"]);
    let phone = ExtraNs(lab.agent.replace("-agent", "-phone"));
    ip(&["netns", "add", &phone.0]);
    ip(&["-n", &phone.0, "link", "set", "lo", "up"]);
    ip(&["-n", &phone.0, "link", "add", "eth0", "type", "veth", "peer", "name", "p-phone", "netns", &lab.wan]);
    ip(&["-n", &lab.wan, "link", "set", "p-phone", "master", "br0", "up"]);
    ip(&["-n", &phone.0, "addr", "add", &format!("{PHONE_IP}/24"), "dev", "eth0"]);
    ip(&["-n", &phone.0, "link", "set", "eth0", "up"]);
    let _hosts = EtcNetns::hosts(
        &lab.site,
        &format!("127.0.0.1 localhost\n{RELAY_IP} {RELAYS_NAME}\n{RELAY2_IP} {RELAYS_NAME}\n"),
    );

    let mut relay1 = start_relay_at(&lab, &b, &pki, RELAY_IP);
    let relay2 = start_relay_at(&lab, &b, &pki, RELAY2_IP);
    let mut echo =
        Proc::spawn(&lab.site, "echo", &b.bench, &["echo", "--udp", "127.0.0.1:7007", "--tcp", "127.0.0.1:7007"]);
    echo.wait_out(0, Duration::from_secs(10), |l| l.starts_with("echo udp")).expect("echo service up");
    let (ccert, ckey) = pki.issue(ztna_control::identity::Kind::Connector, "site").unwrap();
    let ccfg = lab.write(
        "connector.toml",
        &format!(
            "relays = [\"{RELAYS_NAME}:4433\"]\nlisten = \"{SITE_IP}:4434\"\nhealth = \"{SITE_IP}:9091\"\n\
             server_name = \"localhost\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [[service]]\nname = \"echo\"\nicmp = true\n\n\
             [[service.backend]]\nprotocol = \"udp\"\nport = 7\ntarget = \"127.0.0.1:7007\"\n\n\
             [[service.backend]]\nprotocol = \"tcp\"\nport = 7\ntarget = \"localhost:7007\"\n",
            pki.ca.display(),
            ccert.display(),
            ckey.display()
        ),
    );
    let connector = Proc::spawn(&lab.site, "connector", &b.connector, &["--config", ccfg.to_str().unwrap()]);
    let registered = |l: &str| l.contains(" registered ");
    assert!(wait_count(&connector.err, 2, Duration::from_secs(15), registered), "connector registered at both relays");
    let health: SocketAddr = format!("{SITE_IP}:9091").parse().unwrap();
    assert_eq!(http_get_in(&lab.site, health, "/readyz").0, 200, "connector ready");
    let (_, m) = http_get_in(&lab.site, health, "/metrics");
    assert!(m.lines().any(|l| l == "ztna_connector_relays_connected 2"), "{m}");

    let lcfg = agent_config(&lab, &pki, "laptop", RELAY_IP, RELAY2_IP);
    let pcfg = agent_config(&lab, &pki, "phone", RELAY2_IP, RELAY_IP);
    let mut laptop = Proc::spawn(&lab.agent, "laptop", &b.agent, &["--config", lcfg.to_str().unwrap()]);
    let mut phone_agent = Proc::spawn(&phone.0, "phone", &b.agent, &["--config", pcfg.to_str().unwrap()]);
    let reg = |l: &str| l.starts_with("registered echo");
    laptop.wait_out(0, Duration::from_secs(15), reg).expect("laptop registered");
    phone_agent.wait_out(0, Duration::from_secs(15), reg).expect("phone registered");
    assert_eq!(ping_from(&lab.agent, VIP, 3), 3, "laptop through relay 1");
    assert_eq!(ping_from(&phone.0, VIP, 3), 3, "phone through relay 2");
    let m1: SocketAddr = format!("{RELAY_IP}:9090").parse().unwrap();
    let m2: SocketAddr = format!("{RELAY2_IP}:9090").parse().unwrap();
    assert_eq!(http_get_in(&lab.relay, m1, "/readyz").0, 200);
    eprintln!("two relays up after {:?}", t0.elapsed());

    // Drain relay 1 while the laptop sends 100 datagrams a second and
    // streams 1.2 MB over one TCP connection at 400 kB/s.
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let probe = std::thread::spawn(move || udp_probe_from(&ns, &bench, 300, 10));
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let stream = std::thread::spawn(move || tcp_probe_from(&ns, &bench, 1_200_000, Some(400), 30));
    std::thread::sleep(Duration::from_millis(1000));
    let mark = laptop.out_len();
    let drain = Instant::now();
    relay1.signal(libc::SIGTERM);
    laptop.wait_out(mark, Duration::from_secs(10), reg).expect("laptop re-registered at relay 2");
    let moved = drain.elapsed();
    assert!(
        laptop.wait_err(0, Duration::from_secs(1), |l| l.contains("new UDP socket")).is_some(),
        "after the Goodbye the laptop reconnects from a new source port"
    );
    let exit = loop {
        if let Ok(Some(st)) = relay1.child.try_wait() {
            break st;
        }
        assert!(drain.elapsed() < Duration::from_secs(8), "relay 1 did not exit before its grace period");
        std::thread::sleep(Duration::from_millis(20));
    };
    let exited = drain.elapsed();
    assert!(exit.success(), "relay 1 exit status {exit}");
    let (sent, got) = probe.join().unwrap();
    eprintln!(
        "drain: laptop registered at relay 2 after {moved:?}; relay 1 exited after {exited:?}; \
         UDP echo during the drain {got}/{sent} at 10 ms spacing"
    );
    // Typically 3-22 lost (30-220 ms); the bound leaves room for a loaded CI machine.
    assert!(got + 100 >= sent, "at most 1 s of datagrams lost while moving: {got}/{sent}");
    // The TCP connection survives the move: the connector parked its state
    // when the laptop left relay 1 and adopted it for the laptop's new flow.
    let (ok, line) = stream.join().unwrap();
    eprintln!("drain: TCP stream across the move: {line}");
    assert!(ok, "the TCP stream survives the drain: {line}");
    let (_, m) = http_get_in(&lab.site, health, "/metrics");
    assert!(m.lines().any(|l| l == "ztna_connector_flows_adopted_total 1"), "{m}");
    assert_eq!(ping_from(&lab.agent, VIP, 3), 3, "laptop through relay 2");
    assert_eq!(ping_from(&phone.0, VIP, 3), 3, "phone unaffected");
    std::thread::sleep(Duration::from_millis(1100)); // metrics publish once a second
    assert_eq!(relay_counter(&lab, m2, "ztna_relay_connections"), 3, "relay 2: connector, laptop, phone");

    // Relay 1 back; the connector reconnects to it (same DNS name).
    let before = count_lines(&connector.err, registered);
    relay1 = start_relay_at(&lab, &b, &pki, RELAY_IP);
    assert!(
        wait_count(&connector.err, before + 1, Duration::from_secs(30), registered),
        "connector registered at the restarted relay 1"
    );
    // Hard failure of relay 2: no Goodbye; the agents notice when nothing
    // (not even an ACK of a keepalive PING) arrived for the silence timeout
    // and move to their next relay, before the QUIC idle timeout.
    let (lm, pm) = (laptop.out_len(), phone_agent.out_len());
    // A TCP stream that must survive the failure (stalled until the move).
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let stream = std::thread::spawn(move || tcp_probe_from(&ns, &bench, 400_000, Some(100), 90));
    std::thread::sleep(Duration::from_millis(1000));
    let kill = Instant::now();
    relay2.signal(libc::SIGKILL);
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let silence = ztna_control::client::ClientConfig::new(any, any, "relay").silence_timeout;
    let idle = Duration::from_millis(ztna_control::quic::IDLE_TIMEOUT_MS);
    laptop.wait_out(lm, idle + Duration::from_secs(15), reg).expect("laptop resumed through relay 1");
    phone_agent.wait_out(pm, idle + Duration::from_secs(15), reg).expect("phone resumed through relay 1");
    let failover = kill.elapsed();
    assert!(failover < idle, "noticed by the silence timeout ({silence:?}), not the idle timeout: {failover:?}");
    assert_eq!(ping_from(&lab.agent, VIP, 3), 3, "laptop through relay 1 after the failure");
    assert_eq!(ping_from(&phone.0, VIP, 3), 3, "phone through relay 1 after the failure");
    let (ok, line) = stream.join().unwrap();
    eprintln!("hard failure: both agents resumed through relay 1 after {failover:?}; TCP stream: {line}");
    assert!(ok, "the TCP stream survives the relay failure: {line}");
    let (_, m) = http_get_in(&lab.site, health, "/metrics");
    assert!(m.lines().any(|l| l == "ztna_connector_flows_adopted_total 2"), "{m}");
    eprintln!("total {:?}", t0.elapsed());
    drop(relay1);
}
