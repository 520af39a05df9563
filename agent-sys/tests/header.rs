//! The committed C header must match what cbindgen generates from the
//! source. `ZTNA_BLESS=1 cargo test -p ztna-agent-sys --test header`
//! rewrites it.

#[test]
fn committed_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("header generates")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("utf-8");
    let path = format!("{dir}/include/ztna_agent.h");
    if std::env::var_os("ZTNA_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "agent-sys/include/ztna_agent.h is stale: run `ZTNA_BLESS=1 cargo test -p ztna-agent-sys --test header`"
    );
}
