//! The binaries without a lab (no root needed): `check-config` of the
//! agent, the connector and the relay refuses each kind of bad TLS
//! material with a message naming it, and logs captured from a pipe carry
//! no terminal escape codes (text) or are one JSON object per line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ztna_control::identity::{Identity, Kind};
use ztna_relay::pki::{self, DevPki};

use crate::lab::workspace_bin;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// A file name part for a (certificate, key) pair: each config its own file.
fn stem(cert: &Path, key: &Path) -> String {
    let name = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let parent = |p: &Path| p.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
    format!("{}-{}-{}", parent(cert), name(cert), name(key))
}

fn agent_toml(dir: &Path, pki: &DevPki, cert: &Path, key: &Path) -> PathBuf {
    let body = format!(
        "relay = \"192.0.2.1:4433\"\nserver_name = \"192.0.2.1\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [[service]]\nname = \"echo\"\ncidrs = [\"100.100.0.10/32\"]\n",
        pki.ca.display(),
        cert.display(),
        key.display()
    );
    write(dir, &format!("agent-{}.toml", stem(cert, key)), &body)
}

fn connector_toml(dir: &Path, pki: &DevPki, cert: &Path, key: &Path) -> PathBuf {
    let body = format!(
        "relays = [\"relay.example.org:4433\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[[service]]\nname = \"echo\"\n",
        pki.ca.display(),
        cert.display(),
        key.display()
    );
    write(dir, &format!("connector-{}.toml", stem(cert, key)), &body)
}

fn check(bin: &Path, config: &Path) -> Output {
    Command::new(bin).args(["check-config", "--config"]).arg(config).output().unwrap()
}

#[test]
fn check_config_refuses_bad_tls_material_and_says_what_is_wrong() {
    let pki = pki::generate(&std::env::temp_dir()).unwrap();
    let dir = pki.dir.clone();
    let (agent, agent_key) = pki.issue(Kind::Agent, "laptop").unwrap();
    let (conn, conn_key) = pki.issue(Kind::Connector, "site").unwrap();
    let expired = (dir.join("expired.pem"), dir.join("expired.key"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let past = (now - 10 * 86400, now - 86400);
    pki::issue_raw(&pki.ca_files, &["spiffe://dev.ztna/agent/old"], past, &expired.0, &expired.1).unwrap();
    let other = pki::generate(&std::env::temp_dir()).unwrap();
    let (foreign, foreign_key) = other.issue(Kind::Agent, "laptop").unwrap();
    let (a, c) = (PathBuf::from(env!("CARGO_BIN_EXE_ztna-agent")), workspace_bin("ztna-connector"));

    let good = check(&a, &agent_toml(&dir, &pki, &agent, &agent_key));
    assert!(good.status.success(), "{}", text(&good));
    assert!(text(&good).contains("certificate: spiffe://dev.ztna/agent/laptop"), "{}", text(&good));
    let good = check(&c, &connector_toml(&dir, &pki, &conn, &conn_key));
    assert!(good.status.success(), "{}", text(&good));
    assert!(text(&good).contains("server name relay.example.org"), "{}", text(&good));

    for (bin, cfg, want) in [
        (&a, agent_toml(&dir, &pki, &conn, &conn_key), "this program needs an agent identity"),
        (&a, agent_toml(&dir, &pki, &agent, &conn_key), "does not belong to the certificate"),
        (&a, agent_toml(&dir, &pki, &expired.0, &expired.1), "has expired"),
        (&a, agent_toml(&dir, &pki, &foreign, &foreign_key), "does not verify the certificate"),
        (&c, connector_toml(&dir, &pki, &agent, &agent_key), "this program needs a connector identity"),
        (&c, connector_toml(&dir, &pki, &pki.cert, &pki.key), "a relay identity"),
    ] {
        let out = check(bin, &cfg);
        assert!(!out.status.success(), "{} accepted {cfg:?}", bin.display());
        assert!(text(&out).contains(want), "{want:?} missing: {}", text(&out));
    }
    // A relay given by IP address with no server_name: required, said so.
    let ip = write(
        &dir,
        "ip.toml",
        "relays = [\"198.51.100.10:4433\"]\nca = \"a\"\ncert = \"c\"\nkey = \"k\"\n[[service]]\nname = \"echo\"\n",
    );
    assert!(text(&check(&c, &ip)).contains("server_name is required"));

    // The relay: its own certificate, the names clients must use.
    let r = workspace_bin("ztna-relay");
    let id = Identity { trust_domain: "dev.ztna".into(), kind: Kind::Relay, name: "r1".into() };
    let ip = "198.51.100.10".parse().unwrap();
    let (rc, rk) = pki::issue(&pki.ca_files, &id, &[], &[ip], 1, &dir).unwrap();
    let relay = |cert: &Path, key: &Path| {
        Command::new(&r)
            .arg("check-config")
            .args(["--listen", "127.0.0.1:4433", "--trust-domain", "dev.ztna", "--client-ca"])
            .arg(&pki.ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .output()
            .unwrap()
    };
    let out = relay(&rc, &rk);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out)
        .contains("clients must set server_name to a name this certificate covers: DNS none; IP 198.51.100.10"));
    assert!(text(&out).contains("expires in"), "a one-day certificate is about to expire: {}", text(&out));
    let out = relay(&agent, &agent_key);
    assert!(!out.status.success() && text(&out).contains("this program needs a relay identity"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other.dir);
}

/// Runs the dev relay with stderr on a pipe until its first log lines.
fn relay_log(format: &str) -> String {
    let mut child = Command::new(workspace_bin("ztna-relay"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--workers", "1", "--log-format", format])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn logs_on_a_pipe_have_no_escape_codes_and_json_is_one_object_per_line() {
    let plain = relay_log("text");
    assert!(plain.lines().count() >= 1 && plain.contains("INFO"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "escape codes in a captured log: {plain:?}");
    let json = relay_log("json");
    let lines: Vec<&str> = json.lines().collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        assert!(v.get("level").is_some() && v.get("timestamp").is_some(), "{l}");
    }
}
