//! In-process nodes (real iroh endpoints on loopback, real redb files) with a tiny snapshot
//! threshold: the log is purged behind snapshots, so a node joining later can only catch
//! up by installing a snapshot sent over iroh.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blixard_node::{Node, NodeConfig, StartMode};
use blixard_types::{Command, Role};

fn config(dir: &std::path::Path, mode: StartMode) -> NodeConfig {
    let mut cfg = NodeConfig::new(dir, mode);
    cfg.raft.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(20);
    cfg.raft.max_in_snapshot_log_to_keep = 0;
    cfg.raft.purge_batch_size = 1;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_from_a_snapshot() {
    let root = tempfile::tempdir().expect("tempdir");
    let a = Node::start(config(&root.path().join("a"), StartMode::Init)).await.expect("init");
    let ctx = a.ctx().clone();

    // 100 writes: several snapshots, log purged behind them.
    for i in 0..100u32 {
        let set = BTreeMap::from([(format!("k{}", i % 7), i.to_string())]);
        let r = ctx.propose(a.id(), Command::SetLabels { node: a.id(), set, remove: vec![] }).await.expect("write");
        assert_eq!(r, blixard_types::CommandResult::Ok);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let purged = loop {
        let m = ctx.raft.metrics().borrow().clone();
        if let (Some(s), Some(p)) = (m.snapshot, m.purged) {
            if p.index > 50 {
                break (s, p);
            }
        }
        assert!(Instant::now() < deadline, "no snapshot/purge happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("snapshot at {}, purged up to {}", purged.0.index, purged.1.index);

    // A node joining now can only get the early entries from the snapshot.
    let ticket = blixard_node::client_api::issue_ticket(&ctx, a.id(), Role::Voter, u64::MAX).await.expect("ticket");
    let b = Node::start(config(&root.path().join("b"), StartMode::Join(ticket))).await.expect("join");
    let want = ctx.state.read().expect("state").state.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = b.ctx().state.read().expect("state").state.clone();
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "joiner did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bm = b.ctx().raft.metrics().borrow().clone();
    assert!(bm.snapshot.is_some(), "the joiner must have installed a snapshot");
    assert_eq!(want.nodes[&a.id()].labels["k0"], "98");

    // Restart the joiner: the state comes back from its own snapshot and log.
    let b_id = b.id();
    b.shutdown().await;
    // openraft's state-machine worker drops its store (and the redb lock) just after
    // `shutdown` returns; a new process would not care, a new node in this one does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = Node::start(config(&root.path().join("b"), StartMode::Resume)).await.expect("resume");
    assert_eq!(b.id(), b_id, "identity must survive a restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.ctx().state.read().expect("state").state != want {
        assert!(Instant::now() < deadline, "restarted joiner lost state");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.shutdown().await;
    a.shutdown().await;
}
