//! Starting and stopping a node.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use blixard_mesh::auth::{Authorizer, Gate};
use blixard_mesh::rpc::Pool;
use blixard_mesh::{alpn, endpoint, identity};
use blixard_raft::network::{AddrBook, Network, RaftService};
use blixard_raft::storage::SharedState;
use blixard_raft::{Raft, RaftNode};
use blixard_types::command::{NodeInfo, Refusal};
use blixard_types::rpc::{ApiError, ClientRequest, ClientResponse, JoinRequest, JoinResponse};
use blixard_types::ticket::{secret_hash, PeerAddr};
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request, Role, Ticket};
use iroh::protocol::Router;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use iroh::Endpoint;
use tracing::{info, info_span, warn, Instrument};

use crate::client_api::ClientService;
use crate::config::{write_atomic, DataDir, LocalState, NodeConfig, StartMode};
use crate::join::JoinService;
use crate::now_ms;

/// How long RPCs between members may take before they count as failed.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a guest gets to power off when its node shuts down.
pub const VM_STOP_ON_SHUTDOWN: Duration = Duration::from_secs(5);
/// How long a request waits for a leader to be elected before giving up.
pub(crate) const LEADER_WAIT: Duration = Duration::from_secs(5);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("{0}")]
    LocalState(String),
    #[error("cannot open raft storage")]
    Storage(#[source] blixard_raft::storage::OpenError),
    #[error("cannot read raft storage: {0}")]
    StorageRead(String),
    #[error(transparent)]
    Bind(#[from] endpoint::BindError),
    #[error("raft failed to start: {0}")]
    Raft(String),
    #[error("{0} already holds a cluster member; start it without --init/--join to resume")]
    AlreadyMember(String),
    #[error("{0} holds no cluster yet; start with --init to create one or --join TICKET to join one")]
    NotMember(String),
    #[error("the ticket is a client ticket; a node needs a voter or learner ticket (`blixard cluster ticket --role voter`)")]
    ClientTicket,
    #[error("cannot open the image store")]
    Images(#[source] blixard_images::OpenError),
    #[error("cannot open the VM backends")]
    Vmm(#[source] blixard_vmm::VmError),
    #[error("join failed: {0}")]
    Join(String),
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
}

/// Shared handles the protocol services use.
#[derive(Clone)]
pub struct NodeCtx {
    pub id: NodeId,
    pub endpoint: Endpoint,
    pub raft: Raft,
    pub state: SharedState,
    /// Client-API connections to other members (forwarding to the leader).
    pub peers: Pool,
    /// Members named by the join ticket: trusted until this node has applied cluster state.
    pub join_peers: Arc<RwLock<Vec<PeerAddr>>>,
    /// Serialises membership changes on this node (openraft allows one at a time).
    pub membership_lock: Arc<tokio::sync::Mutex<()>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What gossip says about the other members.
    pub liveness: Arc<std::sync::Mutex<crate::liveness::Detector>>,
    /// How long a node may be dead before its VMs are placed elsewhere.
    pub placement_grace: Duration,
    /// This node's images.
    pub images: Arc<crate::images::NodeImages>,
    /// This node's VM backends.
    pub backends: Arc<crate::executor::Backends>,
    /// The index of the last applied entry (wakes the placer and the executor).
    pub applied: tokio::sync::watch::Receiver<u64>,
}

impl NodeCtx {
    /// Whether `id` is alive as far as this node knows (itself always is).
    pub fn is_alive(&self, id: &NodeId) -> bool {
        self.is_alive_locked(&self.liveness.lock().unwrap_or_else(|p| p.into_inner()), id)
    }

    /// `is_alive` for a caller already holding the detector.
    pub(crate) fn is_alive_locked(&self, d: &crate::liveness::Detector, id: &NodeId) -> bool {
        *id == self.id || d.liveness(id, std::time::Instant::now()) == crate::liveness::Liveness::Alive
    }

    /// Resolves when this node's Raft has stopped on a fatal error, with the error (the
    /// caller reports it).
    pub async fn raft_stopped(&self) -> String {
        let mut m = self.raft.metrics();
        loop {
            if let Err(fatal) = &m.borrow_and_update().running_state {
                return fatal.to_string();
            }
            if m.changed().await.is_err() {
                return "the raft core ended".into();
            }
        }
    }

    /// The voters of the Raft membership this node knows.
    pub fn voters(&self) -> Vec<NodeId> {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }

    /// Whether the voters this node is not in touch with (per gossip, both ways) could form
    /// a majority without it, i.e. could be placing its VMs elsewhere.
    pub fn cut_off(&self) -> bool {
        let voters = self.voters();
        let det = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        blixard_reconcile::fence::others_could_act(&voters, |id| det.in_touch(&self.id, id, now))
    }

    /// `alive`, `suspect`, `dead` or `unknown` (itself: `alive`).
    pub fn liveness_of(&self, id: &NodeId) -> crate::liveness::Liveness {
        if *id == self.id {
            return crate::liveness::Liveness::Alive;
        }
        self.liveness.lock().unwrap_or_else(|p| p.into_inner()).liveness(id, std::time::Instant::now())
    }
}

impl NodeCtx {
    /// Dialable addresses of this node.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        endpoint::dialable_addrs(&self.endpoint)
    }

    /// Addresses of a member from Raft state, falling back to what the join ticket said.
    pub fn addrs_of(&self, id: &NodeId) -> Vec<SocketAddr> {
        addrs_of(&self.state, &self.join_peers, id)
    }

    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).state.cluster_id
    }

    /// The current leader, waiting up to [`LEADER_WAIT`] for one to be elected.
    pub async fn leader(&self) -> Result<NodeId, ApiError> {
        let mut rx = self.raft.metrics();
        let wait = async {
            loop {
                if let Some(l) = rx.borrow_and_update().current_leader {
                    return Ok(l);
                }
                if rx.changed().await.is_err() {
                    return Err(ApiError::Internal("raft stopped".into()));
                }
            }
        };
        tokio::time::timeout(LEADER_WAIT, wait).await.unwrap_or(Err(ApiError::NoLeader))
    }

    /// Proposes `cmd` on behalf of `by`, on the leader (forwarding if this node is not it).
    pub async fn propose(&self, by: NodeId, cmd: Command) -> Result<CommandResult, ApiError> {
        // One id for every attempt below: a retried proposal is applied once.
        let req = Request { at_ms: now_ms(), by, cmd, id: next_request_id() };
        self.propose_request(req).await
    }

    pub async fn propose_request(&self, req: Request) -> Result<CommandResult, ApiError> {
        // Leadership can move while we forward: try a few times. Sending `req` again is
        // safe (the state machine applies its id once), but "no leader" tells the client the
        // write was not carried out, so it is said only if no attempt may have been.
        let mut last = ApiError::NoLeader;
        let mut maybe_applied = false;
        for _ in 0..3 {
            let leader = match self.leader().await {
                Ok(l) => l,
                Err(e) if !maybe_applied => return Err(e),
                Err(_) => break,
            };
            if leader == self.id {
                match self.write_here(req.clone()).await {
                    Ok(data) => return Ok(data),
                    // openraft says this both when it refused the entry (not leader any
                    // more) and when it appended it and a new leader truncated it; a
                    // truncated entry may still be committed by a later leader that holds it.
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                        last = ApiError::NoLeader;
                        maybe_applied = true;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(ApiError::Internal(e.to_string())),
                }
            }
            match self.forward(leader, ClientRequest::Propose(req.clone())).await {
                Ok(ClientResponse::Error(ApiError::NoLeader)) => last = ApiError::NoLeader,
                Ok(ClientResponse::Error(e)) => return Err(e),
                Ok(ClientResponse::Ok) => return Ok(CommandResult::Ok),
                Ok(other) => return Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
                Err(e) => {
                    last = e;
                    maybe_applied = true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if maybe_applied && matches!(last, ApiError::NoLeader) {
            return Err(outcome_unknown());
        }
        Err(last)
    }

    /// Applies a Raft membership change, one at a time, retrying while a previous change
    /// is still being committed.
    pub async fn change_membership(&self, change: ChangeMembers<NodeId, RaftNode>, retain: bool) -> Result<(), String> {
        self.membership_change(|| self.raft.change_membership(change.clone(), retain)).await
    }

    /// Adds a learner and waits until it caught up (serialised like other changes).
    pub async fn add_learner(&self, id: NodeId, node: RaftNode) -> Result<(), String> {
        self.membership_change(|| self.raft.add_learner(id, node.clone(), true)).await
    }

    /// Runs one membership change under the membership lock; openraft allows one at a time,
    /// so a change still committing is waited out (up to 5 s) instead of failing.
    async fn membership_change<F, Fut, T>(&self, mut change: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, RaftNode>>>>,
    {
        let _guard = self.membership_lock.lock().await;
        for _ in 0..50 {
            match change().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)))) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("a previous membership change did not finish within 5 s".to_string())
    }

    /// Proposes on this node (it must be the leader) and records the apply latency.
    pub async fn write_here(
        &self,
        req: Request,
    ) -> Result<CommandResult, RaftError<NodeId, ClientWriteError<NodeId, RaftNode>>> {
        let started = std::time::Instant::now();
        let w = self.raft.client_write(req).await?;
        self.metrics.observe_apply(started.elapsed());
        Ok(w.data)
    }

    /// Sends a client request to another member (as a member).
    pub async fn forward(&self, to: NodeId, req: ClientRequest) -> Result<ClientResponse, ApiError> {
        let addrs = self.addrs_of(&to);
        self.peers
            .call(&to, &addrs, &req, RPC_TIMEOUT)
            .await
            .map_err(|e| ApiError::Internal(format!("forwarding to leader {}: {e}", to.short())))
    }
}

/// What a client is told when an attempt may have got through before leadership moved:
/// not "no leader", which it may safely retry.
pub(crate) fn outcome_unknown() -> ApiError {
    ApiError::Internal("the leader changed while the request was sent: it may or may not have been carried out".into())
}

tokio::task_local! {
    /// While a forwarded client request is handled: its id, and how many proposals it made
    /// so far. The k-th proposal gets id + k, so the same request forwarded again proposes
    /// the same ids and nothing is applied twice.
    static FORWARDED_ID: std::cell::Cell<(u128, u128)>;
}

/// Handles a forwarded client request under its id (see [`FORWARDED_ID`]).
pub(crate) async fn with_request_id<F: std::future::Future>(id: u128, f: F) -> F::Output {
    FORWARDED_ID.scope(std::cell::Cell::new((id, 0)), f).await
}

/// The id of the next proposal: derived from the forwarded request being handled, else
/// random. Never 0 (which is "not deduplicated").
fn next_request_id() -> u128 {
    FORWARDED_ID
        .try_with(|c| {
            let (base, k) = c.get();
            c.set((base, k + 1));
            base.wrapping_add(k)
        })
        .unwrap_or_else(|_| rand::random::<u128>())
        .max(1)
}

/// A fresh id for forwarding one client request.
pub(crate) fn new_forward_id() -> u128 {
    rand::random::<u128>().max(1)
}

/// The id to forward the client request being handled with: its own if it was forwarded
/// here (a leader that lost its place passes it on), else a fresh one.
pub(crate) fn forward_id() -> u128 {
    FORWARDED_ID.try_with(|c| c.get().0).unwrap_or_else(|_| new_forward_id())
}

/// A running node.
pub struct Node {
    ctx: NodeCtx,
    router: Router,
    /// Background tasks this node started (stopped on shutdown).
    tasks: Vec<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.ctx.id).finish()
    }
}

impl Node {
    /// Starts a node: opens its data dir, binds its endpoint, starts Raft and serves the
    /// protocols, then bootstraps, joins or resumes as `cfg.mode` says.
    pub async fn start(cfg: NodeConfig) -> Result<Node, StartError> {
        let dir = DataDir(cfg.data_dir.clone());
        create_private_dir(dir.path())?;
        let key = identity::load_or_create(&dir.key())?;
        let id = blixard_mesh::node_id(&key.public());
        let span = info_span!("node", id = %id.short());
        Self::start_inner(cfg, dir, key, id).instrument(span).await
    }

    async fn start_inner(cfg: NodeConfig, dir: DataDir, key: iroh::SecretKey, id: NodeId) -> Result<Node, StartError> {
        let mut local = LocalState::load(&dir.local_state()).map_err(StartError::LocalState)?;
        let (mut log_store, mut sm_store) =
            blixard_raft::storage::open(&dir.raft_db()).map_err(StartError::Storage)?;
        let (audit_tx, audit_rx) = tokio::sync::mpsc::unbounded_channel();
        sm_store.observe(audit_tx);
        tokio::spawn(crate::audit::run(dir.audit_log(), audit_rx));
        let state = sm_store.shared();
        let applied = sm_store.applied_index();
        // The applied state holds only the last snapshot until Raft replays the log, so ask
        // the log whether this data dir was used.
        let is_member_already = {
            use openraft::storage::RaftLogStorage;
            let log = log_store.get_log_state().await.map_err(|e| StartError::StorageRead(e.to_string()))?;
            log.last_log_id.is_some() || state.read().unwrap_or_else(|p| p.into_inner()).state.cluster_id.is_some()
        };
        match (&cfg.mode, is_member_already) {
            (StartMode::Init | StartMode::Join(_), true) => {
                return Err(StartError::AlreadyMember(dir.path().display().to_string()))
            }
            (StartMode::Join(t), false) if t.role == Role::Client => return Err(StartError::ClientTicket),
            _ => {}
        }

        let listen = cfg.listen.or(local.listen).unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let lookup = blixard_mesh::MemoryLookup::new();
        let ep = endpoint::bind(endpoint::EndpointOptions {
            secret_key: key.clone(),
            listen,
            relay: cfg.relay.clone(),
            alpns: alpn::ALL.iter().chain([&blixard_images::ALPN, &blixard_images::HAVE_ALPN]).map(|a| a.to_vec()).collect(),
            lookup: Some(lookup.clone()),
        })
        .await?;
        let addrs = endpoint::dialable_addrs(&ep);
        local.listen = ep.bound_sockets().first().copied();
        if let StartMode::Join(t) = &cfg.mode {
            local.join_peers = t.peers.clone();
        }
        local.save(&dir.local_state()).map_err(StartError::LocalState)?;
        info!(addrs = ?addrs, "endpoint bound");

        let join_peers = Arc::new(RwLock::new(local.join_peers.clone()));
        let book: AddrBook = {
            let (state, join_peers) = (state.clone(), join_peers.clone());
            Arc::new(move |id| addrs_of(&state, &join_peers, id))
        };
        let network = Network::new(ep.clone(), book);
        let images = Arc::new(
            crate::images::NodeImages::open(&dir.path().join("images"), ep.clone()).await.map_err(StartError::Images)?,
        );
        let capacity = blixard_vmm::Capacity { vcpus: cfg.resources.cpus, memory_mib: cfg.resources.memory_mib };
        let backends = Arc::new(
            crate::executor::Backends::open(&dir.path().join("vmm"), capacity, cfg.backend).await.map_err(StartError::Vmm)?,
        );
        let config = Arc::new(cfg.raft.clone());
        let raft = Raft::new(id, config, network, log_store, sm_store).await.map_err(|e| StartError::Raft(e.to_string()))?;

        let ctx = NodeCtx {
            id,
            endpoint: ep.clone(),
            raft: raft.clone(),
            state: state.clone(),
            peers: Pool::new(ep.clone(), alpn::CLIENT),
            join_peers: join_peers.clone(),
            membership_lock: Default::default(),
            metrics: Default::default(),
            liveness: Default::default(),
            placement_grace: cfg.placement_grace,
            images: images.clone(),
            backends: backends.clone(),
            applied,
        };

        let members: Authorizer = {
            let state = state.clone();
            let join_peers = join_peers.clone();
            Arc::new(move |key| {
                let applied = state.read().unwrap_or_else(|p| p.into_inner());
                if applied.state.cluster_id.is_some() {
                    return applied.state.is_member(key);
                }
                // Not caught up yet: trust only the members the join ticket named (and
                // the leader one of them redirected us to).
                join_peers.read().unwrap_or_else(|p| p.into_inner()).iter().any(|p| p.id == *key)
            })
        };
        let clients: Authorizer = {
            let state = state.clone();
            Arc::new(move |key| state.read().unwrap_or_else(|p| p.into_inner()).state.is_client(key))
        };
        let gossip = iroh_gossip::Gossip::builder().max_message_size(64 * 1024).spawn(ep.clone());
        let router = Router::builder(ep.clone())
            .accept(alpn::GOSSIP, Gate::new("gossip", members.clone(), gossip.clone()))
            .accept(alpn::RAFT, Gate::new("raft", members.clone(), RaftService::new(raft.clone())))
            .accept(alpn::CLIENT, Gate::new("client", clients, ClientService::new(ctx.clone())))
            .accept(alpn::JOIN, JoinService::new(ctx.clone()))
            .accept(blixard_images::ALPN, Gate::new("blobs", members.clone(), images.store.protocol_handler()))
            .accept(blixard_images::HAVE_ALPN, Gate::new("image-have", members.clone(), images.store.have_handler()))
            .spawn();

        let mut tasks = vec![
            tokio::spawn(crate::metrics::watch_leader(ctx.clone(), ctx.metrics.clone())).abort_handle(),
            tokio::spawn(blixard_raft::elections::break_split_votes(
                ctx.raft.clone(),
                cfg.raft.election_timeout_min,
                cfg.raft.election_timeout_max,
            ))
            .abort_handle(),
            tokio::spawn(crate::health::run(ctx.clone(), key, gossip, lookup, ctx.liveness.clone())).abort_handle(),
            tokio::spawn(crate::placer::run(ctx.clone())).abort_handle(),
            tokio::spawn(crate::executor::Executor::new(ctx.clone(), images, backends).run()).abort_handle(),
        ];
        if let Some(addr) = cfg.metrics {
            if let Some(listener) = crate::metrics::bind(addr).await {
                let bound = listener.local_addr().ok();
                info!(addr = ?bound, "serving metrics");
                local.metrics = bound;
                local.save(&dir.local_state()).map_err(StartError::LocalState)?;
                tasks.push(tokio::spawn(crate::metrics::serve(listener, ctx.clone())).abort_handle());
            }
        } else if local.metrics.take().is_some() {
            local.save(&dir.local_state()).map_err(StartError::LocalState)?;
        }
        let node = Node { ctx, router, tasks };
        let is_join = matches!(cfg.mode, StartMode::Join(_));
        let info = NodeInfo { addrs, resources: with_disk(cfg.resources, dir.path()), labels: cfg.labels.clone() };
        let setup = match cfg.mode {
            StartMode::Init => node.bootstrap(info, &dir).await,
            StartMode::Join(ticket) => node.join(ticket, info).await,
            StartMode::Resume => node.resume(info, &dir).await,
        };
        if let Err(e) = setup {
            let joined = node.ctx.cluster_id().is_some();
            node.shutdown().await;
            if is_join && !joined {
                // Nothing was joined: leave the data dir as it was, so the next start
                // (with a new ticket) is a first start again, not a resume of nothing.
                forget_failed_join(&dir);
            }
            return Err(e);
        }
        Ok(node)
    }

    async fn bootstrap(&self, info: NodeInfo, dir: &DataDir) -> Result<(), StartError> {
        let ctx = &self.ctx;
        let mut members = BTreeMap::new();
        members.insert(ctx.id, RaftNode { addrs: info.addrs.clone() });
        ctx.raft.initialize(members).await.map_err(|e| StartError::Bootstrap(e.to_string()))?;
        let cluster_id = ClusterId(rand::random());
        let r = ctx
            .propose(ctx.id, Command::Bootstrap { cluster_id, node: ctx.id, info })
            .await
            .map_err(|e| StartError::Bootstrap(e.to_string()))?;
        if let CommandResult::Refused(r) = r {
            return Err(StartError::Bootstrap(r.to_string()));
        }
        // The operator's first client ticket: it never expires, and is revocable.
        let ticket = crate::client_api::issue_ticket(ctx, ctx.id, Role::Client, u64::MAX)
            .await
            .map_err(|e| StartError::Bootstrap(e.to_string()))?;
        write_atomic(&dir.admin_ticket(), ticket.encode().as_bytes(), 0o600)
            .map_err(|e| StartError::Bootstrap(format!("cannot write {}: {e}", dir.admin_ticket().display())))?;
        info!(%cluster_id, ticket = %dir.admin_ticket().display(), "cluster bootstrapped");
        Ok(())
    }

    async fn join(&self, ticket: Ticket, info: NodeInfo) -> Result<(), StartError> {
        let ctx = &self.ctx;
        let pool = Pool::new(ctx.endpoint.clone(), alpn::JOIN);
        let req = JoinRequest::Node { ticket: ticket.clone(), info };
        let mut candidates: Vec<PeerAddr> = ticket.peers.clone();
        let mut errors = Vec::new();
        let mut hops = 0;
        while let Some(peer) = candidates.first().cloned() {
            candidates.remove(0);
            hops += 1;
            if hops > 8 {
                break;
            }
            // Joining can take as long as catching up the log.
            match pool.call::<_, JoinResponse>(&peer.id, &peer.addrs, &req, Duration::from_secs(60)).await {
                Ok(JoinResponse::Admitted { cluster_id, role }) => {
                    info!(%cluster_id, %role, "joined cluster");
                    return Ok(());
                }
                Ok(JoinResponse::Redirect { leader }) => {
                    ctx.join_peers.write().unwrap_or_else(|p| p.into_inner()).push(leader.clone());
                    candidates.insert(0, leader);
                }
                Ok(JoinResponse::Refused(reason)) => return Err(StartError::Join(reason)),
                Ok(other) => errors.push(format!("{}: unexpected answer {other:?}", peer.id.short())),
                Err(e) if e.is_refused() => return Err(StartError::Join(e.to_string())),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(StartError::Join(format!("no member of the ticket answered: {}", errors.join("; "))))
    }

    async fn resume(&self, info: NodeInfo, dir: &DataDir) -> Result<(), StartError> {
        let ctx = &self.ctx;
        let initialized = ctx.raft.is_initialized().await.map_err(|e| StartError::Raft(e.to_string()))?;
        let known = ctx.cluster_id().is_some();
        if !initialized && !known {
            return Err(StartError::NotMember(dir.path().display().to_string()));
        }
        // If we restarted on other addresses, tell the cluster (in the background: it
        // needs a leader, which may need us).
        let recorded = ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.nodes.get(&ctx.id).map(|n| n.addrs.clone());
        if recorded.is_some_and(|r| r != info.addrs) {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let r = ctx.propose(ctx.id, Command::UpdateAddrs { node: ctx.id, addrs: info.addrs }).await;
                if let Err(e) = r {
                    warn!(error = %e, "could not record new addresses");
                }
            });
        }
        Ok(())
    }

    pub fn id(&self) -> NodeId {
        self.ctx.id
    }

    pub fn ctx(&self) -> &NodeCtx {
        &self.ctx
    }

    /// Stops the VMs (guests get [`VM_STOP_ON_SHUTDOWN`] to power off), stops serving,
    /// shuts Raft down (flushing storage) and closes the endpoint.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.ctx.backends.stop_all(VM_STOP_ON_SHUTDOWN).await;
        if let Err(e) = self.router.shutdown().await {
            warn!(error = %e, "router shutdown");
        }
        if let Err(e) = self.ctx.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        self.ctx.endpoint.close().await;
    }
}

/// Addresses of a member from Raft state, falling back to the join ticket's members (the
/// only ones known before this node has caught up).
fn addrs_of(state: &SharedState, join_peers: &RwLock<Vec<PeerAddr>>, id: &NodeId) -> Vec<SocketAddr> {
    if let Some(n) = state.read().unwrap_or_else(|p| p.into_inner()).state.nodes.get(id) {
        return n.addrs.clone();
    }
    let peers = join_peers.read().unwrap_or_else(|p| p.into_inner());
    peers.iter().find(|p| p.id == *id).map(|p| p.addrs.clone()).unwrap_or_default()
}

/// Removes what a failed first join left behind (the empty raft store, the ticket's
/// peers), keeping the key: the node stays the same identity for its next attempt.
fn forget_failed_join(dir: &DataDir) {
    if let Err(e) = std::fs::remove_file(dir.raft_db()) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(error = %e, "cannot remove the raft store of the failed join");
        }
    }
    if let Ok(mut local) = LocalState::load(&dir.local_state()) {
        local.join_peers.clear();
        let _ = local.save(&dir.local_state());
    }
}

fn create_private_dir(path: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| StartError::DataDir { path: path.display().to_string(), source })
}

/// Fills in the disk capacity from the data dir's filesystem when not given.
fn with_disk(mut r: blixard_types::command::Resources, dir: &std::path::Path) -> blixard_types::command::Resources {
    if r.disk_gib == 0 {
        r.disk_gib = free_disk_gib(dir).unwrap_or(0);
    }
    r
}

#[allow(unsafe_code)]
fn free_disk_gib(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 30)
}

/// Hashes a ticket's secret (re-exported for services).
pub(crate) fn hash_of(t: &Ticket) -> [u8; 32] {
    secret_hash(&t.secret)
}

/// Turns a refusal into the API error the client sees.
pub(crate) fn refused(r: Refusal) -> ApiError {
    ApiError::Refused(r.to_string())
}
