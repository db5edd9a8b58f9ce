//! Real `blixard` processes on loopback: join, agreement, growth, removal, audit, metrics.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn three_nodes_join_and_agree() {
    let c = three_nodes();
    let s = c.status().expect("status");
    assert_eq!(count_role(&s, "voter"), 3, "{s:#}");
    let leaders = members(&s).iter().filter(|m| m["state"] == "leader").count();
    assert_eq!(leaders, 1, "{s:#}");
    // Labels are written through Raft and visible to all.
    c.cli_ok(&["node", "label", &c.nodes[1].id[..10], "zone=a", "disk=ssd"]);
    c.cli_ok(&["node", "label", &c.nodes[1].id[..10], "disk-"]);
    let s = c.status().expect("status");
    let m = members(&s).into_iter().find(|m| m["id"] == c.nodes[1].id.as_str()).expect("member");
    assert_eq!(m["labels"], serde_json::json!({"zone": "a"}));
    // A refused write changes nothing, and is audited like the others.
    let out = c.cli(&["node", "label", &c.nodes[1].id[..10], "bad key=x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid label"));
    // Every node keeps the same audit log of state-changing requests.
    let audits: Vec<Vec<serde_json::Value>> = wait_for("audit logs written", Duration::from_secs(5), || {
        let logs: Vec<Vec<serde_json::Value>> = c
            .nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(n.dir.join("audit.log"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .collect();
        let complete = logs.iter().all(|l| l.iter().filter(|r| r["what"] == "set-labels").count() == 3);
        complete.then_some(logs)
    });
    let tail = |l: &Vec<serde_json::Value>| l.iter().filter(|r| r["what"] == "set-labels").cloned().collect::<Vec<_>>();
    assert_eq!(tail(&audits[0]), tail(&audits[1]));
    assert_eq!(tail(&audits[0]), tail(&audits[2]));
    let labels = tail(&audits[0]);
    assert_eq!(labels[0]["result"], "ok");
    assert!(labels[2]["result"].as_str().is_some_and(|r| r.contains("invalid label")), "{labels:?}");
    assert!(labels.iter().all(|r| r["by"].as_str().is_some_and(|b| b.len() == 64)));
    // Every node serves Prometheus metrics; the families parse and count real work.
    let leader_id = leader(&c.status().expect("status")).expect("leader");
    let li = c.index_of(&leader_id);
    let text = scrape(&c.nodes[li].dir);
    for family in [
        "blixard_raft_term",
        "blixard_raft_commit_index",
        "blixard_raft_is_leader",
        "blixard_raft_leader_changes_total",
        "blixard_raft_apply_latency_seconds_count",
        "blixard_mesh_connections_accepted_total",
        "blixard_mesh_rpc_bytes_sent_total",
        "blixard_cluster_members",
    ] {
        assert!(text.lines().any(|l| l.starts_with(family)), "{family} missing:\n{text}");
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} has no numeric value"))
    };
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let v = l.rsplit(' ').next().expect("value");
        assert!(v.parse::<f64>().is_ok(), "unparseable sample {l:?}");
    }
    assert_eq!(value("blixard_raft_is_leader"), 1.0);
    assert_eq!(value("blixard_cluster_members"), 3.0);
    assert!(value("blixard_raft_apply_latency_seconds_count") >= 3.0, "label writes went through the leader");
    // Every replica applies the same state.
    wait_for("equal state digests", Duration::from_secs(5), || {
        let digests: Vec<String> = c
            .nodes
            .iter()
            .map(|n| c.json(&["node", "status", &n.id]).ok().map(|v| v["state_digest"].to_string()))
            .collect::<Option<_>>()?;
        digests.windows(2).all(|w| w[0] == w[1]).then_some(())
    });
}

#[test]
fn grow_to_five_then_remove_one() {
    let mut c = Cluster::new();
    c.init();
    let voter = c.ticket("voter", "10m");
    let learner = c.ticket("learner", "10m");
    for i in 1..4 {
        c.join(i, &voter).expect("join voter");
    }
    c.join(4, &learner).expect("join learner");
    let s = wait_for("4 voters + 1 learner", Duration::from_secs(20), || {
        let s = c.status().ok()?;
        (count_role(&s, "voter") == 4 && count_role(&s, "learner") == 1).then_some(s)
    });
    assert_eq!(members(&s).len(), 5);
    c.refresh_client_ticket();

    // Remove a follower.
    let victim = c.nodes.iter().find(|n| Some(&n.id) != leader(&s).as_ref()).expect("follower").id.clone();
    let vi = c.index_of(&victim);
    c.cli_ok(&["cluster", "remove", &victim[..12]]);
    let s = c.status().expect("status");
    assert_eq!(members(&s).len(), 4, "{s:#}");
    assert!(members(&s).iter().all(|m| m["id"] != victim.as_str()));
    // The cluster keeps working.
    c.cli_ok(&["node", "label", &c.nodes[0].id, "after=remove"]);

    // The removed node's key is refused: as a client (with a fresh client ticket) ...
    c.kill9(vi);
    let removed_cfg = c.root.path().join("removed-cli");
    std::fs::create_dir_all(&removed_cfg).expect("mkdir");
    std::fs::copy(c.nodes[vi].dir.join("node.key"), removed_cfg.join("cli.key")).expect("copy key");
    let client_ticket = c.ticket("client", "10m");
    let out = std::process::Command::new(BIN)
        .env("BLIXARD_CONFIG_DIR", &removed_cfg)
        .args(["--ticket", &client_ticket, "cluster", "status"])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("removed"), "{err}");
    // ... and it cannot rejoin, with its old ticket or with a new one.
    let dir = c.nodes[vi].dir.clone();
    std::fs::remove_file(dir.join("raft.redb")).expect("wipe raft state");
    for t in [voter.clone(), c.ticket("voter", "10m")] {
        let err = c.spawn(&dir, &["--join", &t]).expect_err("removed node must not rejoin");
        assert!(err.contains("removed"), "{err}");
    }
}

#[test]
fn demo_starts_a_cluster_and_boots_a_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let have_qemu = on_path("qemu-system-x86_64");
    assert!(have_qemu || !require_real(), "qemu-system-x86_64 not found");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["--json", "demo", "--exit", "--dir"]).arg(dir.path());
    if !have_qemu {
        eprintln!("SKIP the demo's VM: qemu-system-x86_64 not found");
        cmd.arg("--no-vm");
    }
    let out = cmd.output().expect("run demo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = &v["cluster"];
    assert_eq!(count_role(s, "voter"), 3, "{s:#}");
    assert!(members(s).iter().all(|m| m["healthy"] == true), "{s:#}");
    assert!(dir.path().join("client.ticket").exists());
    if have_qemu {
        let vm = &v["vm"];
        assert_eq!(vm["state"], "running", "{vm:#}");
        assert_eq!(vm["healthy"], true, "{vm:#}");
        // It runs on a node that fetched the image from the node the push reached.
        let image = &v["image"];
        assert_ne!(image["nodes"][0], vm["node"], "{v:#}");
    }
}


