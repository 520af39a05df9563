//! `ztna-bench`: see the library for the commands.

use std::process::ExitCode;

use clap::Parser;
use ztna_bench::cli::{main_with, Cli};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    match main_with(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ztna-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
