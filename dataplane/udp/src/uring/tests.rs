//! Tests of the io_uring backend on loopback: receive modes, GSO sends,
//! GRO receives and the run-time GSO fallback.
use super::*;

fn pool(n: usize) -> SendPool {
    SendPool::new(n)
}

#[test]
fn uncommitted_buffers_are_not_leaked() {
    let mut p = pool(4);
    // The worker asks for a buffer after every connection, including
    // the ones that turn out to have nothing to send.
    for _ in 0..1000 {
        let _ = p.buf();
    }
    for i in 0..4 {
        p.buf()[0] = i;
        p.commit(10, "127.0.0.1:9".parse().unwrap());
    }
    assert_eq!(p.ready.len(), 4);
    assert_eq!(p.dropped, 0);
    // A fifth packet in the same turn has no slot: dropped and counted.
    let _ = p.buf();
    p.commit(10, "127.0.0.1:9".parse().unwrap());
    assert_eq!(p.dropped, 1);
}

#[test]
fn ring_receives_and_sends_on_loopback() {
    for multishot in [true, false] {
        loopback_round_trip(multishot);
    }
}

fn loopback_round_trip(multishot: bool) {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    // SAFETY: test-only eventfd, closed when the test ends.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    let mut u = Uring::with_receive_mode(server, efd, multishot).unwrap();
    assert_eq!(u.multi.is_some(), multishot, "this kernel supports provided-buffer rings");
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    // More datagrams than single-shot slots and than one batch.
    for i in 0..10u8 {
        peer.send_to(&[i; 100], addr).unwrap();
    }
    let got = poll_until(&mut u, 10);
    assert_eq!(got.len(), 10);
    let from = got[0].1;
    assert_eq!(from, peer.local_addr().unwrap());
    echo(&mut u, &got);
    let mut buf = [0u8; 200];
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..10u8 {
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(buf[..n], [i; 100], "every datagram, in order");
    }
    let st = u.offload();
    if !offload::allowed() {
        assert_eq!((st.gso, st.gro, st.gso_sends), (false, false, 0), "ZTNA_UDP_OFFLOAD=off: {st:?}");
        return;
    }
    assert_eq!((st.gso, st.gso_sends, st.gso_segments), (true, 1, 10), "ten equal sends, one GSO send: {st:?}");
    assert_eq!(st.gro, multishot, "GRO only with provided buffers");
}

fn poll_until(u: &mut Uring, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut got = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while got.len() < want && std::time::Instant::now() < end {
        u.poll(Duration::from_millis(50), &mut |b, from, _| got.push((b.to_vec(), from))).unwrap();
    }
    got
}

fn echo(u: &mut Uring, got: &[(Vec<u8>, SocketAddr)]) {
    for (b, from) in got {
        let t = u.transmit();
        t.buf()[..b.len()].copy_from_slice(b);
        t.commit(b.len(), *from);
    }
    u.flush().unwrap();
}

fn ring(server: UdpSocket) -> Uring {
    // SAFETY: test-only eventfd, closed when the test ends.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    Uring::new(server, efd).unwrap()
}

#[test]
fn coalesced_receives_are_split_into_their_datagrams() {
    if !offload::allowed() {
        return; // ZTNA_UDP_OFFLOAD=off: nothing is coalesced.
    }
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let mut u = ring(server);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_nonblocking(true).unwrap();
    // The peer sends with GSO: on loopback the coalesced datagram
    // reaches a GRO socket whole.
    let mut tx = crate::batch::Batch::new(32);
    assert!(tx.enable_gso(&peer));
    let lens: Vec<usize> = [1200; 30].into_iter().chain([333]).collect();
    for (i, len) in lens.iter().enumerate() {
        tx.slot().unwrap()[..*len].fill(i as u8);
        tx.commit(*len, Some(addr));
    }
    assert!(tx.flush(&peer).unwrap());
    let got = poll_until(&mut u, lens.len());
    assert_eq!(got.iter().map(|(d, _)| d.len()).collect::<Vec<_>>(), lens);
    assert!(got.iter().enumerate().all(|(i, (d, _))| d.iter().all(|b| *b == i as u8)));
    let st = u.offload();
    assert!(st.gro && st.gro_receives >= 1 && st.gro_segments >= 2, "{st:?}");
}

#[test]
fn a_refused_gso_send_is_sent_again_one_by_one() {
    if !offload::allowed() {
        return; // ZTNA_UDP_OFFLOAD=off: no GSO to refuse.
    }
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    // Without UDP checksums the kernel refuses segmented sends (EINVAL),
    // as a device without checksum offload does (EIO).
    assert!(crate::offload::setsockopt_int(server.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1));
    let mut u = ring(server);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..8u8 {
        peer.send_to(&[i; 900], addr).unwrap();
    }
    let got = poll_until(&mut u, 8);
    echo(&mut u, &got);
    // The refusal arrives as a completion; the next turns resend.
    peer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 2000];
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while back.len() < 8 && std::time::Instant::now() < end {
        u.poll(Duration::from_millis(10), &mut |_, _, _| {}).unwrap();
        u.flush().unwrap();
        while let Ok((n, _)) = peer.recv_from(&mut buf) {
            back.push(buf[..n].to_vec());
        }
    }
    assert_eq!(back, (0..8u8).map(|i| vec![i; 900]).collect::<Vec<_>>(), "all eight, in order");
    let st = u.offload();
    assert_eq!((st.gso, st.gso_errors, st.gso_sends), (true, 1, 0), "EINVAL: sent one by one, GSO kept: {st:?}");
}
