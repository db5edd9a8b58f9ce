//! Placement: (cluster view, VM spec) → a node, or the reasons no node fits.
//!
//! **Invariant:** pure and deterministic: the same view, spec, policy and salt give the
//! same answer on every machine; no clock, no I/O, no randomness of its own (the caller
//! passes a `salt`, e.g. derived from the Raft log index, to vary where sampling starts).
//! An impossible placement is an outcome ([`Unschedulable`]), not an error.
//!
//! Filters: the node is schedulable (alive, not drained), free vCPUs/memory/disk (with
//! overcommit ratios), label constraints, anti-affinity groups. Scoring: binpack (fill
//! the fullest node that fits; the default) or spread (the emptiest), plus a bonus for
//! nodes that already hold the image. Ties go to the smallest node id.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use blixard_types::command::Resources;
use blixard_types::vm::VmSpec;
use blixard_types::NodeId;
use serde::{Deserialize, Serialize};

/// What the scheduler knows about one node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    /// Sum of what the VMs placed on it ask for.
    pub used: Resources,
    /// Images it holds (references as in `VmSpec::image`).
    pub images: BTreeSet<String>,
    /// Alive and not drained.
    pub schedulable: bool,
    /// Anti-affinity groups of the VMs placed on it.
    pub groups: BTreeSet<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Fill nodes up: leaves whole nodes free for big VMs and for draining.
    #[default]
    Binpack,
    /// Spread load: keeps headroom on every node.
    Spread,
}

/// Placement policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub strategy: Strategy,
    /// vCPUs placeable per 100 physical CPUs (100 = no overcommit; integers keep
    /// placement exact and identical on every replica).
    pub cpu_overcommit_pct: u32,
    /// Memory placeable per 100 MiB of memory (100 = no overcommit).
    pub memory_overcommit_pct: u32,
    /// Score at most this many feasible nodes, starting at a salt-chosen offset (as Nomad
    /// does at scale); `None` scores every node.
    pub sample: Option<usize>,
}

impl Default for Policy {
    fn default() -> Self {
        Self { strategy: Strategy::Binpack, cpu_overcommit_pct: 100, memory_overcommit_pct: 100, sample: None }
    }
}

/// Why one node cannot take the VM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    NotSchedulable,
    Cpu,
    Memory,
    Disk,
    Constraint(String),
    AntiAffinity(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotSchedulable => f.write_str("node down or drained"),
            Reason::Cpu => f.write_str("not enough free vCPUs"),
            Reason::Memory => f.write_str("not enough free memory"),
            Reason::Disk => f.write_str("not enough free disk"),
            Reason::Constraint(c) => write!(f, "constraint {c} not met"),
            Reason::AntiAffinity(g) => write!(f, "already runs a VM of anti-affinity group {g}"),
        }
    }
}

/// No node fits; how many nodes were ruled out for each reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unschedulable {
    pub reasons: BTreeMap<Reason, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reasons.is_empty() {
            return f.write_str("no nodes in the cluster");
        }
        f.write_str("no node fits: ")?;
        let parts: Vec<String> = self.reasons.iter().map(|(r, n)| format!("{r} ({n} nodes)")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Checks whether `node` can take `spec` under `policy`.
pub fn fits(node: &NodeView, spec: &VmSpec, policy: &Policy) -> Result<(), Reason> {
    if !node.schedulable {
        return Err(Reason::NotSchedulable);
    }
    let cpu_cap = node.capacity.cpus as u64 * policy.cpu_overcommit_pct as u64 / 100;
    if node.used.cpus as u64 + spec.vcpus as u64 > cpu_cap {
        return Err(Reason::Cpu);
    }
    let mem_cap = node.capacity.memory_mib.saturating_mul(policy.memory_overcommit_pct as u64) / 100;
    if node.used.memory_mib.saturating_add(spec.memory_mib) > mem_cap {
        return Err(Reason::Memory);
    }
    if node.used.disk_gib.saturating_add(spec.disk_gib) > node.capacity.disk_gib {
        return Err(Reason::Disk);
    }
    for (k, v) in &spec.constraints {
        if node.labels.get(k) != Some(v) {
            return Err(Reason::Constraint(format!("{k}={v}")));
        }
    }
    if let Some(g) = &spec.anti_affinity {
        if node.groups.contains(g) {
            return Err(Reason::AntiAffinity(g.clone()));
        }
    }
    Ok(())
}

/// How good a feasible node is (higher is better).
fn score(node: &NodeView, spec: &VmSpec, policy: &Policy) -> f64 {
    let frac = |used: u64, add: u64, cap: u64| if cap == 0 { 1.0 } else { (used + add) as f64 / cap as f64 };
    let cpu = frac(node.used.cpus as u64, spec.vcpus as u64, node.capacity.cpus as u64);
    let mem = frac(node.used.memory_mib, spec.memory_mib, node.capacity.memory_mib);
    let fill = (cpu + mem) / 2.0;
    let fit = match policy.strategy {
        Strategy::Binpack => fill,
        Strategy::Spread => 1.0 - fill,
    };
    // Holding the image saves a fetch: worth a quarter of a node's fill.
    let local = if node.images.contains(&spec.image) { 0.25 } else { 0.0 };
    fit + local
}

/// Counts `spec` as placed on `node` (so the next decision of the same round sees it).
pub fn charge(node: &mut NodeView, spec: &VmSpec) {
    node.used.cpus += spec.vcpus;
    node.used.memory_mib += spec.memory_mib;
    node.used.disk_gib += spec.disk_gib;
    node.images.insert(spec.image.clone());
    if let Some(g) = &spec.anti_affinity {
        node.groups.insert(g.clone());
    }
}

/// Chooses a node for `spec`.
pub fn place(nodes: &[NodeView], spec: &VmSpec, policy: &Policy, salt: u64) -> Result<NodeId, Unschedulable> {
    let n = nodes.len();
    let mut best: Option<(f64, NodeId)> = None;
    let mut feasible = 0usize;
    let mut rejected = Unschedulable::default();
    let (start, limit) = match policy.sample {
        Some(k) if k > 0 && n > k => ((salt % n as u64) as usize, k),
        _ => (0, n),
    };
    for i in 0..n {
        let node = &nodes[(start + i) % n];
        match fits(node, spec, policy) {
            Err(r) => *rejected.reasons.entry(r).or_default() += 1,
            Ok(()) => {
                let s = score(node, spec, policy);
                let better = match best {
                    None => true,
                    Some((bs, bid)) => s > bs || (s == bs && node.id < bid),
                };
                if better {
                    best = Some((s, node.id));
                }
                feasible += 1;
                if feasible >= limit {
                    break;
                }
            }
        }
    }
    best.map(|(_, id)| id).ok_or(rejected)
}

#[cfg(test)]
mod tests;
