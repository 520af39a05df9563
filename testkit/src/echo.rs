//! UDP and TCP echo servers, for tests, the benchmark and the demo.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

/// Counters of an echo server.
#[derive(Debug, Default)]
pub struct EchoStats {
    pub udp_datagrams: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_bytes: AtomicU64,
}

/// A running echo server pair; stops when dropped.
pub struct EchoServer {
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub stats: Arc<EchoStats>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    /// Starts UDP and TCP echo on `udp` and `tcp` (port 0: ephemeral).
    pub fn start(udp: SocketAddr, tcp: SocketAddr) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EchoStats::default());
        let us = UdpSocket::bind(udp)?;
        us.set_read_timeout(Some(Duration::from_millis(100)))?;
        let udp_addr = us.local_addr()?;
        let tl = TcpListener::bind(tcp)?;
        tl.set_nonblocking(true)?;
        let tcp_addr = tl.local_addr()?;
        {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::Builder::new().name("echo-udp".into()).spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Acquire) {
                    if let Ok((n, from)) = us.recv_from(&mut buf) {
                        if let Some(b) = buf.get(..n) {
                            let _ = us.send_to(b, from);
                            stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })?;
        }
        {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::Builder::new().name("echo-tcp".into()).spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match tl.accept() {
                        Ok((mut s, _)) => {
                            stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
                            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
                            let _ = std::thread::Builder::new().name("echo-tcp-conn".into()).spawn(move || {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                                let mut buf = vec![0u8; 65_536];
                                while !stop.load(Ordering::Acquire) {
                                    match s.read(&mut buf) {
                                        Ok(0) => break,
                                        Ok(n) => {
                                            if s.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                                                break;
                                            }
                                            stats.tcp_bytes.fetch_add(n as u64, Ordering::Relaxed);
                                        }
                                        Err(e)
                                            if matches!(
                                                e.kind(),
                                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                            ) => {}
                                        Err(_) => break,
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        }
        Ok(EchoServer { udp_addr, tcp_addr, stats, stop })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
