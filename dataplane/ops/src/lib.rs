//! What every ZTNA binary shares, so each exists once: the HTTP
//! health/metrics listener ([`http`]), the Prometheus recorder
//! ([`prometheus`]), systemd's readiness and watchdog protocol
//! ([`sdnotify`]), event-loop heartbeats ([`heartbeat`]), the
//! [`counters!`] macro, the logging and error-report set-up of the
//! binaries ([`logging`]), and reading a client's TLS files ([`tls`]).

mod counters;
pub mod heartbeat;
pub mod http;
pub mod logging;
pub mod prometheus;
pub mod sdnotify;
pub mod tls;
