pub mod bpf;
pub mod cid;
pub mod io;
pub mod mesh;
pub mod routing;
pub mod stats;
pub mod worker;
