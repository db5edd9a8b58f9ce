//! Placement on the leader, with in-process nodes (real iroh endpoints on loopback, real
//! redb files, real gossip): VMs get a node, an impossible one says why, and the VMs of a
//! node that died are placed elsewhere after the grace period.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blixard_node::{Node, NodeConfig, StartMode};
use blixard_types::command::Resources;
use blixard_types::vm::{RestartPolicy, VmSpec};
use blixard_types::{Command, CommandResult, Role};

fn config(dir: &std::path::Path, mode: StartMode) -> NodeConfig {
    let mut cfg = NodeConfig::new(dir, mode);
    cfg.resources = Resources { cpus: 4, memory_mib: 4096, disk_gib: 10 };
    cfg.placement_grace = Duration::from_millis(500);
    cfg
}

fn spec(name: &str, vcpus: u32) -> VmSpec {
    VmSpec {
        name: name.into(),
        image: "img".into(),
        vcpus,
        memory_mib: 256,
        disk_gib: 1,
        labels: BTreeMap::new(),
        constraints: BTreeMap::new(),
        anti_affinity: None,
        restart: RestartPolicy::Always,
        health: None,
    }
}

async fn wait<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_placed_and_move_off_dead_nodes() {
    let root = tempfile::tempdir().expect("tempdir");
    let a = Node::start(config(&root.path().join("a"), StartMode::Init)).await.expect("init");
    let ctx = a.ctx().clone();
    let t = blixard_node::client_api::issue_ticket(&ctx, a.id(), Role::Voter, u64::MAX).await.expect("ticket");
    let b = Node::start(config(&root.path().join("b"), StartMode::Join(t.clone()))).await.expect("join b");
    let c = Node::start(config(&root.path().join("c"), StartMode::Join(t))).await.expect("join c");
    // All alive in A's gossip view before placing.
    wait("gossip sees all", 10, || [b.id(), c.id()].iter().all(|id| ctx.is_alive(id)).then_some(())).await;

    // The catalogue must know the image (its bytes do not matter here: placement only).
    let publish = Command::PublishImage {
        hash: "ab".repeat(32),
        size: 1,
        kind: blixard_types::image::ImageKind::Bundle,
        name: Some("img".into()),
    };
    assert_eq!(ctx.propose(a.id(), publish).await.expect("publish"), CommandResult::Ok);
    for (name, vcpus) in [("small", 1), ("big", 3), ("huge", 64)] {
        let r = ctx.propose(a.id(), Command::CreateVm { spec: spec(name, vcpus), start: true }).await.expect("create");
        assert_eq!(r, CommandResult::Ok);
    }
    let vm = |name: &str| ctx.state.read().expect("state").state.vms.get(name).cloned();
    let small_on = wait("small placed", 10, || vm("small").and_then(|v| v.node)).await;
    wait("big placed", 10, || vm("big").and_then(|v| v.node)).await;
    // Binpack: the 3-vCPU VM fits beside the 1-vCPU one (4 vCPUs per node).
    assert_eq!(vm("big").and_then(|v| v.node), Some(small_on));
    let err = wait("huge refused with a reason", 10, || vm("huge").and_then(|v| v.error)).await;
    assert!(err.contains("not enough free vCPUs (3 nodes)"), "{err}");
    assert_eq!(vm("huge").and_then(|v| v.node), None);

    // The host of `small` dies: after it is dead and the grace period passes, its VMs move.
    let nodes = [a, b, c];
    let (dead_i, _) = nodes.iter().enumerate().find(|(_, n)| n.id() == small_on).expect("host");
    let survivors: Vec<&Node> = nodes.iter().enumerate().filter(|(i, _)| *i != dead_i).map(|(_, n)| n).collect();
    let watcher = survivors[0].ctx().clone();
    let mut nodes = nodes.into_iter().collect::<Vec<_>>();
    let dead = nodes.remove(dead_i);
    let started = Instant::now();
    dead.shutdown().await;
    let vm = |name: &str| watcher.state.read().expect("state").state.vms.get(name).cloned();
    let moved = wait("small moved", 20, || vm("small").and_then(|v| v.node).filter(|n| *n != small_on)).await;
    assert!(nodes.iter().any(|n| n.id() == moved));
    assert_ne!(vm("big").and_then(|v| v.node), Some(small_on));
    eprintln!("VMs moved off the dead node after {:?}", started.elapsed());
    for n in nodes {
        n.shutdown().await;
    }
}
