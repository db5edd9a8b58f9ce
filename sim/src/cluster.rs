//! One simulated run: start the nodes, bootstrap, a safety phase under faults, a liveness
//! phase without them, and the final checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as WallInstant};

use blixard_raft::storage::{open_with_backend, LogReader, OpenOptions, SharedState};
use blixard_raft::RaftNode;
use blixard_types::command::{NodeInfo, Refusal};
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request};
use openraft::error::{ClientWriteError, RaftError};
use openraft::storage::RaftLogStorage;
use openraft::{EntryPayload, RaftLogReader, ServerState};
use tokio::task::JoinHandle;

use crate::invariants::oracle::Ack;
use crate::backend::VmFaults;
use crate::network::SimNetwork;
use crate::orchestrate::{self, Orchestration};
use crate::rng::SimRng;
use crate::runtime;
use crate::storage::{digest, Bug, CheckedSm, SimLog};
use crate::world::{Counters, NetFaults, World, WorldState};
use crate::{Entry, Raft, SimConfig};

/// Which faults the nemesis injects during the safety phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultPlan {
    pub net: NetFaults,
    /// Pause between two nemesis actions (ms range).
    pub gap_ms: (u64, u64),
    pub partitions: bool,
    pub crashes: bool,
    pub clock_skew: bool,
    pub slow_disks: bool,
    /// How long a crashed node stays down (ms range).
    pub downtime_ms: (u64, u64),
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            net: NetFaults::CHAOS,
            gap_ms: (200, 2_000),
            partitions: true,
            crashes: true,
            clock_skew: true,
            slow_disks: true,
            downtime_ms: (50, 3_000),
        }
    }
}

impl FaultPlan {
    /// Crash-heavy, with short downtimes and slow messages: nodes restart while vote
    /// requests are still in flight, which is what exposes a forgotten vote.
    pub fn election_storm() -> Self {
        Self {
            net: NetFaults {
                spike: 0.3,
                spike_ms: (20, 300),
                ..NetFaults::CHAOS
            },
            gap_ms: (30, 200),
            downtime_ms: (5, 150),
            clock_skew: false,
            slow_disks: false,
            ..Self::default()
        }
    }
}

/// The named fault plans (`--faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Every fault kind, one nemesis action every 0.2–2 s, message loss/delay/duplication.
    Default,
    /// The same faults, one nemesis action every 0.1–0.5 s, shorter downtimes (short runs).
    Dense,
    /// Frequent short crashes and slow messages: elections under crashes.
    ElectionStorm,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Default, Profile::Dense, Profile::ElectionStorm];

    pub fn plan(self) -> FaultPlan {
        match self {
            Profile::Default => FaultPlan::default(),
            Profile::Dense => FaultPlan {
                gap_ms: (100, 500),
                downtime_ms: (20, 1_000),
                ..FaultPlan::default()
            },
            Profile::ElectionStorm => FaultPlan::election_storm(),
        }
    }

    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: u64,
    /// Simulated length of the safety phase (faults on).
    pub safety_ms: u64,
    /// Bound on the liveness phase: the cluster must converge within it.
    pub liveness_ms: u64,
    pub clients: u64,
    pub faults: FaultPlan,
    pub bug: Option<Bug>,
    /// Build a snapshot every this many applied entries (often, so that building, purging
    /// and installing snapshots happen within a run; production uses 10 000).
    pub snapshot_every: u64,
    /// Keep the trace as text (for `--seed` replays).
    pub keep_trace: bool,
    /// VMs created at the start (0: Raft only, no placer, executor or gossip).
    pub vms: u64,
    /// The nodes' placement grace: how long a dead node's VMs wait before they move.
    pub grace_ms: u64,
}

impl SimOptions {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 5,
            safety_ms: 20_000,
            liveness_ms: 30_000,
            clients: 3,
            faults: FaultPlan::default(),
            bug: None,
            snapshot_every: 100,
            keep_trace: false,
            vms: 6,
            grace_ms: 2_000,
        }
    }

    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p blixard-sim -- --seed {} --nodes {} --safety-ms {} --liveness-ms {}",
            self.seed, self.nodes, self.safety_ms, self.liveness_ms
        );
        match Profile::ALL.iter().find(|p| p.plan() == self.faults) {
            Some(Profile::Default) => {}
            Some(p) => cmd.push_str(&format!(" --faults {}", p.name())),
            None => cmd.push_str(&format!(" (with the fault plan {:?})", self.faults)),
        }
        if self.vms != 6 {
            cmd.push_str(&format!(" --vms {}", self.vms));
        }
        if self.grace_ms != 2_000 {
            cmd.push_str(&format!(" --grace-ms {}", self.grace_ms));
        }
        if self.snapshot_every != 100 {
            cmd.push_str(&format!(" --snapshot-every {}", self.snapshot_every));
        }
        if let Some(bug) = self.bug {
            let name = clap::ValueEnum::to_possible_value(&bug).map(|v| v.get_name().to_string());
            cmd.push_str(&format!(" --bug {}", name.unwrap_or_default()));
        }
        cmd
    }
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub sim_ms: u64,
    pub trace_hash: String,
    pub events: u64,
    pub counters: Counters,
    pub violations: Vec<String>,
    pub acked: usize,
    pub committed: usize,
    pub terms_with_leader: usize,
    pub trace: Vec<String>,
    pub wall: Duration,
}

/// Runs one seed on a fresh current-thread runtime with a paused clock (on this thread).
pub fn run_seed(opts: &SimOptions) -> Report {
    let wall = WallInstant::now();
    runtime::seed_thread_rng(opts.seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let mut report = match rt {
        Ok(rt) => {
            let report = rt.block_on(run(opts.clone()));
            // Dropping the runtime drops every task left (and the stores they own).
            drop(rt);
            report
        }
        Err(e) => Report {
            seed: opts.seed,
            sim_ms: 0,
            trace_hash: String::new(),
            events: 0,
            counters: Counters::default(),
            violations: vec![format!("cannot build the runtime: {e}")],
            acked: 0,
            committed: 0,
            terms_with_leader: 0,
            trace: Vec::new(),
            wall: Duration::ZERO,
        },
    };
    report.wall = wall.elapsed();
    report
}

/// The key node `id` is known by in cluster state.
pub fn node_key(id: u64) -> NodeId {
    NodeId([id as u8 + 1; 32])
}

/// The node a key of [`node_key`] stands for.
pub fn node_of(key: &NodeId) -> Option<u64> {
    let b = key.0[0];
    (key.0.iter().all(|x| *x == b) && b >= 1).then(|| u64::from(b) - 1)
}

fn client_key(c: u64) -> NodeId {
    NodeId([0xC0 + c as u8; 32])
}

/// The nodes, their files, and how to start and crash them.
struct Sim {
    world: Arc<World>,
    config: Arc<openraft::Config>,
    bug: Option<Bug>,
    nodes: u64,
    /// The orchestration side of each node (placer, executor, gossip), if VMs are simulated.
    orchestration: Option<Orchestration>,
    /// Tasks that are not any node's: nemesis, clients, checkers.
    background: Mutex<Vec<JoinHandle<()>>>,
    /// A stored-log reader and the applied state of each running node.
    handles: Mutex<BTreeMap<u64, NodeHandles>>,
}

/// What the checkers hold of a running node: a reader on its stored log, its applied state.
type NodeHandles = (LogReader<SimConfig>, SharedState<SimConfig>);

impl Sim {
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(f);
        let mut bg = self.background.lock().unwrap_or_else(|p| p.into_inner());
        bg.retain(|h| !h.is_finished());
        bg.push(handle);
    }

    fn stop_background(&self) {
        for h in self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }

    fn raft(&self, id: u64) -> Option<Raft> {
        self.world.lock().rafts.get(&id).cloned()
    }

    fn up(&self) -> BTreeSet<u64> {
        self.world.lock().rafts.keys().copied().collect()
    }

    /// Starts node `id` from its files (first start or restart after a crash).
    async fn start_node(self: &Arc<Self>, id: u64) {
        if self.raft(id).is_some() {
            return;
        }
        let label = PathBuf::from(format!("n{id}.redb"));
        let options = OpenOptions::default().inline_io(true);
        let disk = self.world.lock().disks.entry(id).or_default().clone();
        if self.bug == Some(Bug::LyingFsync) {
            disk.lie_about_syncs();
        }
        let mut tries = 0;
        // After a crash the aborted tasks drop their store handles when the runtime next
        // turns; until then the old database has the disk.
        let (log, sm) = loop {
            match disk.backend() {
                Some(backend) => match open_with_backend::<SimConfig>(backend, &label, options) {
                    Ok(stores) => break stores,
                    Err(e) => {
                        self.world.lock().violation(format!("n{id} cannot reopen its store: {e}"));
                        return;
                    }
                },
                None if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                None => {
                    self.world.lock().violation(format!("n{id}'s store is still open 100 ms after its crash"));
                    return;
                }
            }
        };
        let mut log = SimLog::new(log, id, self.world.clone(), self.bug);
        let reader = log.get_log_reader().await;
        let sm = CheckedSm::new(sm, id, self.world.clone());
        let shared = sm.shared();
        let network = SimNetwork {
            from: id,
            world: self.world.clone(),
        };
        let raft =
            match runtime::run_as(id, Raft::new(id, self.config.clone(), network, log, sm)).await {
                Ok(raft) => raft,
                Err(e) => {
                    self.world
                        .lock()
                        .violation(format!("n{id} failed to start: {e}"));
                    return;
                }
            };
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (reader, shared.clone()));
        let metrics = raft.metrics();
        let elections = blixard_raft::elections::break_split_votes(
            raft.clone(),
            self.config.election_timeout_min,
            self.config.election_timeout_max,
        );
        {
            let mut w = self.world.lock();
            w.rafts.insert(id, raft);
            w.event(format_args!("n{id} up"));
        }
        runtime::spawn_on(id, watch_metrics(id, metrics, self.world.clone()));
        runtime::spawn_on(id, elections);
        if let Some(o) = self.orchestration {
            orchestrate::start(&self.world, id, shared, o);
        }
    }

    /// Crashes node `id`: all its tasks are aborted mid-flight; its files stay.
    fn crash_node(&self, id: u64, teardown: bool) {
        let raft = self.world.lock().rafts.remove(&id);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let tasks = runtime::crash(id);
        drop(raft);
        let mut w = self.world.lock();
        w.kill_vms(id);
        w.detectors.remove(&id);
        if teardown {
            w.event(format_args!("n{id} stopped ({tasks} tasks)"));
        } else {
            w.counters.bump("crashes");
            w.event(format_args!("n{id} crash ({tasks} tasks)"));
        }
    }

    /// Compares each running node's stored log, up to what it applied, with the committed log.
    async fn check_logs(&self) {
        let handles: Vec<_> = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, (r, s))| (*id, r.clone(), s.clone()))
            .collect();
        for (id, mut reader, shared) in handles {
            let applied = shared
                .read()
                .ok()
                .and_then(|a| a.last_applied.map(|l| l.index));
            let Some(applied) = applied else { continue };
            // Entries a snapshot covers are not the log any more: openraft never reads them
            // and purges them soon. After installing a snapshot whose last entry it did not
            // have, it does not truncate older, conflicting entries first, and its metrics
            // lag the install, so the install itself sets the floor.
            let covered = self.raft(id).and_then(|r| {
                let m = r.metrics().borrow().clone();
                m.purged.max(m.snapshot).map(|l| l.index)
            });
            let installed = self.world.lock().snapshot_floor.get(&id).copied();
            let from = covered.max(installed).map_or(0, |i| i + 1);
            // The store reads inline: no other task runs between these lines.
            let entries: Vec<Entry> = match reader.try_get_log_entries(from..=applied).await {
                Ok(e) => e,
                Err(e) => {
                    self.world
                        .lock()
                        .violation(format!("n{id} cannot read its log: {e}"));
                    continue;
                }
            };
            let digests: Vec<_> = entries
                .iter()
                .map(|e| (e.log_id.index, digest(e)))
                .collect();
            let mut w = self.world.lock();
            for v in w.checks.committed.check_log(id, &digests) {
                w.violation(v);
            }
        }
    }

    /// No node's placed VMs exceed its capacity, on any running node's applied state.
    fn check_capacity(&self) {
        let found: Vec<String> = {
            let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            handles
                .iter()
                .filter_map(|(id, (_, shared))| {
                    let st = shared.read().ok()?;
                    let v = crate::invariants::capacity::over_capacity(&st.state);
                    (!v.is_empty()).then(|| format!("n{id}'s state: {}", v.join("; ")))
                })
                .collect()
        };
        let mut w = self.world.lock();
        for v in found {
            w.violation(v);
        }
    }

    /// Starts again every VM the cluster records as failed (what an operator would do).
    async fn restart_failed_vms(&self) {
        let failed: Vec<String> = {
            let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            let Some((_, shared)) = handles.iter().next().map(|(_, h)| h.clone()) else { return };
            let Ok(st) = shared.read() else { return };
            st.state
                .vms
                .iter()
                .filter(|(_, v)| v.state == blixard_types::vm::VmState::Failed && !v.deleting)
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in failed {
            let leader = self.raft(0).and_then(|r| r.metrics().borrow().current_leader).unwrap_or(0);
            let cmd = Command::SetDesired { name: name.clone(), desired: blixard_types::vm::Desired::Running };
            if let WriteOutcome::Acked(_) = write(self, leader, None, cmd, client_key(0)).await {
                let mut w = self.world.lock();
                w.counters.bump("operator_restarts");
                w.event(format_args!("operator starts {name} again"));
            }
        }
    }

    /// Whether the healed cluster has converged; if not, why not.
    fn converged(&self) -> Result<u64, String> {
        let w = self.world.lock();
        if w.rafts.len() as u64 != self.nodes {
            return Err(format!("only {} of {} nodes up", w.rafts.len(), self.nodes));
        }
        let metrics: Vec<_> = w
            .rafts
            .iter()
            .map(|(id, r)| (*id, r.metrics().borrow().clone()))
            .collect();
        let leaders: Vec<_> = metrics
            .iter()
            .filter(|(_, m)| m.state == ServerState::Leader)
            .collect();
        let [(leader, lm)] = leaders.as_slice() else {
            return Err(format!("{} leaders", leaders.len()));
        };
        if let Some((id, _)) = metrics
            .iter()
            .find(|(_, m)| m.current_leader != Some(*leader))
        {
            return Err(format!("n{id} does not follow leader n{leader}"));
        }
        let last = lm.last_log_index.unwrap_or(0);
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        for (id, (_, shared)) in handles.iter() {
            let Ok(applied) = shared.read() else {
                return Err(format!("n{id} state lock poisoned"));
            };
            let at = applied.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
            if at != last {
                return Err(format!("n{id} applied {at}, leader n{leader} has {last}"));
            }
            let empty = BTreeMap::new();
            let labels = applied
                .state
                .nodes
                .get(&node_key(0))
                .map(|n| &n.labels)
                .unwrap_or(&empty);
            let missing = w.checks.oracle.missing(labels).next().map(str::to_owned);
            if let Some(key) = missing {
                return Err(format!("n{id} misses acknowledged write {key}"));
            }
            if *id == *leader && self.orchestration.is_some() {
                vms_as_desired(&applied.state, &w.backends)?;
            }
        }
        Ok(*leader)
    }
}

/// Follows one node's metrics: records term/role changes and checks election safety.
async fn watch_metrics(
    id: u64,
    mut rx: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, RaftNode>>,
    world: Arc<World>,
) {
    let mut last = None;
    loop {
        {
            let m = rx.borrow_and_update();
            let key = (m.current_term, m.state, m.current_leader);
            let mut w = world.lock();
            if last != Some(key) {
                last = Some(key);
                w.event(format_args!(
                    "n{id} term {} {:?} leader {:?}",
                    m.current_term, m.state, m.current_leader
                ));
                if m.state == ServerState::Leader {
                    let v = w.checks.election.observe_leader(id, m.current_term);
                    w.violations_opt(v);
                }
            }
            let v = w.checks.election.observe_vote(id, m.vote);
            w.violations_opt(v);
            if let Err(fatal) = &m.running_state {
                w.violation(format!("n{id} raft stopped: {fatal}"));
                return;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Writes through node `target` (following redirects); `Ok(Some(ack digest))` if acknowledged.
enum WriteOutcome {
    Acked(Ack),
    Refused(Refusal),
    Redirect(Option<u64>),
    Unknown,
}

async fn write(
    sim: &Sim,
    target: u64,
    key: Option<String>,
    cmd: Command,
    by: NodeId,
) -> WriteOutcome {
    let Some(raft) = sim.raft(target) else {
        return WriteOutcome::Redirect(None);
    };
    let req = {
        let mut w = sim.world.lock();
        Request {
            at_ms: w.node_clock_ms(target),
            by,
            cmd,
            id: w.request_id(),
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), raft.client_write(req.clone())).await {
        Ok(Ok(resp)) => match resp.data {
            CommandResult::Ok => {
                let entry = Entry {
                    log_id: resp.log_id,
                    payload: EntryPayload::Normal(req),
                };
                WriteOutcome::Acked(Ack {
                    key: key.unwrap_or_default(),
                    index: resp.log_id.index,
                    digest: digest(&entry),
                })
            }
            CommandResult::Refused(r) => WriteOutcome::Refused(r),
        },
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            WriteOutcome::Redirect(f.leader_id)
        }
        _ => WriteOutcome::Unknown,
    }
}

/// A client: writes a fresh label key now and then, and records what was acknowledged.
async fn client(sim: Arc<Sim>, c: u64, mut rng: SimRng) {
    let mut target = rng.below(sim.nodes);
    for n in 0.. {
        tokio::time::sleep(Duration::from_millis(rng.range(20, 300))).await;
        let key = format!("c{c}-w{n}");
        let cmd = Command::SetLabels {
            node: node_key(0),
            set: BTreeMap::from([(key.clone(), "1".to_string())]),
            remove: Vec::new(),
        };
        sim.world.lock().counters.bump("client_writes");
        let outcome = write(&sim, target, Some(key.clone()), cmd, client_key(c)).await;
        let mut w = sim.world.lock();
        match outcome {
            WriteOutcome::Acked(ack) => {
                w.counters.bump("client_acks");
                w.event(format_args!(
                    "client {c} ack {key} at {} via n{target}",
                    ack.index
                ));
                w.checks.oracle.on_ack(ack);
            }
            WriteOutcome::Refused(r) => {
                w.counters.bump("client_refused");
                w.event(format_args!("client {c} refused {key}: {r}"));
            }
            WriteOutcome::Redirect(leader) => {
                w.counters.bump("client_redirects");
                target = leader.unwrap_or_else(|| rng.below(sim.nodes));
            }
            WriteOutcome::Unknown => {
                w.counters.bump("client_unknown");
                w.event(format_args!("client {c} unknown outcome {key}"));
                target = rng.below(sim.nodes);
            }
        }
    }
}

/// The nemesis: injects one fault at a time, each healing on its own after a while.
async fn nemesis(sim: Arc<Sim>, plan: FaultPlan, mut rng: SimRng) {
    let n = sim.nodes;
    let mut kinds = Vec::new();
    if plan.partitions {
        kinds.extend(["partition_symmetric", "partition_one_way"]);
    }
    if plan.crashes {
        kinds.extend(["crash", "crash", "power_loss"]);
    }
    if plan.clock_skew {
        kinds.push("clock_skew");
    }
    if plan.slow_disks {
        kinds.push("slow_disk");
    }
    if plan.crashes && sim.orchestration.is_some() {
        kinds.push("vm_crash");
    }
    if kinds.is_empty() {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(
            rng.range(plan.gap_ms.0, plan.gap_ms.1),
        ))
        .await;
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        match kind {
            "partition_symmetric" | "partition_one_way" => {
                // Side A: a random non-empty proper subset.
                let side: BTreeSet<u64> = loop {
                    let s: BTreeSet<u64> = (0..n).filter(|_| rng.chance(0.5)).collect();
                    if !s.is_empty() && s.len() < n as usize {
                        break s;
                    }
                };
                let mut cut = Vec::new();
                for a in &side {
                    for b in (0..n).filter(|b| !side.contains(b)) {
                        cut.push((*a, b));
                        if kind == "partition_symmetric" {
                            cut.push((b, *a));
                        }
                    }
                }
                let heal_after = rng.range(300, 5_000);
                {
                    let mut w = sim.world.lock();
                    w.counters.bump(kind);
                    w.event(format_args!("nemesis {kind} {side:?} for {heal_after}ms"));
                    w.blocked.extend(cut.iter().copied());
                }
                let s = sim.clone();
                sim.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(heal_after)).await;
                    let mut w = s.world.lock();
                    for link in &cut {
                        w.blocked.remove(link);
                    }
                    w.event(format_args!("nemesis heal {side:?}"));
                });
            }
            "crash" | "power_loss" => {
                let up: Vec<u64> = sim.up().into_iter().collect();
                // Keep at least one node up, so the run is not only restarts.
                if up.len() <= 1 {
                    continue;
                }
                let id = up[rng.below(up.len() as u64) as usize];
                let down_for = rng.range(plan.downtime_ms.0, plan.downtime_ms.1);
                sim.crash_node(id, false);
                if kind == "power_loss" {
                    // The machine, not only the process: what was not synced is gone.
                    let mut w = sim.world.lock();
                    let pages = w.disks.get(&id).map_or(0, |d| d.power_off());
                    w.counters.bump("power_losses");
                    w.event(format_args!("n{id} power loss: {pages} unsynced pages lost"));
                }
                let s = sim.clone();
                sim.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(down_for)).await;
                    s.world.lock().counters.bump("restarts");
                    s.start_node(id).await;
                });
            }
            "clock_skew" => {
                let id = rng.below(n);
                let skew = rng.range(0, 60_000) as i64 - 30_000;
                let mut w = sim.world.lock();
                w.counters.bump("clock_skew");
                w.event(format_args!("nemesis n{id} clock skew {skew}ms"));
                w.clock_offset_ms.insert(id, skew);
            }
            "vm_crash" => {
                // A guest dies on its own (the hypervisor exits): its node must notice and
                // restart it per its policy.
                let mut w = sim.world.lock();
                let running: Vec<(u64, String)> = w
                    .backends
                    .iter()
                    .flat_map(|(n, b)| b.iter().filter(|(_, v)| v.state == blixard_vmm::VmState::Running).map(|(name, _)| (*n, name.clone())))
                    .collect();
                if running.is_empty() {
                    continue;
                }
                let (node, name) = running[rng.below(running.len() as u64) as usize].clone();
                w.counters.bump("vm_crash");
                w.set_vm_state(node, &name, blixard_vmm::VmState::Failed, Some("simulated: the guest crashed".into()));
            }
            _ => {
                let id = rng.below(n);
                let slow = (rng.range(1, 20), rng.range(20, 400));
                let for_ms = rng.range(500, 5_000);
                {
                    let mut w = sim.world.lock();
                    w.counters.bump("slow_disk");
                    w.event(format_args!(
                        "nemesis n{id} slow disk {slow:?}ms for {for_ms}ms"
                    ));
                    w.slow_disk.insert(id, slow);
                }
                let s = sim.clone();
                sim.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(for_ms)).await;
                    s.world.lock().slow_disk.remove(&id);
                });
            }
        }
    }
}

async fn run(opts: SimOptions) -> Report {
    let world = Arc::new(World::new(WorldState::new(opts.seed, opts.keep_trace)));
    let finish = |world: &World, extra: Option<String>| {
        let mut w = world.lock();
        if let Some(v) = extra {
            w.violation(v);
        }
        Report {
            seed: opts.seed,
            sim_ms: w.now_ms(),
            trace_hash: w.trace.hash(),
            events: w.trace.events,
            counters: w.counters.clone(),
            violations: w.violations.clone(),
            acked: w.checks.oracle.acked(),
            committed: w.checks.committed.len(),
            terms_with_leader: w.checks.election.terms_with_leader(),
            trace: w.trace.take_lines(),
            wall: Duration::ZERO,
        }
    };
    let mut config = blixard_raft::storage::default_config();
    config.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(opts.snapshot_every);
    config.max_in_snapshot_log_to_keep = opts.snapshot_every / 5;
    config.purge_batch_size = 16;
    let config = match config.validate() {
        Ok(c) => Arc::new(c),
        Err(e) => return finish(&world, Some(format!("invalid raft config: {e}"))),
    };
    world.lock().node_ids = (0..opts.nodes).collect();
    let sim = Arc::new(Sim {
        world: world.clone(),
        config,
        bug: opts.bug,
        nodes: opts.nodes,
        orchestration: (opts.vms > 0).then_some(Orchestration {
            grace: Duration::from_millis(opts.grace_ms),
            no_fence: opts.bug == Some(Bug::NoFence),
        }),
        background: Mutex::new(Vec::new()),
        handles: Mutex::new(BTreeMap::new()),
    });
    let outcome = phases(&sim, &opts).await;
    // Stop everything before the files go.
    sim.stop_background();
    for id in sim.up() {
        sim.crash_node(id, true);
    }
    tokio::task::yield_now().await;
    let report = finish(&world, outcome.err());
    drop(sim);
    report
}

/// Setup, safety phase, liveness phase. `Err` is a violation that ended the run.
async fn phases(sim: &Arc<Sim>, opts: &SimOptions) -> Result<(), String> {
    let n = opts.nodes;
    for id in 0..n {
        sim.start_node(id).await;
    }
    let members: BTreeMap<u64, RaftNode> = (0..n).map(|id| (id, RaftNode::default())).collect();
    let raft0 = sim.raft(0).ok_or("n0 did not start")?;
    raft0
        .initialize(members)
        .await
        .map_err(|e| format!("initialize failed: {e}"))?;
    drop(raft0);

    // Bootstrap the cluster state under calm conditions.
    let mut target = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err("liveness: could not bootstrap within 10s of calm".into());
        }
        let cmd = Command::Bootstrap {
            cluster_id: ClusterId([7; 16]),
            node: node_key(0),
            info: node_info(),
        };
        match write(sim, target, None, cmd, node_key(0)).await {
            WriteOutcome::Acked(_) | WriteOutcome::Refused(Refusal::AlreadyBootstrapped) => break,
            WriteOutcome::Redirect(Some(l)) => target = l,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    sim.world.lock().event("bootstrapped");
    if opts.vms > 0 {
        setup_vms(sim, opts).await?;
    }

    // Safety phase.
    {
        let mut w = sim.world.lock();
        w.net = opts.faults.net;
        if opts.faults.crashes {
            w.vm_faults = VmFaults::CHAOS;
        }
        w.event("safety phase");
    }
    sim.spawn(nemesis(
        sim.clone(),
        opts.faults,
        SimRng::fork(opts.seed, 0x4e454d),
    ));
    for c in 0..opts.clients {
        sim.spawn(client(
            sim.clone(),
            c,
            SimRng::fork(opts.seed, 0xC11E47 + c),
        ));
    }
    let safety_end = tokio::time::Instant::now() + Duration::from_millis(opts.safety_ms);
    while tokio::time::Instant::now() < safety_end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        sim.check_logs().await;
        sim.check_capacity();
    }

    // Liveness phase: no more faults; everything heals; the cluster must converge.
    sim.stop_background();
    {
        let mut w = sim.world.lock();
        w.net = NetFaults::CALM;
        w.vm_faults = VmFaults::CALM;
        w.blocked.clear();
        w.slow_disk.clear();
        w.event("liveness phase: healed");
    }
    for id in 0..n {
        sim.start_node(id).await;
    }
    let start = tokio::time::Instant::now();
    let bound = Duration::from_millis(opts.liveness_ms);
    let mut restarted_at = tokio::time::Instant::now();
    let leader = loop {
        match sim.converged() {
            Ok(leader) => break leader,
            Err(why) if start.elapsed() > bound => {
                return Err(format!(
                    "liveness: not converged {} after healing: {why}",
                    crate::fmt_ms(opts.liveness_ms)
                ))
            }
            Err(_) => {
                // An operator starts again the VMs that gave up (out of restarts) under
                // the faults, once a second.
                if restarted_at.elapsed() >= Duration::from_secs(1) {
                    restarted_at = tokio::time::Instant::now();
                    sim.restart_failed_vms().await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    };
    sim.world
        .lock()
        .event(format_args!("converged, leader n{leader}"));

    // A fresh write must still be accepted and reach everyone.
    let key = "probe".to_string();
    let cmd = Command::SetLabels {
        node: node_key(0),
        set: BTreeMap::from([(key.clone(), "1".into())]),
        remove: Vec::new(),
    };
    match write(sim, leader, Some(key), cmd, client_key(0)).await {
        WriteOutcome::Acked(ack) => sim.world.lock().checks.oracle.on_ack(ack),
        _ => return Err("liveness: the healed cluster did not acknowledge a probe write".into()),
    }
    loop {
        match sim.converged() {
            Ok(_) => break,
            Err(why) if start.elapsed() > bound => {
                return Err(format!(
                    "liveness: probe write not applied everywhere: {why}"
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    sim.check_logs().await;
    let mut w = sim.world.lock();
    let found = w.checks.oracle.check_committed(&w.checks.committed);
    for v in found {
        w.violation(v);
    }
    w.event("done");
    Ok(())
}

/// Each simulated node's resources: room for four of the run's VMs.
fn node_info() -> NodeInfo {
    NodeInfo {
        addrs: Vec::new(),
        resources: blixard_types::command::Resources {
            cpus: orchestrate::NODE_CAPACITY.vcpus,
            memory_mib: orchestrate::NODE_CAPACITY.memory_mib,
            disk_gib: 100,
        },
        labels: BTreeMap::new(),
    }
}

/// Writes one setup command under calm conditions (following redirects).
async fn setup_write(sim: &Sim, cmd: Command) -> Result<(), String> {
    let what = cmd.kind();
    let mut target = sim.raft(0).and_then(|r| r.metrics().borrow().current_leader).unwrap_or(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("setup: {what} not written within 10s of calm"));
        }
        match write(sim, target, None, cmd.clone(), node_key(0)).await {
            WriteOutcome::Acked(_) => return Ok(()),
            WriteOutcome::Refused(r) => return Err(format!("setup: {what} refused: {r}")),
            WriteOutcome::Redirect(Some(l)) => target = l,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Admits every node to the cluster state, publishes an image and creates the VMs
/// (alternately 1 and 2 vCPUs, 512 MiB, restart policy `always`).
async fn setup_vms(sim: &Sim, opts: &SimOptions) -> Result<(), String> {
    use blixard_types::ticket::Role;
    for id in 1..opts.nodes {
        let secret_hash = *blake3::hash(&id.to_le_bytes()).as_bytes();
        setup_write(sim, Command::CreateTicket { secret_hash, role: Role::Voter, expires_at_ms: u64::MAX }).await?;
        setup_write(sim, Command::AdmitNode { node: node_key(id), info: node_info(), secret_hash, role: Role::Voter })
            .await?;
    }
    let image = blake3::hash(b"sim-image").to_hex().to_string();
    setup_write(
        sim,
        Command::PublishImage {
            hash: image,
            size: 1 << 20,
            kind: blixard_types::image::ImageKind::Bundle,
            name: Some("sim".into()),
        },
    )
    .await?;
    for v in 0..opts.vms {
        let spec = blixard_types::vm::VmSpec {
            name: format!("vm{v}"),
            image: "sim".into(),
            vcpus: 1 + (v % 2) as u32,
            memory_mib: 512,
            disk_gib: 4,
            labels: BTreeMap::new(),
            constraints: BTreeMap::new(),
            anti_affinity: None,
            restart: blixard_types::vm::RestartPolicy::Always,
            health: None,
        };
        setup_write(sim, Command::CreateVm { spec, start: true }).await?;
    }
    sim.world.lock().event(format_args!("{} VMs created", opts.vms));
    Ok(())
}

/// After healing: every VM wanted running runs on the node it is placed on, is recorded
/// running, and no other node has any trace of it (no orphans); no node has a VM the
/// cluster does not know.
fn vms_as_desired(
    state: &blixard_state::ClusterState,
    backends: &BTreeMap<u64, BTreeMap<String, crate::backend::SimVm>>,
) -> Result<(), String> {
    use blixard_types::vm::{Desired, VmState};
    for (name, v) in &state.vms {
        if v.deleting || v.desired != Desired::Running {
            continue;
        }
        let Some(node) = v.node else {
            return Err(format!("VM {name} not placed ({})", v.error.as_deref().unwrap_or("no error")));
        };
        let Some(n) = node_of(&node) else {
            return Err(format!("VM {name} placed on an unknown node"));
        };
        if v.state != VmState::Running {
            return Err(format!("VM {name} recorded {:?} on n{n}", v.state));
        }
        match backends.get(&n).and_then(|b| b.get(name)) {
            Some(vm) if vm.state == blixard_vmm::VmState::Running => {}
            Some(vm) => return Err(format!("VM {name} is {} on n{n}", vm.state)),
            None => return Err(format!("VM {name} missing on n{n}")),
        }
        if let Some((other, vm)) =
            backends.iter().filter(|(o, _)| **o != n).find_map(|(o, b)| b.get(name).map(|vm| (*o, vm)))
        {
            return Err(format!("VM {name} placed on n{n} but n{other} still has it ({})", vm.state));
        }
    }
    for (n, b) in backends {
        if let Some(name) = b.keys().find(|name| !state.vms.contains_key(*name)) {
            return Err(format!("n{n} has VM {name}, which the cluster does not know"));
        }
    }
    Ok(())
}
