//! Classic BPF program for SO_ATTACH_REUSEPORT_CBPF.
//!
//! For UDP the kernel runs a reuseport program with the packet positioned at
//! the UDP payload and uses its return value as the index of the socket in
//! the reuseport group (sockets are indexed in bind order). The program
//! computes what [`owner`] computes in software: one byte of the DCID (at
//! an offset the engine chooses, `cid_byte`) modulo the number of sockets. A failed load (packet too short) returns 0, and an
//! index out of range makes the kernel fall back to its hash; both are then
//! corrected in software by the cross-worker hand-off.

use std::io;
use std::os::fd::AsRawFd;

// Classic BPF opcodes (linux/filter.h).
const BPF_LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const BPF_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const BPF_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
const BPF_RET_A: u16 = 0x16; // BPF_RET | BPF_A

/// Offset of DCID byte `cid_byte` in a short-header packet (DCID at 1).
pub fn short_offset(cid_byte: u8) -> usize {
    1 + usize::from(cid_byte)
}

/// Offset of DCID byte `cid_byte` in a long-header packet (DCID at 6).
pub fn long_offset(cid_byte: u8) -> usize {
    6 + usize::from(cid_byte)
}

/// The socket of a group of `sockets` that owns `packet`: DCID byte
/// `cid_byte` modulo `sockets` (None if the packet is too short). The BPF
/// [`program`] computes the same in the kernel.
pub fn owner(packet: &[u8], sockets: usize, cid_byte: u8) -> Option<usize> {
    let first = *packet.first()?;
    let offset = if first & 0x80 != 0 { long_offset(cid_byte) } else { short_offset(cid_byte) };
    let b = *packet.get(offset)?;
    Some(usize::from(b) % sockets.max(1))
}

/// The steering program for `workers` sockets, by DCID byte `cid_byte`.
pub fn program(workers: u32, cid_byte: u8) -> Vec<libc::sock_filter> {
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        // 0: A = payload[0]
        ins(BPF_LD_B_ABS, 0, 0, 0),
        // 1: long header (0x80 set)? -> 2 else -> 4
        ins(BPF_JSET_K, 0, 2, 0x80),
        // 2: A = payload[6 + cid_byte]
        ins(BPF_LD_B_ABS, 0, 0, long_offset(cid_byte) as u32),
        // 3: -> 5
        ins(BPF_JA, 0, 0, 1),
        // 4: A = payload[1 + cid_byte]
        ins(BPF_LD_B_ABS, 0, 0, short_offset(cid_byte) as u32),
        // 5: A %= workers
        ins(BPF_MOD_K, 0, 0, workers.max(1)),
        // 6: return A
        ins(BPF_RET_A, 0, 0, 0),
    ]
}

/// Attaches the steering program (by DCID byte `cid_byte`) to the
/// reuseport group of `socket`.
pub fn attach(socket: &impl AsRawFd, workers: u32, cid_byte: u8) -> io::Result<()> {
    let mut prog = program(workers, cid_byte);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel
    // copies the program during setsockopt and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for exactly the opcodes we emit, to check the
    /// program agrees with [`owner`] on every packet shape.
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                BPF_LD_B_ABS => match pkt.get(i.k as usize) {
                    Some(b) => a = u32::from(*b),
                    None => return 0,
                },
                BPF_JSET_K => {
                    pc += if a & i.k != 0 { i.jt as usize } else { i.jf as usize };
                }
                BPF_JA => pc += i.k as usize,
                BPF_MOD_K => a %= i.k,
                BPF_RET_A => return a,
                c => panic!("unexpected opcode {c:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn program_matches_software_owner() {
        for cid_byte in [0u8, 3, 7] {
            for workers in 1..=8u32 {
                let prog = program(workers, cid_byte);
                for first in [0x40u8, 0x41, 0xc0, 0xc3, 0xe0] {
                    for b in 0..=255u8 {
                        let mut pkt = vec![first; 32];
                        pkt[short_offset(cid_byte)] = b;
                        pkt[long_offset(cid_byte)] = b.wrapping_add(1);
                        let expect = owner(&pkt, workers as usize, cid_byte).unwrap() as u32;
                        assert_eq!(run(&prog, &pkt), expect);
                    }
                }
            }
        }
    }

    #[test]
    fn attaches_to_a_real_reuseport_socket() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        attach(&s, 2, 3).unwrap();
    }
}
