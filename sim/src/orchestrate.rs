//! The orchestration side of a simulated node: health gossip feeding the real failure
//! detector, the leader's placer and the node's executor. Their decisions are the node's
//! own pure functions: [`Detector`](blixard_reconcile::liveness::Detector) (who is alive,
//! whose VMs are lost), [`blixard_reconcile::fence`] (when to stop VMs cut off from a
//! majority), [`ClusterState::plan_placements`](blixard_state::ClusterState::plan_placements)
//! (where VMs go), [`ClusterState::wanted_on`](blixard_state::ClusterState::wanted_on) and
//! [`blixard_reconcile::plan`] (what a node does). The loops around them mirror
//! `blixard_node::{health, placer, executor}`; the I/O is simulated: gossip over the
//! simulated network, VMs on the [`SimBackend`].
//!
//! Every task is spawned on its node, so a crash aborts it mid-operation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use blixard_raft::storage::SharedState;
use blixard_reconcile::fence::{others_could_act, Fence, Step};
use blixard_reconcile::liveness::Liveness;
use blixard_reconcile::{plan, Action, ImageState, Local, Memory, Observed};
use blixard_state::Placement;
use blixard_types::gossip::NodeHealth;
use blixard_types::{Command, CommandResult, NodeId, Request};
use blixard_vmm::{Boot, Bundle, StopOptions, VmBackend, VmState};
use tokio::sync::mpsc;

use crate::backend::SimBackend;
use crate::cluster::{node_key, node_of};
use crate::network::Fate;
use crate::runtime;
use crate::world::World;
use crate::SimConfig;

/// The node-side settings of a run.
#[derive(Clone, Copy, Debug)]
pub struct Orchestration {
    /// How long a dead node's VMs wait before moving (the node's `placement_grace`).
    pub grace: Duration,
    /// Planted bug: the executor never fences.
    pub no_fence: bool,
}

const GOSSIP_EVERY: Duration = blixard_reconcile::liveness::INTERVAL;
const PLACER_TICK: Duration = Duration::from_millis(500);
const EXECUTOR_TICK: Duration = Duration::from_millis(250);
const PER_ROUND: usize = 256;
/// What each node's backend reserves against (matches the node info in cluster state).
pub const NODE_CAPACITY: blixard_vmm::Capacity = blixard_vmm::Capacity { vcpus: 4, memory_mib: 4096 };

fn sim_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Starts node `id`'s gossip, placer and executor (on the node, so a crash ends them).
pub fn start(world: &Arc<World>, id: u64, shared: SharedState<SimConfig>, o: Orchestration) {
    world.lock().detectors.insert(id, Default::default());
    runtime::spawn_on(id, gossip(world.clone(), id));
    runtime::spawn_on(id, placer(world.clone(), id, shared.clone(), o));
    runtime::spawn_on(id, executor(world.clone(), id, shared, o));
}

/// Sends a signed health report to every other node every interval; seq is the node's
/// clock in ms, bumped if needed, as in `blixard_node::health`.
async fn gossip(world: Arc<World>, id: u64) {
    let incarnation = world.lock().rng.next_u64();
    let mut seq = 0u64;
    loop {
        let report = {
            let w = world.lock();
            seq = w.node_clock_ms(id).max(seq + 1);
            let voters = voters(&w, id);
            let hears = w.detectors.get(&id).map(|d| d.hears(&node_key(id), &voters, sim_now())).unwrap_or_default();
            NodeHealth { seq, incarnation, hears, ..Default::default() }
        };
        broadcast(&world, id, id, &report);
        tokio::time::sleep(GOSSIP_EVERY).await;
    }
}

/// Sends `author`'s report from `from` to every node but the two. Gossip is epidemic: a node
/// that sees a report for the first time passes it on, so a report goes around a cut link.
fn broadcast(world: &Arc<World>, from: u64, author: u64, report: &NodeHealth) {
    let nodes: Vec<u64> = world.lock().node_ids.clone();
    for to in nodes.into_iter().filter(|n| *n != from && *n != author) {
        if let Fate::Delivered { delay_ms, .. } = world.plan(from, to, "gossip") {
            let (world, report) = (world.clone(), report.clone());
            // In flight: not the sender's task (it may crash meanwhile).
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let fresh = {
                    let mut w = world.lock();
                    if w.blocked.contains(&(from, to)) {
                        return;
                    }
                    let Some(det) = w.detectors.get_mut(&to) else { return };
                    det.observe(node_key(author), report.clone(), sim_now())
                };
                if fresh {
                    broadcast(&world, to, author, &report);
                }
            });
        }
    }
}

/// The voters in node `id`'s Raft membership.
fn voters(w: &crate::world::WorldState, id: u64) -> Vec<NodeId> {
    w.rafts
        .get(&id)
        .map(|r| r.metrics().borrow().membership_config.membership().voter_ids().map(node_key).collect())
        .unwrap_or_default()
}

/// Whether node `id` is cut off (`NodeCtx::cut_off`).
fn cut_off(w: &crate::world::WorldState, id: u64) -> bool {
    let me = node_key(id);
    let Some(det) = w.detectors.get(&id) else { return true };
    others_could_act(&voters(w, id), |v| det.in_touch(&me, v, sim_now()))
}

/// `who` as node `id` sees it (itself: alive).
fn alive(world: &World, id: u64, who: &NodeId) -> bool {
    *who == node_key(id)
        || world.lock().detectors.get(&id).is_some_and(|d| d.liveness(who, sim_now()) == Liveness::Alive)
}

/// Proposes `cmd` as node `id`, through the leader it knows (the hop to the leader is not
/// subject to loss, but a cut link stops it). `None`: not recorded.
async fn propose(world: &Arc<World>, id: u64, cmd: Command) -> Option<CommandResult> {
    let raft = {
        let w = world.lock();
        let own = w.rafts.get(&id)?;
        let leader = own.metrics().borrow().current_leader?;
        if leader != id && (w.blocked.contains(&(id, leader)) || w.blocked.contains(&(leader, id))) {
            return None;
        }
        w.rafts.get(&leader)?.clone()
    };
    let req = {
        let mut w = world.lock();
        Request { at_ms: w.node_clock_ms(id), by: node_key(id), cmd, id: w.request_id() }
    };
    match tokio::time::timeout(Duration::from_secs(5), raft.client_write(req)).await {
        Ok(Ok(resp)) => Some(resp.data),
        _ => None,
    }
}

/// The leader's placer (`blixard_node::placer`).
async fn placer(world: Arc<World>, id: u64, shared: SharedState<SimConfig>, o: Orchestration) {
    let me = node_key(id);
    let mut touch = Fence::new(sim_now());
    loop {
        tokio::time::sleep(PLACER_TICK).await;
        let cut_off = cut_off(&world.lock(), id);
        touch.step(cut_off, sim_now(), o.grace);
        let leads = world.lock().rafts.get(&id).is_some_and(|r| r.metrics().borrow().current_leader == Some(id));
        if !leads {
            continue;
        }
        let plan = {
            let Ok(st) = shared.read() else { return };
            let views = st.state.node_views(|n| alive(&world, id, n));
            let salt = st.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
            let w = world.lock();
            let det = w.detectors.get(&id).cloned().unwrap_or_default();
            let in_touch_for = touch.in_touch_for(sim_now());
            st.state.plan_placements(views, |n| *n != me && det.lost(n, sim_now(), o.grace, in_touch_for), salt, PER_ROUND)
        };
        let decided = tokio::time::Instant::now();
        let mut commands = Vec::new();
        for p in plan {
            if let Placement::Place { name, node, from } = &p {
                let mut w = world.lock();
                w.counters.bump(if from.is_some() { "vm_moves" } else { "vm_placements" });
                w.event(format_args!(
                    "n{id} places {name} on n{} (from {:?})",
                    node_of(node).unwrap_or(u64::MAX),
                    from.and_then(|f| node_of(&f))
                ));
            }
            commands.extend(p.into_command());
        }
        if commands.is_empty() {
            continue;
        }
        // One entry for the round; refused (the state moved since the plan): one at a time.
        match propose(&world, id, Command::Batch { commands: commands.clone() }).await {
            Some(CommandResult::Refused(_)) => {
                world.lock().counters.bump("placement_batches_refused");
                for c in commands {
                    if decided.elapsed() > PLACER_TICK || propose(&world, id, c.into()).await.is_none() {
                        break;
                    }
                }
            }
            Some(CommandResult::Ok) | None => {}
        }
    }
}

/// What the reconciler needs of a backend's VM (`blixard_node::executor::observe`, for a
/// guest with no health check).
fn observe(state: VmState, error: Option<String>) -> Observed {
    let local = match state {
        VmState::Created => Local::Created,
        VmState::Starting => Local::Starting,
        VmState::Running => Local::Running,
        VmState::Paused => Local::Paused,
        VmState::Stopping => Local::Stopping,
        VmState::Stopped => Local::Stopped,
        VmState::Failed => Local::Failed,
    };
    Observed { local: Some(local), healthy: (state == VmState::Running).then_some(true), error }
}

/// Whether node `id` has applied its leader's whole log (`Executor::catch_up_once`): the
/// executor acts only once it knows where its VMs are now. One look, no waiting: the loop
/// asks again next tick, and meanwhile goes on deciding whether to fence.
fn caught_up(world: &Arc<World>, id: u64, shared: &SharedState<SimConfig>) -> bool {
    let target = {
        let w = world.lock();
        let leader = w.rafts.get(&id).and_then(|r| r.metrics().borrow().current_leader);
        leader
            .filter(|l| !w.blocked.contains(&(id, *l)) && !w.blocked.contains(&(*l, id)))
            .and_then(|l| w.rafts.get(&l))
            .map(|r| r.metrics().borrow().last_log_index.unwrap_or(0))
    };
    let Some(target) = target else { return false };
    let applied = shared.read().ok().and_then(|a| a.last_applied.map(|l| l.index)).unwrap_or(0);
    let done = applied >= target;
    if done {
        world.lock().event(format_args!("n{id} executor caught up at {applied}"));
    }
    done
}

/// Waits until [`caught_up`] (at start: no VM runs on the node yet, so waiting is safe).
async fn catch_up(world: &Arc<World>, id: u64, shared: &SharedState<SimConfig>) {
    while !caught_up(world, id, shared) {
        tokio::time::sleep(EXECUTOR_TICK).await;
    }
}

type Done = (String, Result<(), String>);

/// The executor (`blixard_node::executor::Executor::run`).
async fn executor(world: Arc<World>, id: u64, shared: SharedState<SimConfig>, o: Orchestration) {
    let me = node_key(id);
    let backend = Arc::new(SimBackend { node: id, world: world.clone(), capacity: NODE_CAPACITY });
    catch_up(&world, id, &shared).await;
    let wanted_now = |shared: &SharedState<SimConfig>| shared.read().map(|s| s.state.wanted_on(&me)).unwrap_or_default();
    let mut memory: BTreeMap<String, Memory> = wanted_now(&shared)
        .into_keys()
        .map(|n| (n, Memory { stopped_on_purpose: true, ..Memory::default() }))
        .collect();
    let mut busy: BTreeSet<String> = BTreeSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut fence = Fence::new(sim_now());
    loop {
        tokio::time::sleep(EXECUTOR_TICK).await;
        while let Ok((name, res)) = done_rx.try_recv() {
            busy.remove(&name);
            if let Err(e) = res {
                let now = world.lock().now_ms();
                memory.entry(name).or_default().record_failure(e, now);
            }
        }
        let cut_off = cut_off(&world.lock(), id);
        match fence.step(cut_off && !o.no_fence, sim_now(), o.grace) {
            Step::Reconcile { resumed, back } => {
                if back {
                    world.lock().event(format_args!("n{id} in touch again"));
                }
                if resumed && !caught_up(&world, id, &shared) {
                    fence.retry_resume(back);
                    continue;
                }
                if back {
                    for m in memory.values_mut() {
                        m.stopped_on_purpose = true;
                        m.next_restart_ms = 0;
                    }
                }
            }
            Step::Wait => continue,
            Step::Fence { first } => {
                if first {
                    let mut w = world.lock();
                    w.counters.bump("fences");
                    w.event(format_args!("n{id} fences"));
                }
                for s in backend.list().await {
                    if s.state.is_active() {
                        let _ = backend.stop(&s.name, StopOptions::forced()).await;
                    }
                }
                continue;
            }
        }

        // One round (`Executor::round`).
        let wanted = wanted_now(&shared);
        let observed: BTreeMap<String, Observed> =
            backend.list().await.into_iter().map(|s| (s.name.clone(), observe(s.state, s.last_error))).collect();
        {
            let w = world.lock();
            let held = w.images_held.get(&id);
            for (name, v) in &wanted {
                let m = memory.entry(name.clone()).or_default();
                if held.is_some_and(|h| h.contains(&v.spec.image)) && m.image != ImageState::Ready {
                    m.image = ImageState::Ready;
                }
            }
        }
        let parked: BTreeMap<String, Memory> =
            busy.iter().filter_map(|n| memory.remove(n).map(|m| (n.clone(), m))).collect();
        let wanted: BTreeMap<_, _> = wanted.into_iter().filter(|(n, _)| !busy.contains(n)).collect();
        let observed: BTreeMap<_, _> = observed.into_iter().filter(|(n, _)| !busy.contains(n)).collect();
        let now_ms = world.lock().now_ms();
        let actions = plan(&wanted, &observed, &mut memory, now_ms);
        memory.extend(parked);

        let mut per_vm: BTreeMap<String, Vec<Action>> = BTreeMap::new();
        for a in actions {
            match a {
                Action::FetchImage(name) => {
                    if let Some(w) = wanted.get(&name) {
                        runtime::spawn_on(id, fetch(world.clone(), id, w.spec.image.clone()));
                    }
                }
                other => per_vm.entry(other.vm().to_string()).or_default().push(other),
            }
        }
        for (name, acts) in per_vm {
            busy.insert(name.clone());
            let spec = wanted.get(&name).map(|w| w.spec.clone());
            let (world, backend, done) = (world.clone(), backend.clone(), done_tx.clone());
            runtime::spawn_on(id, async move {
                let res = execute(&world, id, &backend, &name, acts, spec).await;
                let _ = done.send((name, res));
            });
        }
    }
}

/// Fetching an image: simulated time, then the node holds it (it stays across restarts).
async fn fetch(world: Arc<World>, id: u64, image: String) {
    let ms = world.lock().rng.range(10, 300);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    world.lock().images_held.entry(id).or_default().insert(image);
}

/// One VM's actions in order; the first failure ends the list (`Executor::execute`).
async fn execute(
    world: &Arc<World>,
    id: u64,
    b: &SimBackend,
    name: &str,
    actions: Vec<Action>,
    spec: Option<blixard_types::vm::VmSpec>,
) -> Result<(), String> {
    for a in actions {
        match a {
            Action::Report(_, report) => {
                let _ = propose(world, id, Command::ReportVm { name: name.into(), report }).await;
            }
            Action::Create(_) => {
                let s = spec.as_ref().ok_or("no spec")?;
                let boot = Boot::Bundle(Bundle {
                    kernel: format!("/sim/images/{}/kernel", s.image).into(),
                    initrd: None,
                    root_disk: None,
                    cmdline: String::new(),
                });
                b.create(blixard_vmm::VmSpec::new(name, s.vcpus, s.memory_mib, boot)).await.map_err(|e| e.to_string())?;
            }
            Action::Remove(_) => b.delete(name).await.map_err(|e| e.to_string())?,
            Action::Start(_) => drop(b.start(name).await.map_err(|e| e.to_string())?),
            Action::Stop(_) => drop(b.stop(name, StopOptions::graceful(Duration::from_secs(10))).await.map_err(|e| e.to_string())?),
            Action::Pause(_) => drop(b.pause(name).await.map_err(|e| e.to_string())?),
            Action::Resume(_) => drop(b.resume(name).await.map_err(|e| e.to_string())?),
            Action::Reboot(_) => drop(b.reboot(name).await.map_err(|e| e.to_string())?),
            Action::FetchImage(_) => {}
        }
    }
    Ok(())
}
