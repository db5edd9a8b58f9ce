//! The C1M scale run: many nodes and a million VMs through the real state machine
//! (`ClusterState::apply`) and the real placement planner (`plan_placements`, which runs
//! the scheduler), in rounds as the leader runs them. Raft and storage are not in this
//! path: what is measured is the cost of deciding and recording placements.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blixard_state::{ClusterState, Placement};
use blixard_types::command::{NodeInfo, Resources};
use blixard_types::image::ImageKind;
use blixard_types::vm::VmSpec;
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request, Role};

use crate::rng::SimRng;

/// What to run.
#[derive(Clone, Debug)]
pub struct C1mOptions {
    pub nodes: usize,
    pub vms: usize,
    /// VMs placed per round (one Raft batch on a real leader).
    pub per_round: usize,
    /// Scheduler sampling: candidate nodes looked at per placement (`None`: all).
    pub sample: Option<usize>,
    pub seed: u64,
}

impl Default for C1mOptions {
    fn default() -> Self {
        Self {
            nodes: 10_000,
            vms: 1_000_000,
            per_round: 50_000,
            sample: Some(64),
            seed: 1,
        }
    }
}

/// What it did.
#[derive(Clone, Debug)]
pub struct C1mReport {
    pub nodes: usize,
    pub vms: usize,
    pub placed: usize,
    pub unplaceable: usize,
    pub rounds: usize,
    pub join: Duration,
    pub create: Duration,
    pub place: Duration,
    /// Most VMs on one node.
    pub max_vms_on_a_node: usize,
    /// Nodes whose placed VMs (summed from the VM records) exceed their capacity.
    pub capacity_violations: usize,
}

impl C1mReport {
    pub fn placements_per_s(&self) -> f64 {
        self.placed as f64 / self.place.as_secs_f64().max(1e-9)
    }
}

/// Why the run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum C1mError {
    #[error("the state machine refused {what}: {why}")]
    Refused { what: String, why: String },
}

fn node_id(i: usize) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    b[31] = 0xC1;
    NodeId(b)
}

fn apply(state: &mut ClusterState, by: NodeId, cmd: Command, at_ms: u64) -> Result<(), C1mError> {
    let what = cmd.kind().to_string();
    // No request is sent twice here: no ids to remember.
    match state.apply(&Request { at_ms, by, cmd, id: 0 }) {
        CommandResult::Ok => Ok(()),
        CommandResult::Refused(r) => Err(C1mError::Refused {
            what,
            why: r.to_string(),
        }),
    }
}

/// Runs it. Nodes: 256 vCPUs, 1 TiB, 8 TiB, a `zone` label of 10 values. VMs: 1–2 vCPUs,
/// 256–1024 MiB, 4–16 GiB, one of 8 images; one in ten has a zone constraint, one in a
/// hundred an anti-affinity group of up to 50.
pub fn run_c1m(o: &C1mOptions) -> Result<C1mReport, C1mError> {
    let mut rng = SimRng::new(o.seed);
    let mut state = ClusterState::default();
    state.policy.sample = o.sample;
    let leader = node_id(0);
    let t = Instant::now();
    let info = |i: usize| NodeInfo {
        addrs: Vec::new(),
        resources: Resources {
            cpus: 256,
            memory_mib: 1024 * 1024,
            disk_gib: 8192,
        },
        labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 10))]),
    };
    apply(
        &mut state,
        leader,
        Command::Bootstrap {
            cluster_id: ClusterId([0xC1; 16]),
            node: leader,
            info: info(0),
        },
        0,
    )?;
    for i in 1..o.nodes {
        let mut secret_hash = [0u8; 32];
        secret_hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
        apply(
            &mut state,
            leader,
            Command::CreateTicket {
                secret_hash,
                role: Role::Learner,
                expires_at_ms: u64::MAX,
            },
            1,
        )?;
        apply(
            &mut state,
            leader,
            Command::AdmitNode {
                node: node_id(i),
                info: info(i),
                secret_hash,
                role: Role::Learner,
            },
            1,
        )?;
    }
    let join = t.elapsed();

    let images: Vec<String> = (0..8u8)
        .map(|k| blake3::hash(&[k]).to_hex().to_string())
        .collect();
    for (k, h) in images.iter().enumerate() {
        let cmd = Command::PublishImage {
            hash: h.clone(),
            size: 1 << 30,
            kind: ImageKind::Bundle,
            name: Some(format!("img{k}")),
        };
        apply(&mut state, leader, cmd, 2)?;
    }
    let t = Instant::now();
    for v in 0..o.vms {
        let mut spec = VmSpec {
            name: format!("vm-{v}"),
            image: format!("img{}", rng.below(8)),
            vcpus: 1 + rng.below(2) as u32,
            memory_mib: 256 << rng.below(3),
            disk_gib: 4 << rng.below(3),
            labels: BTreeMap::new(),
            constraints: BTreeMap::new(),
            anti_affinity: None,
            restart: Default::default(),
            health: None,
        };
        if rng.below(10) == 0 {
            spec.constraints
                .insert("zone".into(), format!("z{}", rng.below(10)));
        }
        if rng.below(100) == 0 {
            spec.anti_affinity = Some(format!("g{}", v / 5000));
        }
        apply(
            &mut state,
            leader,
            Command::CreateVm { spec, start: true },
            3,
        )?;
    }
    let create = t.elapsed();

    let t = Instant::now();
    let (mut placed, mut rounds) = (0, 0);
    loop {
        let views = state.node_views(|_| true);
        let plan = state.plan_placements(views, |_| false, rounds as u64 * 7919, o.per_round);
        let progress = plan.iter().any(|p| matches!(p, Placement::Place { .. }));
        rounds += 1;
        for p in plan {
            match p {
                Placement::Place { name, node, .. } => match state.apply(&Request {
                    at_ms: 4,
                    by: leader,
                    cmd: Command::PlaceVm { name, node },
                    id: 0,
                }) {
                    CommandResult::Ok => placed += 1,
                    // The state machine checks capacity again; the planner charged its views,
                    // so this would be a planner bug.
                    CommandResult::Refused(r) => {
                        return Err(C1mError::Refused {
                            what: "place-vm".into(),
                            why: r.to_string(),
                        })
                    }
                },
                Placement::Unplaceable {
                    name,
                    reason,
                    changed,
                } => {
                    if changed {
                        apply(
                            &mut state,
                            leader,
                            Command::PlacementFailed { name, reason },
                            4,
                        )?;
                    }
                }
            }
        }
        if !progress {
            break;
        }
    }
    let place = t.elapsed();

    let used = crate::invariants::capacity::usage(&state);
    let capacity_violations = crate::invariants::capacity::over_capacity(&state).len();
    let max_vms_on_a_node = used.values().map(|u| u.3).max().unwrap_or(0);
    Ok(C1mReport {
        nodes: o.nodes,
        vms: o.vms,
        placed,
        unplaceable: state.vms.values().filter(|v| v.node.is_none()).count(),
        rounds,
        join,
        create,
        place,
        max_vms_on_a_node,
        capacity_violations,
    })
}
