//! The lab: its namespaces (a bridge, a NAT), commands run in them, and
//! the processes started there.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{AGENT_IP, NAT_WAN_IP, RELAY_IP, SITE_IP};

pub fn target_dir() -> PathBuf {
    // target/<profile>/deps/netns-<hash> → target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn workspace_bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(p.exists(), "{} missing: run `cargo build --workspace --bins` first (scripts/test.sh does)", p.display());
    p
}

/// True when the tests can run; prints why not otherwise.
pub fn can_run() -> bool {
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

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    out
}

pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ip(args: &[&str]) -> String {
    ok(Command::new("ip").args(args))
}

pub fn in_ns(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(prog).env("NO_COLOR", "1");
    c
}

/// Runs `f` on a thread that joined namespace `ns` (setns affects only the
/// calling thread; sockets keep the namespace they were created in).
pub fn with_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
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
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub out: Arc<Mutex<Vec<String>>>,
    pub err: Arc<Mutex<Vec<String>>>,
}

pub fn collect(r: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
}

impl Proc {
    pub fn spawn(ns: &str, name: &str, prog: &Path, args: &[&str]) -> Proc {
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

    pub fn out_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// First stdout line at index ≥ `from` that satisfies `pred`.
    pub fn wait_out(&mut self, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        Self::wait(&self.out, from, timeout, pred)
    }

    pub fn wait_err(&mut self, from: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        Self::wait(&self.err, from, timeout, pred)
    }

    pub fn wait(
        lines: &Mutex<Vec<String>>,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
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

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs the
        // program, so the pid is the program's).
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// SIGTERM, then wait up to `grace` (SIGKILL after that).
    pub fn stop(&mut self, grace: Duration) -> bool {
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
pub struct Lab {
    pub agent: String,
    pub nat: String,
    pub wan: String,
    pub relay: String,
    pub site: String,
    pub dir: PathBuf,
}

pub const PREFIX: &str = "ztna-e2e-";

/// Deletes namespaces left by earlier test processes that were killed
/// before their guards ran (names carry the pid; only dead pids).
pub fn reap_stale_namespaces() {
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
    pub fn new(test: &str) -> Lab {
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

    pub fn all(&self) -> [&String; 5] {
        [&self.agent, &self.nat, &self.wan, &self.relay, &self.site]
    }

    pub fn nft(&self, ns: &str, ruleset: &str) {
        let f = self.dir.join("rules.nft");
        std::fs::write(&f, ruleset).unwrap();
        ok(in_ns(ns, "nft").arg("-f").arg(&f));
    }

    /// 5% random loss on the NAT's uplink (no netem here): on packets
    /// leaving through it, and with `both` also on packets arriving.
    pub fn add_uplink_loss(&self, both: bool) {
        let inbound = if both { "  iifname \"wan0\" numgen random mod 100 < 5 counter drop\n" } else { "" };
        self.nft(
            &self.nat,
            &format!(
                "table ip ztna_loss {{\n chain uplink_loss {{\n  type filter hook forward priority 0; policy accept;\n  \
                 oifname \"wan0\" numgen random mod 100 < 5 counter drop\n{inbound} }}\n}}\n"
            ),
        );
    }

    /// Drops every UDP datagram the NAT forwards between the agent's side
    /// and `ip` (a firewall closing a direct path); [`Lab::unblock`] ends it.
    pub fn block(&self, ip: &str) {
        self.nft(
            &self.nat,
            &format!(
                "table ip ztna_block {{\n chain block_direct {{\n  type filter hook forward priority -10; policy accept;\n  \
                 ip daddr {ip} udp dport != 4433 counter drop\n  ip saddr {ip} udp sport != 4433 counter drop\n }}\n}}\n"
            ),
        );
    }

    pub fn unblock(&self) {
        ok(in_ns(&self.nat, "nft").args(["delete", "table", "ip", "ztna_block"]));
    }

    /// Packets the loss rules dropped so far.
    pub fn loss_drops(&self) -> u64 {
        let t = ok(in_ns(&self.nat, "nft").args(["list", "table", "ip", "ztna_loss"]));
        let words: Vec<&str> = t.split_whitespace().collect();
        words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
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
