//! `ztna-bench`: see the library for the commands.

use std::process::ExitCode;

use clap::Parser;
use ztna_bench::cli::{main_with, Cli};

fn main() -> ExitCode {
    ztna_ops::logging::init("error", ztna_ops::logging::LogFormat::Text);
    match main_with(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ztna-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
