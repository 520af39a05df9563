//! Helpers shared by the fuzz targets and the seed-corpus generator:
//! splitting one fuzz input into records, fixing up IPv4/UDP/TCP/ICMP
//! checksums (so mutated packets get past the checksum checks to the code
//! behind them), and in-process QUIC peers with a development certificate.

pub mod ip;
pub mod peer;
pub mod records;
