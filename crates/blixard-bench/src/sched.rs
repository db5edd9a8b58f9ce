//! Scheduler throughput: placements/s over a large cluster view, placing VMs one after
//! another as the leader's placer does (each placement counted before the next).

use std::collections::BTreeMap;
use std::time::Instant;

use blixard_scheduler::{charge, place, NodeView, Policy};
use blixard_types::command::Resources;
use blixard_types::vm::{RestartPolicy, VmSpec};
use blixard_types::NodeId;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct SchedStats {
    pub nodes: usize,
    pub vms: usize,
    /// Placements/s scoring at most `sample` feasible nodes per VM (Nomad-style).
    pub sample: usize,
    pub sampled_per_s: f64,
    pub sampled_unplaced: usize,
    /// Placements/s scoring every node (the baseline), over `full_vms` VMs.
    pub full_vms: usize,
    pub full_per_s: f64,
}

fn views(n: usize) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            NodeView {
                id: NodeId(id),
                labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 4))]),
                capacity: Resources { cpus: 64, memory_mib: 256 * 1024, disk_gib: 2000 },
                schedulable: true,
                ..Default::default()
            }
        })
        .collect()
}

fn spec(i: usize) -> VmSpec {
    VmSpec {
        name: format!("vm{i}"),
        image: format!("img{}", i % 16),
        vcpus: 1 + (i % 4) as u32,
        memory_mib: 1024 * (1 + (i % 8) as u64),
        disk_gib: 4,
        labels: BTreeMap::new(),
        // Every tenth VM wants a zone; every seventh is in an anti-affinity group.
        constraints: if i.is_multiple_of(10) { BTreeMap::from([("zone".into(), format!("z{}", i % 4))]) } else { BTreeMap::new() },
        anti_affinity: i.is_multiple_of(7).then(|| format!("g{}", i % 1000)),
        restart: RestartPolicy::Always,
        health: None,
    }
}

/// Places `vms` VMs on `nodes` nodes; returns (placements/s, unplaced).
fn run_once(nodes: usize, vms: usize, policy: &Policy) -> (f64, usize) {
    let mut v = views(nodes);
    let index: BTreeMap<NodeId, usize> = v.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let specs: Vec<VmSpec> = (0..vms).map(spec).collect();
    let mut unplaced = 0;
    let t0 = Instant::now();
    for (i, s) in specs.iter().enumerate() {
        match place(&v, s, policy, i as u64) {
            Ok(id) => charge(&mut v[index[&id]], s),
            Err(_) => unplaced += 1,
        }
    }
    (vms as f64 / t0.elapsed().as_secs_f64(), unplaced)
}

pub fn run(nodes: usize, vms: usize, sample: usize) -> SchedStats {
    let sampled = Policy { sample: Some(sample), ..Policy::default() };
    let (sampled_per_s, sampled_unplaced) = run_once(nodes, vms, &sampled);
    // Scoring every node is O(nodes) per VM: a smaller run gives the rate.
    let full_vms = (vms / 20).max(1);
    let (full_per_s, _) = run_once(nodes, full_vms, &Policy::default());
    SchedStats { nodes, vms, sample, sampled_per_s, sampled_unplaced, full_vms, full_per_s }
}
