//! `ztna-tune`: host settings for the relay workload.
//!
//! ```text
//! ztna-tune check [--profile pi|cloud] [--root DIR] [--ethtool CMD]   report (default profile: cloud)
//! ztna-tune apply --profile pi|cloud [--root DIR]                     write /etc/sysctl.d/90-ztna-relay.conf
//! ```
//! `--root` reads and writes under DIR instead of `/` (tests, images).
//! NIC offloads come from `ethtool -k IFACE`: run when the root is `/`, or
//! with `--ethtool CMD` (another ethtool, or a fixture in tests).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ztna_tuning::{nic::Level, Profile};

const USAGE: &str = "usage: ztna-tune check [--profile pi|cloud] [--root DIR] [--ethtool CMD] | \
                     ztna-tune apply --profile pi|cloud [--root DIR]";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "check".to_owned());
    let (mut profile, mut root, mut ethtool) = (None, PathBuf::from("/"), None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => {
                let v = args.next().context(USAGE)?;
                profile = Some(Profile::parse(&v).with_context(|| format!("unknown profile {v:?}; {USAGE}"))?);
            }
            "--root" => root = PathBuf::from(args.next().context(USAGE)?),
            "--ethtool" => ethtool = Some(args.next().context(USAGE)?),
            _ => bail!("unexpected argument {a:?}; {USAGE}"),
        }
    }
    match cmd.as_str() {
        "check" => {
            let profile = profile.unwrap_or(Profile::Cloud);
            println!("profile {}", profile.name());
            let (mut bad, mut nic_bad) = (0, 0);
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
            // ethtool reads the running host: under another root its answers
            // would describe the wrong interfaces.
            let ethtool = ethtool.or_else(|| (root == Path::new("/")).then(|| "ethtool".to_owned()));
            let ethtool_k =
                |iface: &str| ethtool.as_deref().and_then(|cmd| ztna_tuning::nic::run_ethtool_k(cmd, iface));
            for r in ztna_tuning::nic::check_nics(&root, &ethtool_k) {
                for (level, text) in ztna_tuning::nic::report_lines(&r) {
                    let mark = match level {
                        Level::Ok => "ok  ",
                        Level::Warn => "WARN",
                        Level::Info => "info",
                    };
                    println!("{mark} {text}");
                    nic_bad += usize::from(level == Level::Warn);
                }
            }
            if bad > 0 {
                println!(
                    "{bad} setting(s) below recommendation; `ztna-tune apply --profile {}` writes a sysctl.d file",
                    profile.name()
                );
            }
            if nic_bad > 0 {
                println!(
                    "{nic_bad} NIC setting(s) below recommendation; the lines say how (not persistent across reboots)"
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
