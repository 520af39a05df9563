//! `ztna-tune check [ROOT]`: report host settings for the relay workload.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("check") | None => {
            let root = args.get(2).map_or("/", String::as_str);
            let mut bad = 0;
            for f in ztna_tuning::check(std::path::Path::new(root)) {
                let v = f.value.map_or("unset".to_owned(), |v| v.to_string());
                let mark = if f.ok { "ok  " } else { "WARN" };
                println!("{mark} {:<32} {:>12}  (recommended {}: {})", f.key, v, f.recommended, f.why);
                bad += usize::from(!f.ok);
            }
            if bad > 0 {
                println!("{bad} setting(s) below recommendation");
            }
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown command {other}; usage: ztna-tune check [ROOT]"),
    }
}
