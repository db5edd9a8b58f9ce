//! The C1M scale run: 10,000 nodes join and 1,000,000 VMs are created and placed through a
//! three-node cluster running the real openraft, the real redb log store (on simulated
//! disks) and the real state machine, over the simulated network (calm: 1–3 ms, nothing
//! lost) with a paused clock. The leader places the VMs with the real planner
//! (`ClusterState::plan_placements`, which runs the scheduler) and commits each round as
//! batches (`Command::Batch`). At the end the three replicas' states must be identical.
//!
//! The 10,000 nodes are members in the cluster state (what placement sees), not Raft
//! learners: replicating to 10,000 learners is not what this measures.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_raft::storage::{open_with_backend, OpenOptions, SharedState};
use blixard_raft::RaftNode;
use blixard_state::Placement;
use blixard_types::command::{NodeInfo, Resources, VmCommand, MAX_BATCH};
use blixard_types::image::ImageKind;
use blixard_types::vm::VmSpec;
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request, Role};
use openraft::error::{ClientWriteError, RaftError};
use tokio::task::JoinSet;

use crate::network::SimNetwork;
use crate::rng::SimRng;
use crate::runtime;
use crate::storage::{state_hash, SimLog};
use crate::world::{World, WorldState};
use crate::{Raft, SimConfig};

/// What to run.
#[derive(Clone, Debug)]
pub struct C1mOptions {
    pub nodes: usize,
    pub vms: usize,
    /// VMs the leader plans per round; each round is committed as batches of
    /// [`MAX_BATCH`] before the next is planned.
    pub per_round: usize,
    /// Scheduler sampling: candidate nodes looked at per placement (`None`: all).
    pub sample: Option<usize>,
    /// Raft voters (the servers; the `nodes` are members placement sees).
    pub servers: u64,
    /// Proposals in flight at once.
    pub in_flight: usize,
    pub seed: u64,
}

impl Default for C1mOptions {
    fn default() -> Self {
        Self {
            nodes: 10_000,
            vms: 1_000_000,
            per_round: 50_000,
            sample: Some(64),
            servers: 3,
            in_flight: 16,
            seed: 1,
        }
    }
}

/// Time spent in one phase: on the wall, and on the simulated clock (network and timers;
/// the simulated clock does not move while the CPU works).
#[derive(Clone, Copy, Debug, Default)]
pub struct Phase {
    pub wall: Duration,
    pub sim: Duration,
}

/// What it did.
#[derive(Clone, Debug)]
pub struct C1mReport {
    pub nodes: usize,
    pub vms: usize,
    pub servers: u64,
    pub placed: usize,
    pub unplaceable: usize,
    pub rounds: usize,
    /// Raft log entries committed (the leader's last log index).
    pub entries: u64,
    pub join: Phase,
    pub create: Phase,
    pub place: Phase,
    /// Most VMs on one node.
    pub max_vms_on_a_node: usize,
    /// Nodes whose placed VMs (summed from the VM records) exceed their capacity.
    pub capacity_violations: usize,
    /// BLAKE3 of the applied state, the same on every server (checked).
    pub state_hash: String,
}

impl C1mReport {
    pub fn placements_per_s(&self) -> f64 {
        self.placed as f64 / self.place.wall.as_secs_f64().max(1e-9)
    }
}

/// Why the run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum C1mError {
    #[error("cannot build the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("server n{id} did not start: {why}")]
    Start { id: u64, why: String },
    #[error("the state machine refused {what}: {why}")]
    Refused { what: String, why: String },
    #[error("{what} was not committed: {why}")]
    NotCommitted { what: String, why: String },
    #[error("the servers' states differ after entry {index}: {hashes}")]
    Diverged { index: u64, hashes: String },
    #[error("the servers did not all apply entry {index} within 30 s of simulated time")]
    NotApplied { index: u64 },
}

fn node_id(i: usize) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    b[31] = 0xC1;
    NodeId(b)
}

/// Runs it on a fresh current-thread runtime with a paused clock (on this thread).
pub fn run_c1m(o: &C1mOptions) -> Result<C1mReport, C1mError> {
    runtime::seed_thread_rng(o.seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(C1mError::Runtime)?;
    let report = rt.block_on(run(o.clone()));
    // Dropping the runtime drops the servers' tasks and their stores.
    drop(rt);
    report
}

/// The servers: their `Raft`s live in the world (the network finds them there).
struct Servers {
    world: Arc<World>,
    states: Vec<SharedState<SimConfig>>,
}

impl Servers {
    async fn start(o: &C1mOptions) -> Result<Servers, C1mError> {
        let world = Arc::new(World::new(WorldState::new(o.seed, false)));
        // The production Raft configuration, snapshot policy included.
        let config = Arc::new(blixard_raft::storage::default_config());
        let mut states = Vec::new();
        for id in 0..o.servers {
            let start = |why: String| C1mError::Start { id, why };
            let disk = world.lock().disks.entry(id).or_default().clone();
            let backend = disk.backend().ok_or_else(|| start("its disk is in use".into()))?;
            let label = PathBuf::from(format!("n{id}.redb"));
            let (log, sm) = open_with_backend::<SimConfig>(backend, &label, OpenOptions::default().inline_io(true))
                .map_err(|e| start(e.to_string()))?;
            {
                // No command sets the scheduler's sampling yet; it is part of the replicated
                // policy, so every server gets the same before the first entry.
                let shared = sm.shared();
                let mut applied = shared.write().unwrap_or_else(|p| p.into_inner());
                applied.state.policy.sample = o.sample;
                states.push(shared.clone());
            }
            let log = SimLog::new(log, id, world.clone(), None);
            let network = SimNetwork { from: id, world: world.clone() };
            let raft = runtime::run_as(id, Raft::new(id, config.clone(), network, log, sm))
                .await
                .map_err(|e| start(e.to_string()))?;
            runtime::spawn_on(
                id,
                blixard_raft::elections::break_split_votes(
                    raft.clone(),
                    config.election_timeout_min,
                    config.election_timeout_max,
                ),
            );
            world.lock().rafts.insert(id, raft);
        }
        world.lock().node_ids = (0..o.servers).collect();
        let members: BTreeMap<u64, RaftNode> = (0..o.servers).map(|id| (id, RaftNode::default())).collect();
        let first = world.lock().rafts.get(&0).cloned();
        if let Some(raft) = first {
            raft.initialize(members)
                .await
                .map_err(|e| C1mError::Start { id: 0, why: e.to_string() })?;
        }
        Ok(Servers { world, states })
    }

    fn leader(&self) -> u64 {
        leader(&self.world)
    }

    fn stop(&self) {
        let ids: Vec<u64> = self.world.lock().rafts.keys().copied().collect();
        for id in ids {
            self.world.lock().rafts.remove(&id);
            runtime::crash(id);
        }
    }

    /// Waits until every server applied the leader's last entry, then compares their states.
    async fn agree(&self) -> Result<(u64, String), C1mError> {
        let leader = self.leader();
        let last = {
            let w = self.world.lock();
            w.rafts
                .get(&leader)
                .and_then(|r| r.metrics().borrow().last_log_index)
                .unwrap_or(0)
        };
        let applied = |s: &SharedState<SimConfig>| {
            let a = s.read().unwrap_or_else(|p| p.into_inner());
            a.last_applied.map_or(0, |l| l.index)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.states.iter().any(|s| applied(s) < last) {
            if tokio::time::Instant::now() > deadline {
                return Err(C1mError::NotApplied { index: last });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let hashes: Vec<String> = self
            .states
            .iter()
            .map(|s| {
                let a = s.read().unwrap_or_else(|p| p.into_inner());
                // Encoding an in-memory state cannot fail; an empty hash would still differ.
                state_hash(&a.state).map(|h| blake3::Hash::from_bytes(h).to_hex().to_string()).unwrap_or_default()
            })
            .collect();
        if hashes.iter().any(|h| *h != hashes[0]) {
            return Err(C1mError::Diverged { index: last, hashes: hashes.join(" ") });
        }
        Ok((last, hashes[0].clone()))
    }
}

/// The server that leads now, as server 0 knows it (0 if none yet).
fn leader(world: &World) -> u64 {
    let w = world.lock();
    w.rafts
        .get(&0)
        .and_then(|r| r.metrics().borrow().current_leader)
        .unwrap_or(0)
}

/// Proposes `cmd` through the leader (following redirects) until it is committed and
/// applied there. One request id for every attempt, as a client keeps.
async fn propose(world: Arc<World>, cmd: Command) -> Result<(), C1mError> {
    let what = cmd.kind().to_string();
    let id = world.lock().request_id();
    let mut target = leader(&world);
    for _ in 0..100 {
        let (raft, req) = {
            let w = world.lock();
            let raft = w.rafts.get(&target).cloned();
            let req = Request { at_ms: w.node_clock_ms(target), by: node_id(0), cmd: cmd.clone(), id };
            (raft, req)
        };
        let Some(raft) = raft else {
            return Err(C1mError::NotCommitted { what, why: format!("no server n{target}") });
        };
        match tokio::time::timeout(Duration::from_secs(30), raft.client_write(req)).await {
            Ok(Ok(resp)) => {
                return match resp.data {
                    CommandResult::Ok => Ok(()),
                    CommandResult::Refused(r) => Err(C1mError::Refused { what, why: r.to_string() }),
                }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match f.leader_id {
                Some(l) => target = l,
                // An election is on: ask again shortly.
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Ok(Err(e)) => return Err(C1mError::NotCommitted { what, why: e.to_string() }),
            Err(_) => {
                return Err(C1mError::NotCommitted { what, why: "no answer within 30 s of simulated time".into() })
            }
        }
    }
    Err(C1mError::NotCommitted { what, why: "redirected 100 times".into() })
}

/// Runs `jobs` with at most `in_flight` at once; the first error ends it.
async fn bounded<F>(jobs: impl IntoIterator<Item = F>, in_flight: usize) -> Result<(), C1mError>
where
    F: Future<Output = Result<(), C1mError>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let joined = |r: Result<Result<(), C1mError>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| Err(C1mError::NotCommitted { what: "a proposal".into(), why: e.to_string() }))
    };
    for job in jobs {
        if set.len() >= in_flight.max(1) {
            if let Some(r) = set.join_next().await {
                joined(r)?;
            }
        }
        set.spawn(job);
    }
    while let Some(r) = set.join_next().await {
        joined(r)?;
    }
    Ok(())
}

/// Commits `commands` as batches of at most [`MAX_BATCH`].
async fn commit_batches(world: &Arc<World>, commands: Vec<VmCommand>, in_flight: usize) -> Result<(), C1mError> {
    let mut batches = Vec::new();
    let mut rest = commands.into_iter().peekable();
    while rest.peek().is_some() {
        let commands: Vec<VmCommand> = rest.by_ref().take(MAX_BATCH).collect();
        batches.push(propose(world.clone(), Command::Batch { commands }));
    }
    bounded(batches, in_flight).await
}

fn phase(wall: Instant, sim: tokio::time::Instant) -> Phase {
    Phase { wall: wall.elapsed(), sim: sim.elapsed() }
}

/// Nodes: 256 vCPUs, 1 TiB, 8 TiB, a `zone` label of 10 values. VMs: 1–2 vCPUs,
/// 256–1024 MiB, 4–16 GiB, one of 8 images; one in ten has a zone constraint, one in a
/// hundred an anti-affinity group of up to 50.
async fn run(o: C1mOptions) -> Result<C1mReport, C1mError> {
    let servers = Servers::start(&o).await?;
    let report = scenario(&o, &servers).await;
    servers.stop();
    tokio::task::yield_now().await;
    report
}

async fn scenario(o: &C1mOptions, servers: &Servers) -> Result<C1mReport, C1mError> {
    let world = &servers.world;
    let mut rng = SimRng::new(o.seed);
    let info = |i: usize| NodeInfo {
        addrs: Vec::new(),
        resources: Resources { cpus: 256, memory_mib: 1024 * 1024, disk_gib: 8192 },
        labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 10))]),
    };

    let (wall, sim) = (Instant::now(), tokio::time::Instant::now());
    let bootstrap = Command::Bootstrap { cluster_id: ClusterId([0xC1; 16]), node: node_id(0), info: info(0) };
    propose(world.clone(), bootstrap).await?;
    // Each node: a ticket, then its admission with it (in order; nodes concurrently).
    let joins = (1..o.nodes).map(|i| {
        let world = world.clone();
        let node = info(i);
        async move {
            let mut secret_hash = [0u8; 32];
            secret_hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let role = Role::Learner;
            propose(world.clone(), Command::CreateTicket { secret_hash, role, expires_at_ms: u64::MAX }).await?;
            propose(world, Command::AdmitNode { node: node_id(i), info: node, secret_hash, role }).await
        }
    });
    bounded(joins, o.in_flight * 4).await?;
    let images: Vec<Command> = (0..8u8)
        .map(|k| Command::PublishImage {
            hash: blake3::hash(&[k]).to_hex().to_string(),
            size: 1 << 30,
            kind: ImageKind::Bundle,
            name: Some(format!("img{k}")),
        })
        .collect();
    bounded(images.into_iter().map(|c| propose(world.clone(), c)), o.in_flight).await?;
    let join = phase(wall, sim);

    let (wall, sim) = (Instant::now(), tokio::time::Instant::now());
    let mut creates = Vec::with_capacity(o.vms);
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
            spec.constraints.insert("zone".into(), format!("z{}", rng.below(10)));
        }
        if rng.below(100) == 0 {
            spec.anti_affinity = Some(format!("g{}", v / 5000));
        }
        creates.push(VmCommand::CreateVm { spec, start: true });
    }
    commit_batches(world, creates, o.in_flight).await?;
    let create = phase(wall, sim);

    // Placement, as the leader's placer runs it: plan a round on the leader's applied
    // state, commit it, plan the next.
    let (wall, sim) = (Instant::now(), tokio::time::Instant::now());
    let (mut placed, mut rounds) = (0, 0);
    loop {
        let leader = servers.leader() as usize;
        let Some(state) = servers.states.get(leader) else {
            return Err(C1mError::NotCommitted { what: "placement".into(), why: format!("no server n{leader}") });
        };
        let plan = {
            let a = state.read().unwrap_or_else(|p| p.into_inner());
            let salt = a.last_applied.map_or(0, |l| l.index);
            a.state.plan_placements(a.state.node_views(|_| true), |_| false, salt, o.per_round)
        };
        rounds += 1;
        let places = plan.iter().filter(|p| matches!(p, Placement::Place { .. })).count();
        placed += places;
        let commands: Vec<VmCommand> = plan.into_iter().filter_map(Placement::into_command).collect();
        // The state machine checks every placement against capacity again; the planner
        // charged its views, so a refused batch is a planner bug and ends the run.
        commit_batches(world, commands, o.in_flight).await?;
        if places == 0 {
            break;
        }
    }
    let place = phase(wall, sim);

    let (entries, state_hash) = servers.agree().await?;
    let leader = servers.leader() as usize;
    let Some(state) = servers.states.get(leader) else {
        return Err(C1mError::NotCommitted { what: "placement".into(), why: format!("no server n{leader}") });
    };
    let a = state.read().unwrap_or_else(|p| p.into_inner());
    let used = crate::invariants::capacity::usage(&a.state);
    Ok(C1mReport {
        nodes: o.nodes,
        vms: o.vms,
        servers: o.servers,
        placed,
        unplaceable: a.state.vms.values().filter(|v| v.node.is_none()).count(),
        rounds,
        entries,
        join,
        create,
        place,
        max_vms_on_a_node: used.values().map(|u| u.3).max().unwrap_or(0),
        capacity_violations: crate::invariants::capacity::over_capacity(&a.state).len(),
        state_hash,
    })
}
