//! Two nodes in two network namespaces joined by a veth pair: the mesh works between
//! hosts, not only on loopback. Needs root and `ip`; skipped with a visible message
//! otherwise, unless BLIXARD_REQUIRE_REAL=1 (CI), where it fails instead.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Namespaces and links made by this test, removed on drop.
struct Net {
    names: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            sh(&["ip", "netns", "del", n]);
        }
    }
}

fn prerequisites() -> Result<(), String> {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !root {
        return Err("not root".into());
    }
    if !sh(&["ip", "-V"]) {
        return Err("`ip` (iproute2) not installed".into());
    }
    Ok(())
}

#[test]
fn nodes_in_two_namespaces_form_a_cluster() {
    if let Err(why) = prerequisites() {
        if require_real() {
            panic!("BLIXARD_REQUIRE_REAL=1 but {why}");
        }
        eprintln!("SKIP nodes_in_two_namespaces_form_a_cluster: {why}");
        return;
    }
    let tag = std::process::id() % 10000;
    let (a, b) = (format!("bx{tag}a"), format!("bx{tag}b"));
    let net = Net { names: vec![a.clone(), b.clone()] };
    let (va, vb) = (format!("vx{tag}a"), format!("vx{tag}b"));
    // 10.77.x.0/24 exists only inside these two namespaces.
    let subnet = 1 + tag % 250;
    let (ip_a, ip_b) = (format!("10.77.{subnet}.1"), format!("10.77.{subnet}.2"));
    for cmd in [
        vec!["ip", "netns", "add", &a],
        vec!["ip", "netns", "add", &b],
        vec!["ip", "link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["ip", "link", "set", &va, "netns", &a],
        vec!["ip", "link", "set", &vb, "netns", &b],
    ] {
        assert!(sh(&cmd), "setup failed: {cmd:?}");
    }
    for (ns, dev, ip) in [(&a, &va, &ip_a), (&b, &vb, &ip_b)] {
        let cidr = format!("{ip}/24");
        for cmd in [
            vec!["ip", "-n", ns, "addr", "add", &cidr, "dev", dev],
            vec!["ip", "-n", ns, "link", "set", dev, "up"],
            vec!["ip", "-n", ns, "link", "set", "lo", "up"],
        ] {
            assert!(sh(&cmd), "setup failed: {cmd:?}");
        }
    }

    let root = tempfile::tempdir().expect("tempdir");
    let spawn = |ns: &str, dir: &str, listen: &str, extra: &[&str]| -> (Child, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, BIN, "node", "run", "--data-dir"])
            .arg(root.path().join(dir))
            .args(["--listen", listen, "--metrics-listen", "off"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(root.path().join(format!("{dir}.log"))).expect("log"))
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let mut r = std::io::BufReader::new(stdout);
        std::io::BufRead::read_line(&mut r, &mut line).expect("ready line");
        std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
        (child, line)
    };
    let (mut na, line) = spawn(&a, "a", &format!("{ip_a}:7000"), &["--init"]);
    assert!(line.contains(&ip_a), "{line}");
    let cli = |ns: &str, args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", ns, BIN, "--data-dir"])
            .arg(root.path().join("a"))
            .args(args)
            .env("BLIXARD_CONFIG_DIR", root.path().join(format!("cli-{ns}")))
            .output()
            .expect("cli")
    };
    let out = cli(&a, &["cluster", "ticket", "--role", "voter"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ticket = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (mut nb, line) = spawn(&b, "b", &format!("{ip_b}:7000"), &["--join", &ticket]);
    assert!(line.starts_with("node "), "join failed: {line} {}", std::fs::read_to_string(root.path().join("b.log")).unwrap_or_default());
    // From inside namespace b, the CLI reaches the cluster at a's address.
    let s = wait_for("two voters seen from namespace b", Duration::from_secs(20), || {
        let out = cli(&b, &["--json", "cluster", "status"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (count_role(&s, "voter") == 2 && members(&s).iter().all(|m| m["healthy"] == true)).then_some(s)
    });
    let addrs: Vec<String> = members(&s).iter().map(|m| m["addrs"][0].as_str().unwrap_or("").to_string()).collect();
    assert!(addrs.contains(&format!("{ip_a}:7000")) && addrs.contains(&format!("{ip_b}:7000")), "{addrs:?}");
    for c in [&mut na, &mut nb] {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(net);
}
