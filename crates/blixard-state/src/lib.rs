//! The replicated cluster state and its deterministic `apply`.
//!
//! This crate is the home of all cluster state (members, clients, tickets, and later VMs,
//! images and placements). **Invariant:** `apply` is a pure function of the state and the
//! request: no clock (time arrives in `Request::at_ms`), no randomness, no I/O. A refused
//! command leaves the state untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use blixard_types::image::{is_full_hash, validate_image_name, ImageKind, MIN_HASH_PREFIX};
use blixard_types::command::{validate_label, NodeInfo, Refusal, Resources, VmCommand, MAX_BATCH};
use blixard_types::ticket::ticket_id;
use blixard_scheduler::{NodeView, Policy};
use blixard_types::vm::{Desired, VmReport, VmSpec, VmState};
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request, Role};
use serde::{Deserialize, Serialize};

/// Format version of [`ClusterState`] inside snapshots.
pub const STATE_VERSION: u32 = 2;

/// A cluster member as recorded in Raft state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub addrs: Vec<SocketAddr>,
    pub resources: Resources,
    pub labels: BTreeMap<String, String>,
    /// The role its ticket granted (voter or learner).
    pub role: Role,
    pub joined_at_ms: u64,
}

/// How a VM's error starts when no node could take it.
const CANNOT_PLACE: &str = "cannot place";

/// The error recorded by `PlacementFailed` (the planner compares against it).
fn placement_error(reason: &str) -> String {
    format!("{CANNOT_PLACE}: {reason}")
}

/// One decision of [`ClusterState::plan_placements`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Put VM `name` on `node` (moving it from `from`, if it had a node).
    Place {
        name: String,
        node: NodeId,
        from: Option<NodeId>,
    },
    /// No node can take it now; `changed` says whether `reason` differs from what is
    /// recorded (only then is it worth a Raft entry).
    Unplaceable {
        name: String,
        reason: String,
        changed: bool,
    },
}

impl Placement {
    /// The entry that records this decision: the placement, or why there is none when that
    /// changed; `None` when there is nothing new to record.
    pub fn into_command(self) -> Option<VmCommand> {
        match self {
            Placement::Place { name, node, .. } => Some(VmCommand::PlaceVm { name, node }),
            Placement::Unplaceable { name, reason, changed: true } => Some(VmCommand::PlacementFailed { name, reason }),
            Placement::Unplaceable { changed: false, .. } => None,
        }
    }
}

/// An issued ticket; only the hash of its secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    pub role: Role,
    pub expires_at_ms: u64,
    pub created_at_ms: u64,
    pub created_by: NodeId,
    pub revoked: bool,
}

/// A CLI key allowed to use the client API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub authorized_at_ms: u64,
    pub ticket_id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: Option<ClusterId>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Keys removed for good.
    pub removed: BTreeSet<NodeId>,
    pub clients: BTreeMap<NodeId, ClientRecord>,
    /// Keyed by the BLAKE3 hash of the secret.
    pub tickets: BTreeMap<[u8; 32], TicketRecord>,
    /// VMs by name.
    pub vms: BTreeMap<String, VmRecord>,
    /// Nodes that take no new VMs.
    pub drained: BTreeSet<NodeId>,
    /// Cluster-wide placement policy (overcommit, strategy).
    pub policy: Policy,
    /// What the VMs placed on each node use: derived from `vms`, kept incrementally so
    /// that placement costs O(nodes), not O(VMs).
    pub usage: BTreeMap<NodeId, NodeUsage>,
    /// The image catalogue, by full hash.
    pub images: BTreeMap<String, ImageRecord>,
    /// Image names → full hash.
    pub image_names: BTreeMap<String, String>,
    /// Ids of the requests applied last, so that one sent again is not applied twice.
    pub applied_requests: RecentIds,
}

/// How many request ids the state remembers. A proposal is sent again within seconds (a
/// forward that timed out); this many writes take longer than that even at full speed.
pub const REMEMBERED_REQUESTS: usize = 16_384;

/// The ids of the last [`REMEMBERED_REQUESTS`] applied requests, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "std::collections::VecDeque<u128>", into = "std::collections::VecDeque<u128>")]
pub struct RecentIds {
    order: std::collections::VecDeque<u128>,
    index: BTreeSet<u128>,
}

impl RecentIds {
    pub fn contains(&self, id: u128) -> bool {
        self.index.contains(&id)
    }

    fn insert(&mut self, id: u128) {
        if self.index.insert(id) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED_REQUESTS {
                if let Some(old) = self.order.pop_front() {
                    self.index.remove(&old);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl From<std::collections::VecDeque<u128>> for RecentIds {
    fn from(order: std::collections::VecDeque<u128>) -> Self {
        let index = order.iter().copied().collect();
        Self { order, index }
    }
}

impl From<RecentIds> for std::collections::VecDeque<u128> {
    fn from(r: RecentIds) -> Self {
        r.order
    }
}

/// An image in the catalogue. Its bytes live in the nodes' image stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub size: u64,
    pub kind: ImageKind,
    /// The key that published it (a CLI key or a member).
    pub publisher: NodeId,
    pub created_at_ms: u64,
    /// Names pointing at it.
    pub names: BTreeSet<String>,
}

/// The sum of what the VMs placed on a node ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    pub used: Resources,
    /// VMs per anti-affinity group.
    pub groups: BTreeMap<String, u32>,
    /// VMs per image.
    pub images: BTreeMap<String, u32>,
    pub vms: u32,
}

impl NodeUsage {
    fn charge(&mut self, spec: &VmSpec) {
        self.used.cpus += spec.vcpus;
        self.used.memory_mib += spec.memory_mib;
        self.used.disk_gib += spec.disk_gib;
        self.vms += 1;
        *self.images.entry(spec.image.clone()).or_default() += 1;
        if let Some(g) = &spec.anti_affinity {
            *self.groups.entry(g.clone()).or_default() += 1;
        }
    }

    fn release(&mut self, spec: &VmSpec) {
        self.used.cpus = self.used.cpus.saturating_sub(spec.vcpus);
        self.used.memory_mib = self.used.memory_mib.saturating_sub(spec.memory_mib);
        self.used.disk_gib = self.used.disk_gib.saturating_sub(spec.disk_gib);
        self.vms = self.vms.saturating_sub(1);
        decrement(&mut self.images, &spec.image);
        if let Some(g) = &spec.anti_affinity {
            decrement(&mut self.groups, g);
        }
    }
}

fn decrement(map: &mut BTreeMap<String, u32>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// A VM: what the user asked for, where it runs, and what its node last reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The spec, with `image` resolved to the image's full hash when the VM was created
    /// (a later push under the same name does not change a VM's image).
    pub spec: VmSpec,
    /// The image reference as the user gave it (a name or a hash).
    pub image_ref: String,
    pub desired: Desired,
    /// Deleted by the user; the record goes when its node confirms.
    pub deleting: bool,
    pub node: Option<NodeId>,
    pub state: VmState,
    pub healthy: Option<bool>,
    pub error: Option<String>,
    pub restarts: u32,
    pub reboots_requested: u64,
    pub reboots_done: u64,
    pub created_at_ms: u64,
    /// When `state` last changed.
    pub since_ms: u64,
}

impl ClusterState {
    /// True if `key` is a current member (may speak raft and internal protocols).
    pub fn is_member(&self, key: &NodeId) -> bool {
        self.nodes.contains_key(key)
    }

    /// True if `key` may use the client API.
    pub fn is_client(&self, key: &NodeId) -> bool {
        self.clients.contains_key(key) || self.is_member(key)
    }

    /// Resolves a node id or unique hex prefix to a member.
    pub fn resolve_node(&self, prefix: &str) -> Result<NodeId, ResolveError> {
        let mut hits = self.nodes.keys().filter(|id| id.matches_prefix(prefix));
        match (hits.next(), hits.next()) {
            (Some(id), None) => Ok(*id),
            (None, _) => Err(ResolveError::NoMatch),
            (Some(_), Some(_)) => Err(ResolveError::Ambiguous),
        }
    }

    /// Checks that `hash` names a ticket usable for `requested` at `at_ms`.
    pub fn check_ticket(&self, hash: &[u8; 32], requested: Role, at_ms: u64) -> Result<&TicketRecord, Refusal> {
        let t = self.tickets.get(hash).ok_or(Refusal::UnknownTicket)?;
        if t.revoked {
            return Err(Refusal::TicketRevoked);
        }
        if at_ms >= t.expires_at_ms {
            return Err(Refusal::TicketExpired);
        }
        if t.role != requested {
            return Err(Refusal::RoleMismatch { granted: t.role, requested });
        }
        Ok(t)
    }

    /// The scheduler's view of every member from Raft state alone: capacity, what placed
    /// VMs use, labels, drain. Liveness (from gossip) is the caller's: `alive`.
    pub fn node_views(&self, alive: impl Fn(&NodeId) -> bool) -> Vec<NodeView> {
        self.nodes.keys().filter_map(|id| self.node_view(id, alive(id))).collect()
    }

    /// One member's scheduler view.
    pub fn node_view(&self, id: &NodeId, alive: bool) -> Option<NodeView> {
        let n = self.nodes.get(id)?;
        let usage = self.usage.get(id);
        Some(NodeView {
            id: *id,
            labels: n.labels.clone(),
            capacity: n.resources,
            used: usage.map(|u| u.used).unwrap_or_default(),
            images: usage.map(|u| u.images.keys().cloned().collect()).unwrap_or_default(),
            schedulable: alive && !self.drained.contains(id),
            groups: usage.map(|u| u.groups.keys().cloned().collect()).unwrap_or_default(),
        })
    }

    /// One placement round, decided without I/O (the leader proposes the result; the
    /// simulator runs the same function). Up to `max` VMs that need a node are considered:
    /// new ones, and those whose node left the cluster, is `lost` (dead past the grace
    /// period) or is drained. A VM leaving a node is never placed back on it. Each placement
    /// is charged to its node's view at once, so one round does not overfill a node.
    /// `salt` varies the scheduler's sampling between rounds.
    pub fn plan_placements(
        &self,
        mut views: Vec<NodeView>,
        lost: impl Fn(&NodeId) -> bool,
        salt: u64,
        max: usize,
    ) -> Vec<Placement> {
        let pos: BTreeMap<NodeId, usize> =
            views.iter().enumerate().map(|(i, v)| (v.id, i)).collect();
        // Nodes whose VMs must move: drained, lost, or removed (a VM is only ever placed on
        // a member, and a member leaves only by removal). Asked once per node, not per VM.
        let gone: BTreeSet<NodeId> = self
            .drained
            .iter()
            .chain(self.removed.iter())
            .copied()
            .chain(self.nodes.keys().filter(|n| lost(n)).copied())
            .collect();
        let needs = |v: &&VmRecord| !v.deleting && v.node.is_none_or(|n| gone.contains(&n));
        let failed_before = |v: &VmRecord| {
            v.error
                .as_deref()
                .is_some_and(|e| e.starts_with(CANNOT_PLACE))
        };
        // VMs not yet tried first, so that VMs no node can take never starve new ones;
        // then those that failed before, from a place that moves with `salt`, so that each
        // is tried again in turn.
        let fresh = self
            .vms
            .iter()
            .filter(|(_, v)| needs(v) && !failed_before(v));
        let retry: Vec<(&String, &VmRecord)> = self
            .vms
            .iter()
            .filter(|(_, v)| needs(v) && failed_before(v))
            .collect();
        let skip = if retry.is_empty() {
            0
        } else {
            (salt % retry.len() as u64) as usize
        };
        let todo = fresh
            .chain(retry[skip..].iter().chain(retry[..skip].iter()).copied())
            .take(max);
        let mut out = Vec::new();
        for (i, (name, v)) in todo.enumerate() {
            if let Some(&k) = v.node.as_ref().and_then(|from| pos.get(from)) {
                views[k].schedulable = false;
            }
            match blixard_scheduler::place(
                &views,
                &v.spec,
                &self.policy,
                salt.wrapping_add(i as u64),
            ) {
                Ok(node) => {
                    if let Some(&k) = pos.get(&node) {
                        blixard_scheduler::charge(&mut views[k], &v.spec);
                    }
                    out.push(Placement::Place {
                        name: name.clone(),
                        node,
                        from: v.node,
                    });
                }
                Err(why) => {
                    let reason = why.to_string();
                    let changed = v.error.as_deref() != Some(placement_error(&reason).as_str());
                    out.push(Placement::Unplaceable {
                        name: name.clone(),
                        reason,
                        changed,
                    });
                }
            }
        }
        out
    }

    /// What the cluster wants on `node`: every VM placed there, with what is recorded of it.
    pub fn wanted_on(&self, node: &NodeId) -> BTreeMap<String, blixard_reconcile::Wanted> {
        self.vms
            .iter()
            .filter(|(_, v)| v.node.as_ref() == Some(node))
            .map(|(name, v)| {
                let recorded = VmReport {
                    state: v.state,
                    healthy: v.healthy,
                    error: v.error.clone(),
                    restarts: v.restarts,
                    reboots_done: v.reboots_done,
                    deleted: false,
                };
                let w = blixard_reconcile::Wanted {
                    spec: v.spec.clone(),
                    desired: v.desired,
                    deleting: v.deleting,
                    reboots_requested: v.reboots_requested,
                    recorded,
                };
                (name.clone(), w)
            })
            .collect()
    }

    /// VMs that need a placement: not deleting, and not placed on a current member.
    pub fn unplaced(&self) -> impl Iterator<Item = (&String, &VmRecord)> {
        self.vms.iter().filter(|(_, v)| !v.deleting && v.node.is_none_or(|n| !self.nodes.contains_key(&n)))
    }

    /// Resolves an image reference: a name, a full hash, or a unique hash prefix of at least
    /// [`MIN_HASH_PREFIX`] characters. Returns the full hash.
    pub fn resolve_image(&self, reference: &str) -> Result<String, Refusal> {
        if let Some(h) = self.image_names.get(reference) {
            return Ok(h.clone());
        }
        if self.images.contains_key(reference) {
            return Ok(reference.to_string());
        }
        if reference.len() >= MIN_HASH_PREFIX && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut hits = self.images.range(reference.to_string()..).take_while(|(h, _)| h.starts_with(reference));
            return match (hits.next(), hits.next()) {
                (Some((h, _)), None) => Ok(h.clone()),
                (Some(_), Some(_)) => Err(Refusal::AmbiguousImage(reference.to_string())),
                (None, _) => Err(Refusal::UnknownImage(reference.to_string())),
            };
        }
        Err(Refusal::UnknownImage(reference.chars().take(80).collect()))
    }

    /// VMs whose image is `hash`.
    pub fn vms_using_image<'a>(&'a self, hash: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.vms.iter().filter(move |(_, v)| v.spec.image == hash).map(|(n, _)| n)
    }

    /// Applies one request. Deterministic; a refusal changes nothing.
    ///
    /// A request whose id was applied already is not applied again: its first application
    /// succeeded, and so does this one, without effect. A refused request changes nothing,
    /// its id included.
    pub fn apply(&mut self, req: &Request) -> CommandResult {
        if req.id != 0 && self.applied_requests.contains(req.id) {
            return CommandResult::Ok;
        }
        match self.try_apply(req) {
            Ok(()) => {
                if req.id != 0 {
                    self.applied_requests.insert(req.id);
                }
                CommandResult::Ok
            }
            Err(r) => CommandResult::Refused(r),
        }
    }

    fn try_apply(&mut self, req: &Request) -> Result<(), Refusal> {
        let at = req.at_ms;
        if self.cluster_id.is_none() && !matches!(req.cmd, Command::Bootstrap { .. }) {
            return Err(Refusal::NotBootstrapped);
        }
        match &req.cmd {
            Command::Bootstrap { cluster_id, node, info } => {
                if self.cluster_id.is_some() {
                    return Err(Refusal::AlreadyBootstrapped);
                }
                validate_labels(&info.labels)?;
                self.cluster_id = Some(*cluster_id);
                self.nodes.insert(*node, record(info, Role::Voter, at));
            }
            Command::CreateTicket { secret_hash, role, expires_at_ms } => {
                if self.tickets.contains_key(secret_hash) {
                    return Err(Refusal::DuplicateTicket);
                }
                self.tickets.insert(
                    *secret_hash,
                    TicketRecord {
                        role: *role,
                        expires_at_ms: *expires_at_ms,
                        created_at_ms: at,
                        created_by: req.by,
                        revoked: false,
                    },
                );
            }
            Command::RevokeTicket { id } => {
                let t = self
                    .tickets
                    .iter_mut()
                    .find(|(h, _)| ticket_id(h) == *id)
                    .ok_or_else(|| Refusal::UnknownTicketId(id.clone()))?;
                t.1.revoked = true;
            }
            Command::AdmitNode { node, info, secret_hash, role } => {
                if self.removed.contains(node) {
                    return Err(Refusal::NodeRemoved(*node));
                }
                self.check_ticket(secret_hash, *role, at)?;
                validate_labels(&info.labels)?;
                // A member re-presenting a ticket (e.g. a retried join) keeps its record
                // but updates its addresses.
                match self.nodes.get_mut(node) {
                    Some(existing) => existing.addrs = info.addrs.clone(),
                    None => {
                        self.nodes.insert(*node, record(info, *role, at));
                    }
                }
            }
            Command::AuthorizeClient { key, secret_hash } => {
                if self.removed.contains(key) {
                    return Err(Refusal::NodeRemoved(*key));
                }
                self.check_ticket(secret_hash, Role::Client, at)?;
                self.clients
                    .entry(*key)
                    .or_insert(ClientRecord { authorized_at_ms: at, ticket_id: ticket_id(secret_hash) });
            }
            Command::RemoveNode { node } => {
                if self.nodes.remove(node).is_none() && !self.clients.contains_key(node) {
                    return Err(Refusal::UnknownNode(*node));
                }
                self.clients.remove(node);
                self.removed.insert(*node);
            }
            Command::UpdateAddrs { node, addrs } => {
                let n = self.nodes.get_mut(node).ok_or(Refusal::UnknownNode(*node))?;
                n.addrs = addrs.clone();
            }
            Command::SetLabels { node, set, remove } => {
                validate_labels(set)?;
                let n = self.nodes.get_mut(node).ok_or(Refusal::UnknownNode(*node))?;
                for k in remove {
                    n.labels.remove(k);
                }
                n.labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Command::CreateVm { spec, start } => {
                spec.validate().map_err(|e| Refusal::InvalidSpec(e.to_string()))?;
                if self.vms.contains_key(&spec.name) {
                    return Err(Refusal::VmExists(spec.name.clone()));
                }
                let hash = self.resolve_image(&spec.image)?;
                let desired = if *start { Desired::Running } else { Desired::Stopped };
                self.vms.insert(
                    spec.name.clone(),
                    VmRecord {
                        spec: VmSpec { image: hash, ..spec.clone() },
                        image_ref: spec.image.clone(),
                        desired,
                        deleting: false,
                        node: None,
                        state: VmState::Pending,
                        healthy: None,
                        error: None,
                        restarts: 0,
                        reboots_requested: 0,
                        reboots_done: 0,
                        created_at_ms: at,
                        since_ms: at,
                    },
                );
            }
            Command::PlaceVm { name, node } => {
                let vm = self.vms.get(name).ok_or_else(|| Refusal::UnknownVm(name.clone()))?;
                if vm.deleting {
                    return Err(Refusal::VmDeleting(name.clone()));
                }
                if !self.nodes.contains_key(node) {
                    return Err(Refusal::UnknownNode(*node));
                }
                let spec = vm.spec.clone();
                let old = vm.node;
                let mut view = self.node_view(node, true).ok_or(Refusal::UnknownNode(*node))?;
                view.schedulable = true; // drain stops new placements at the leader, not moves
                if old == Some(*node) {
                    // Re-placing onto the same node: its own share does not count twice.
                    let mut u = self.usage.get(node).cloned().unwrap_or_default();
                    u.release(&spec);
                    view.used = u.used;
                    view.groups = u.groups.keys().cloned().collect();
                }
                blixard_scheduler::fits(&view, &spec, &self.policy).map_err(|r| Refusal::DoesNotFit {
                    name: name.clone(),
                    node: *node,
                    reason: r.to_string(),
                })?;
                if let Some(o) = old {
                    self.usage.entry(o).or_default().release(&spec);
                }
                self.usage.entry(*node).or_default().charge(&spec);
                let vm = self.vm_mut(name)?;
                vm.node = Some(*node);
                vm.state = VmState::Pending;
                vm.error = None;
                vm.since_ms = at;
            }
            Command::SetDesired { name, desired } => {
                let vm = self.vm_mut(name)?;
                if vm.deleting {
                    return Err(Refusal::VmDeleting(name.clone()));
                }
                vm.desired = *desired;
                // Starting a failed VM again clears its failure and starts a fresh streak.
                if *desired == Desired::Running && vm.state == VmState::Failed {
                    vm.error = None;
                    vm.restarts = 0;
                    vm.state = VmState::Pending;
                    vm.since_ms = at;
                }
            }
            Command::RebootVm { name } => {
                let vm = self.vm_mut(name)?;
                if vm.deleting {
                    return Err(Refusal::VmDeleting(name.clone()));
                }
                vm.reboots_requested += 1;
            }
            Command::DeleteVm { name } => {
                let vm = self.vm_mut(name)?;
                if vm.node.is_none() {
                    self.vms.remove(name);
                } else {
                    vm.deleting = true;
                    vm.desired = Desired::Stopped;
                }
            }
            Command::ReportVm { name, report } => {
                let by = req.by;
                let vm = self.vm_mut(name)?;
                if vm.node != Some(by) {
                    return Err(Refusal::NotHost { name: name.clone(), by });
                }
                if report.deleted && vm.deleting {
                    let spec = vm.spec.clone();
                    self.vms.remove(name);
                    self.usage.entry(by).or_default().release(&spec);
                } else {
                    apply_report(vm, report, at);
                }
            }
            Command::PlacementFailed { name, reason } => {
                let vm = self.vm_mut(name)?;
                vm.error = Some(placement_error(reason));
            }
            Command::PublishImage { hash, size, kind, name } => {
                if !is_full_hash(hash) {
                    return Err(Refusal::InvalidImage(format!("{:?} is not a full image hash", hash.chars().take(80).collect::<String>())));
                }
                if let Some(n) = name {
                    validate_image_name(n).map_err(Refusal::InvalidImage)?;
                }
                let rec = self.images.entry(hash.clone()).or_insert_with(|| ImageRecord {
                    size: *size,
                    kind: *kind,
                    publisher: req.by,
                    created_at_ms: at,
                    names: BTreeSet::new(),
                });
                if let Some(n) = name {
                    rec.names.insert(n.clone());
                    // A name points at one image: the newest push under it.
                    if let Some(old) = self.image_names.insert(n.clone(), hash.clone()) {
                        if old != *hash {
                            if let Some(o) = self.images.get_mut(&old) {
                                o.names.remove(n);
                            }
                        }
                    }
                }
            }
            Command::RemoveImage { hash } => {
                if !self.images.contains_key(hash) {
                    return Err(Refusal::UnknownImage(hash.chars().take(80).collect()));
                }
                let users: Vec<&String> = self.vms_using_image(hash).take(6).collect();
                if !users.is_empty() {
                    let mut vms = users.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
                    if users.len() > 5 {
                        vms.push_str(", ...");
                    }
                    return Err(Refusal::ImageInUse { image: hash[..12].to_string(), vms });
                }
                if let Some(rec) = self.images.remove(hash) {
                    for n in rec.names {
                        self.image_names.remove(&n);
                    }
                }
            }
            Command::SetDrain { node, drain } => {
                if !self.nodes.contains_key(node) {
                    return Err(Refusal::UnknownNode(*node));
                }
                if *drain {
                    self.drained.insert(*node);
                } else {
                    self.drained.remove(node);
                }
            }
            Command::Batch { commands } => self.apply_batch(req, commands)?,
        }
        Ok(())
    }

    /// Applies each command as if proposed alone; if one is refused, puts back what those
    /// before it changed. A [`VmCommand`] changes one VM record and the usage of at most two
    /// nodes (where the VM was, where it goes), so saving those before each is exact.
    fn apply_batch(&mut self, req: &Request, commands: &[VmCommand]) -> Result<(), Refusal> {
        if commands.len() > MAX_BATCH {
            return Err(Refusal::BatchTooLarge { len: commands.len() as u64, max: MAX_BATCH as u64 });
        }
        type Saved = (String, Option<VmRecord>, Vec<(NodeId, Option<NodeUsage>)>);
        let mut saved: Vec<Saved> = Vec::with_capacity(commands.len());
        for (index, c) in commands.iter().enumerate() {
            let vm = self.vms.get(c.vm()).cloned();
            let mut nodes: Vec<NodeId> = vm.as_ref().and_then(|v| v.node).into_iter().collect();
            if let VmCommand::PlaceVm { node, .. } = c {
                nodes.push(*node);
            }
            let usage = nodes.into_iter().map(|n| (n, self.usage.get(&n).cloned())).collect();
            saved.push((c.vm().to_string(), vm, usage));
            let one = Request { at_ms: req.at_ms, by: req.by, cmd: c.clone().into(), id: 0 };
            if let Err(refusal) = self.try_apply(&one) {
                // Newest first, so a record or usage changed twice ends as it was first.
                for (name, vm, usage) in saved.into_iter().rev() {
                    match vm {
                        Some(v) => self.vms.insert(name, v),
                        None => self.vms.remove(&name),
                    };
                    for (n, u) in usage {
                        match u {
                            Some(u) => self.usage.insert(n, u),
                            None => self.usage.remove(&n),
                        };
                    }
                }
                return Err(Refusal::InBatch {
                    index: index as u64,
                    kind: one.cmd.kind().to_string(),
                    vm: c.vm().to_string(),
                    reason: refusal.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl ClusterState {
    fn vm_mut(&mut self, name: &str) -> Result<&mut VmRecord, Refusal> {
        self.vms.get_mut(name).ok_or_else(|| Refusal::UnknownVm(name.to_string()))
    }
}

fn apply_report(vm: &mut VmRecord, r: &VmReport, at: u64) {
    if vm.state != r.state {
        vm.since_ms = at;
    }
    vm.state = r.state;
    vm.healthy = r.healthy;
    vm.error = r.error.clone();
    vm.restarts = r.restarts;
    vm.reboots_done = r.reboots_done;
}

/// Why a node reference did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NoMatch,
    Ambiguous,
}

fn record(info: &NodeInfo, role: Role, at: u64) -> NodeRecord {
    NodeRecord {
        addrs: info.addrs.clone(),
        resources: info.resources,
        labels: info.labels.clone(),
        role,
        joined_at_ms: at,
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Refusal> {
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

#[cfg(test)]
mod tests;
