//! A small HTTP/1.1 endpoint for probes and scrapes (`/metrics`,
//! `/healthz`, `/readyz`). One request per connection (`Connection:
//! close`), GET and HEAD only, the request head bounded to 8 KiB and read
//! with a 2 s timeout, at most [`MAX_CLIENTS`] connections at once (more
//! are closed at once). It is meant for a kubelet and a Prometheus on a
//! private address, not for the Internet.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

/// Concurrent connections served; more are dropped.
pub const MAX_CLIENTS: usize = 16;
/// Largest request head read.
pub const MAX_HEAD: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What a handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
}

/// Maps a path (query stripped) to a response; `None` is 404.
pub type Handler = dyn Fn(&str) -> Option<Response> + Send + Sync;

/// Binds `addr` and serves `handler` on a background thread. Returns the
/// bound address (useful with port 0).
pub fn serve(addr: SocketAddr, name: &str, handler: Arc<Handler>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding HTTP listener {addr}"))?;
    let local = listener.local_addr()?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name(format!("{name}-http")).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else {
                // EMFILE and friends: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                active.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: closes the connection
            }
            let handler = Arc::clone(&handler);
            let active2 = Arc::clone(&active);
            let spawned = std::thread::Builder::new().name("http-conn".into()).spawn(move || {
                let _ = handle(stream, handler.as_ref());
                active2.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })?;
    Ok(local)
}

fn handle(mut s: TcpStream, handler: &Handler) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // One deadline for the whole head, not per read: a client trickling
    // bytes cannot hold a slot for long.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if head.len() > MAX_HEAD {
            return respond(&mut s, &Response::text(431, "request head too large\n"), true);
        }
    }
    let (resp, with_body) = route(&head, handler);
    respond(&mut s, &resp, with_body)
}

/// Parses the request line and picks the response; the bool is false for
/// HEAD (headers only).
fn route(head: &[u8], handler: &Handler) -> (Response, bool) {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return (Response::text(400, "bad request\n"), true);
    };
    if !version.starts_with("HTTP/1.") {
        return (Response::text(400, "bad request\n"), true);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (Response::text(405, "only GET and HEAD\n"), true);
    }
    let path = target.split('?').next().unwrap_or_default();
    (handler(path).unwrap_or_else(|| Response::text(404, "not found\n")), !head_only)
}

fn respond(s: &mut TcpStream, r: &Response, with_body: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(r.body.as_bytes());
    }
    s.write_all(&out)?;
    s.flush()
}

/// Health answers shared by the relay and the connector: `/healthz` is
/// 200 while `alive`, `/readyz` 200 while `ready`, each 503 otherwise.
pub fn probe(path: &str, alive: bool, ready: bool) -> Option<Response> {
    let ok = |b: bool, yes: &str, no: &str| if b { Response::text(200, yes) } else { Response::text(503, no) };
    match path {
        "/healthz" => Some(ok(alive, "ok\n", "unhealthy\n")),
        "/readyz" => Some(ok(alive && ready, "ready\n", "not ready\n")),
        _ => None,
    }
}

/// GET `path` from `addr`: `(status, body)`. For tests and `check` tools.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    fn start() -> SocketAddr {
        let h: Arc<Handler> = Arc::new(|p: &str| match p {
            "/hello" => Some(Response::text(200, "hi\n")),
            other => probe(other, true, false),
        });
        serve("127.0.0.1:0".parse().unwrap(), "test", h).unwrap()
    }

    #[test]
    fn routes_and_errors() {
        let a = start();
        assert_eq!(get(a, "/hello?x=1").unwrap(), (200, "hi\n".to_owned()));
        assert_eq!(get(a, "/healthz").unwrap().0, 200);
        assert_eq!(get(a, "/readyz").unwrap(), (503, "not ready\n".to_owned()));
        assert_eq!(get(a, "/nope").unwrap().0, 404);
        // Other methods, garbage and oversized heads get a status, not a hang.
        let raw = |req: &[u8]| {
            let mut s = TcpStream::connect(a).unwrap();
            s.write_all(req).unwrap();
            let mut t = String::new();
            s.read_to_string(&mut t).unwrap();
            t
        };
        assert!(raw(b"POST /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(raw(b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let head = raw(b"HEAD /hello HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head:?}");
        let mut big = b"GET /hello HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(raw(&big).starts_with("HTTP/1.1 431"));
    }

    /// A client trickling its request head is cut off at one deadline for
    /// the whole head, not kept alive by each byte.
    #[test]
    fn a_trickling_client_is_closed_at_the_head_deadline() {
        let a = start();
        let mut s = TcpStream::connect(a).unwrap();
        let t = std::time::Instant::now();
        let mut closed = false;
        for b in b"GET /healthz HTTP/1.1\r\nX: ".iter().cycle().take(40) {
            if s.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        let mut rest = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_end(&mut rest);
        assert!(closed || rest.is_empty(), "no answer to an unfinished head");
        // 40 bytes at 150 ms would take 6 s: the 2 s deadline ends it first.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(get(a, "/healthz").unwrap().0, 200);
    }

    /// Keeps `n` idle connections to `addr` open (round robin over
    /// `sources`), reopening each one the server closes, until dropped.
    pub(crate) struct IdleFlood {
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<usize>>,
    }

    impl IdleFlood {
        pub(crate) fn start(addr: SocketAddr, sources: &[std::net::IpAddr], n: usize) -> IdleFlood {
            use std::sync::atomic::AtomicBool;
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = Arc::clone(&stop);
            let sources = sources.to_vec();
            let open = move |i: usize| -> Option<TcpStream> {
                let src = SocketAddr::new(sources[i % sources.len()], 0);
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
                s.bind(&src.into()).ok()?;
                s.connect_timeout(&addr.into(), Duration::from_millis(500)).ok()?;
                let s: TcpStream = s.into();
                s.set_nonblocking(true).ok()?;
                Some(s)
            };
            let thread = std::thread::spawn(move || {
                let mut held: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
                let mut opened = 0;
                while !stop2.load(Ordering::Relaxed) {
                    for (i, slot) in held.iter_mut().enumerate() {
                        let closed = match slot {
                            None => true,
                            Some(s) => {
                                let mut b = [0u8; 64];
                                match s.read(&mut b) {
                                    Ok(_) => true, // EOF (or an answer: it is done)
                                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                                }
                            }
                        };
                        if closed {
                            *slot = open(i);
                            opened += usize::from(slot.is_some());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                opened
            });
            // Let the flood fill the listener before anyone probes.
            std::thread::sleep(Duration::from_millis(300));
            IdleFlood { stop, thread: Some(thread) }
        }

        /// Stops the flood; returns how many connections it opened.
        pub(crate) fn stop(mut self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take().map(|t| t.join().unwrap()).unwrap_or(0)
        }
    }

    impl Drop for IdleFlood {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// `n` probes of `/healthz`, `gap` apart: how many got 200 within
    /// `within`.
    fn probes_answered(a: SocketAddr, n: usize, gap: Duration, within: Duration) -> usize {
        (0..n)
            .filter(|_| {
                std::thread::sleep(gap);
                let t = std::time::Instant::now();
                let ok = get(a, "/healthz").map(|(s, _)| s == 200).unwrap_or(false);
                ok && t.elapsed() < within
            })
            .count()
    }

    fn loopback(last: u8) -> std::net::IpAddr {
        std::net::Ipv4Addr::new(127, 0, 0, last).into()
    }

    /// 40 idle connections from ten other loopback addresses, reopened as
    /// soon as they are closed, do not keep `/healthz` from answering
    /// (the old listener: 16 slots held for 2 s each, the rest closed at
    /// once, failed nearly every probe).
    #[test]
    fn health_answers_under_an_idle_flood_from_many_sources() {
        let a = start();
        let sources: Vec<_> = (2..12).map(loopback).collect();
        let flood = IdleFlood::start(a, &sources, 40);
        let ok = probes_answered(a, 20, Duration::from_millis(150), Duration::from_millis(500));
        let opened = flood.stop();
        assert_eq!(ok, 20, "probes answered 200 (flood opened {opened} connections)");
        assert!(opened >= 40, "the flood held its connections: {opened}");
    }

    /// The same flood from the prober's own address.
    #[test]
    fn health_answers_under_an_idle_flood_from_one_source() {
        let a = start();
        let flood = IdleFlood::start(a, &[loopback(1)], 40);
        let ok = probes_answered(a, 20, Duration::from_millis(150), Duration::from_millis(500));
        let opened = flood.stop();
        assert_eq!(ok, 20, "probes answered 200 (flood opened {opened} connections)");
    }

    #[test]
    fn a_silent_client_does_not_block_others() {
        let a = start();
        let _idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(a).unwrap()).collect();
        assert_eq!(get(a, "/healthz").unwrap().0, 200);
    }
}
