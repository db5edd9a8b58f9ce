//! The CLI's own surface: configuration precedence, completions, man page, errors.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env_remove("BLIXARD_TICKET").output().expect("run blixard")
}

#[test]
fn config_file_flags_and_print() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("blixard.toml");
    let data = dir.path().join("data");
    std::fs::write(&cfg, format!("data_dir = {:?}\ncpus = 3\nmemory_mib = 2048\n[labels]\nzone = \"a\"\n", data)).expect("write");
    let out = run(&["--json", "node", "config", "--print", "--config", cfg.to_str().expect("utf8"), "--cpus", "5", "--label", "rack=r1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["cpus"], 5, "flag wins over file");
    assert_eq!(v["memory_mib"], 2048, "file wins over default");
    assert_eq!(v["labels"], serde_json::json!({"zone": "a", "rack": "r1"}));
    assert_eq!(v["data_dir"], data.to_str().expect("utf8"));

    // A node started from the file alone uses it.
    let mut c = Cluster::new();
    c.spawn(&data, &["--init", "--config", cfg.to_str().expect("utf8")]).expect("node from config");
    let out = Command::new(BIN)
        .env("BLIXARD_CONFIG_DIR", c.cli_config())
        .args(["--json", "--data-dir", data.to_str().expect("utf8"), "cluster", "status"])
        .output()
        .expect("status");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let m = &members(&s)[0];
    assert_eq!(m["resources"]["cpus"], 3);
    assert_eq!(m["labels"]["zone"], "a");
    c.stop(0);

    // Typos and bad values are errors that name the problem.
    std::fs::write(&cfg, "cpu = 3\n").expect("write");
    let out = run(&["node", "config", "--print", "--config", cfg.to_str().expect("utf8"), "--data-dir", "/x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `cpu`"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("blixard") && text.contains("cluster"), "{shell}");
    }
    let out = run(&["man"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(".TH blixard"));
}

#[test]
fn clear_errors_without_a_cluster() {
    let out = run(&["cluster", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: no cluster given"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let out = run(&["--ticket", "blixardnotaticket", "cluster", "status"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid ticket"));
    // Nothing listens at the ticket's address: a clear error, within the connect budget.
    let mut c = Cluster::new();
    c.init();
    let t = c.ticket("client", "1h");
    c.kill9(0);
    let started = std::time::Instant::now();
    let out = run(&["--ticket", &t, "cluster", "status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node of the cluster could be reached"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(15));
}
