//! systemd's readiness and watchdog protocol (`sd_notify(3)`), without
//! libsystemd: datagrams such as `READY=1` to the socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Every
//! call is a no-op when the variable is unset, so the binaries behave the
//! same outside systemd.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

/// Where notifications go.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; None outside systemd (or with `Type=` other
    /// than notify).
    pub fn from_env() -> Option<Notifier> {
        let v = std::env::var_os("NOTIFY_SOCKET")?;
        Notifier::new(&v.to_string_lossy())
    }

    /// `path`, or `@name` for the abstract namespace.
    pub fn new(socket: &str) -> Option<Notifier> {
        let target = match socket.strip_prefix('@') {
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            None if socket.starts_with('/') => Target::Path(PathBuf::from(socket)),
            None => return None,
        };
        Some(Notifier { target })
    }

    /// Sends one state string, e.g. `READY=1` or `STOPPING=1`.
    pub fn notify(&self, state: &str) -> Result<()> {
        let sock = UnixDatagram::unbound()?;
        match &self.target {
            Target::Path(p) => sock.send_to(state.as_bytes(), p).map(drop),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr).map(drop)
            }
        }
        .context("sd_notify")
    }
}

/// The watchdog interval systemd asks for (`$WATCHDOG_USEC`, for this
/// process per `$WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `READY=1` now and, when systemd runs a watchdog, `WATCHDOG=1` at
/// half its interval for as long as `alive()` holds (a stuck worker stops
/// the pings and systemd restarts the service). No-op outside systemd.
pub fn ready_with_watchdog(alive: Arc<dyn Fn() -> bool + Send + Sync>) -> Result<()> {
    let Some(n) = Notifier::from_env() else { return Ok(()) };
    n.notify("READY=1")?;
    if let Some(every) = watchdog_interval() {
        std::thread::Builder::new().name("sd-watchdog".into()).spawn(move || loop {
            std::thread::sleep(every / 2);
            if alive() {
                let _ = n.notify("WATCHDOG=1");
            }
        })?;
    }
    Ok(())
}

/// `STOPPING=1` (start of a drain); no-op outside systemd.
pub fn stopping() {
    if let Some(n) = Notifier::from_env() {
        let _ = n.notify("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    #[test]
    fn path_and_abstract_sockets_receive_states() {
        let dir = std::env::temp_dir().join(format!("ztna-sdnotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.to_str().unwrap()).unwrap().notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ztna-sdnotify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx2 = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(&format!("@{name}")).unwrap().notify("STOPPING=1").unwrap();
        let n = rx2.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(Notifier::new("relative/path").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
