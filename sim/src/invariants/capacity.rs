//! No node's placed VMs exceed its capacity, summed from the VM records themselves (not
//! from the planner's views or the state machine's usage index, which are what is checked).

use std::collections::BTreeMap;

use blixard_state::ClusterState;
use blixard_types::NodeId;

/// Per node: vCPUs, MiB, GiB and VMs placed there.
pub fn usage(state: &ClusterState) -> BTreeMap<NodeId, (u64, u64, u64, usize)> {
    let mut used: BTreeMap<NodeId, (u64, u64, u64, usize)> = BTreeMap::new();
    for v in state.vms.values() {
        if let Some(n) = v.node {
            let u = used.entry(n).or_default();
            u.0 += u64::from(v.spec.vcpus);
            u.1 += v.spec.memory_mib;
            u.2 += v.spec.disk_gib;
            u.3 += 1;
        }
    }
    used
}

/// One description per node over its capacity.
pub fn over_capacity(state: &ClusterState) -> Vec<String> {
    usage(state)
        .iter()
        .filter_map(|(n, u)| {
            let r = state.nodes.get(n).map(|r| r.resources).unwrap_or_default();
            (u.0 > u64::from(r.cpus) || u.1 > r.memory_mib || u.2 > r.disk_gib).then(|| {
                format!(
                    "node {} over capacity: {} vCPUs/{} MiB/{} GiB placed, has {}/{}/{}",
                    n.short(),
                    u.0,
                    u.1,
                    u.2,
                    r.cpus,
                    r.memory_mib,
                    r.disk_gib
                )
            })
        })
        .collect()
}
