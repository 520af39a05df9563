//! The binaries' logging set-up and how they report a fatal error.

use std::io::IsTerminal;
use std::process::ExitCode;

/// How log lines are written: `text` for people (colour only on a
/// terminal), `json` (one object per line: timestamp, level, target,
/// fields) for log shippers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`, e.g.
/// `"info"`), in `format`. Text has colour only when stderr is a terminal,
/// so files and journald get plain text. Every binary calls this once,
/// first thing after parsing its command line.
pub fn init(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().with_ansi(false).flatten_event(true).init(),
    }
}

/// The cause chain of `e` as the binaries print it: `Error: …` and one
/// `Caused by: …` line per cause; never a backtrace, whatever
/// `RUST_BACKTRACE` says.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut out = format!("Error: {e}");
    for cause in e.chain().skip(1) {
        out.push_str(&format!("\n  Caused by: {cause}"));
    }
    out
}

/// What a binary's `main` returns: success, or the error's cause chain on
/// stderr ([`error_report`]) and exit status 1.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_report(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_the_cause_chain_without_a_backtrace() {
        std::env::set_var("RUST_BACKTRACE", "1");
        let e = anyhow::anyhow!("invalid type: string, expected u64").context("parsing relay.toml");
        let r = error_report(&e);
        assert_eq!(r, "Error: parsing relay.toml\n  Caused by: invalid type: string, expected u64");
        assert!(!r.contains("backtrace") && !r.contains("at src/"), "{r}");
    }
}
