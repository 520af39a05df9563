//! `ztna-tune`: host settings for the relay workload.
//!
//! ```text
//! ztna-tune check [--profile pi|cloud] [--root DIR]   report (default profile: cloud)
//! ztna-tune apply --profile pi|cloud [--root DIR]     write /etc/sysctl.d/90-ztna-relay.conf
//! ```
//! `--root` reads and writes under DIR instead of `/` (tests, images).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ztna_tuning::Profile;

const USAGE: &str =
    "usage: ztna-tune check [--profile pi|cloud] [--root DIR] | ztna-tune apply --profile pi|cloud [--root DIR]";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "check".to_owned());
    let (mut profile, mut root) = (None, PathBuf::from("/"));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => {
                let v = args.next().context(USAGE)?;
                profile = Some(Profile::parse(&v).with_context(|| format!("unknown profile {v:?}; {USAGE}"))?);
            }
            "--root" => root = PathBuf::from(args.next().context(USAGE)?),
            _ => bail!("unexpected argument {a:?}; {USAGE}"),
        }
    }
    match cmd.as_str() {
        "check" => {
            let profile = profile.unwrap_or(Profile::Cloud);
            println!("profile {}", profile.name());
            let mut bad = 0;
            for f in ztna_tuning::check(&root, profile) {
                let v = f.value.map_or("unset".to_owned(), |v| v.to_string());
                let mark = if f.ok { "ok  " } else { "WARN" };
                println!("{mark} {:<32} {:>12}  (recommended: {}; {})", f.key, v, f.recommended, f.why);
                bad += usize::from(!f.ok);
            }
            for (cpu, gov) in ztna_tuning::slow_governors(&root) {
                println!("WARN {cpu} governor {gov:<12}  (recommended: performance; wake-up latency on bursts)");
                bad += 1;
            }
            if bad > 0 {
                println!(
                    "{bad} setting(s) below recommendation; `ztna-tune apply --profile {}` writes a sysctl.d file",
                    profile.name()
                );
            }
            Ok(())
        }
        "apply" => {
            let profile = profile.context("apply needs --profile pi|cloud")?;
            let path = ztna_tuning::apply(&root, profile).context("writing the sysctl.d file")?;
            println!("wrote {}; load it with `sysctl --system`", path.display());
            Ok(())
        }
        other => bail!("unknown command {other}; {USAGE}"),
    }
}
