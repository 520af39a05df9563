//! Progress of a run: a bar on a terminal (indicatif), one line a second
//! otherwise (logs, CI), both on stderr.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// How a run reports its progress.
pub enum Progress {
    Off,
    Lines,
    Bar(ProgressBar),
}

impl Progress {
    /// For a send phase of `total`; `enabled` false: nothing.
    pub fn new(total: Duration, enabled: bool) -> Progress {
        if !enabled {
            return Progress::Off;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        let bar = ProgressBar::new(total.as_millis() as u64);
        let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress::Bar(bar)
    }

    /// `elapsed` into the send phase; `line` says how it goes.
    pub fn update(&self, elapsed: Duration, line: &str) {
        match self {
            Progress::Off => {}
            Progress::Lines => {
                let _ = writeln!(std::io::stderr(), "[{:>5.1}s] {line}", elapsed.as_secs_f64());
            }
            Progress::Bar(b) => {
                b.set_position(elapsed.as_millis() as u64);
                b.set_message(line.to_owned());
            }
        }
    }

    /// Clears the bar (the report follows).
    pub fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}
