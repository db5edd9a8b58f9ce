//! The client API: what the CLI asks a node, and what members forward to the leader.
//!
//! Every request is answered by the leader: a follower forwards it (as itself, naming the
//! original caller), so writes are ordered by Raft and reads are linearizable (the leader
//! confirms its leadership with a quorum before reading).

use std::time::Duration;

use blixard_mesh::rpc;
use blixard_types::command::Refusal;
use blixard_types::rpc::{ApiError, ClientRequest, ClientResponse, ClusterStatus, MemberStatus, NodeStatus};
use blixard_types::ticket::PeerAddr;
use blixard_types::{Command, CommandResult, NodeId, Role, Ticket};
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use openraft::ChangeMembers;
use tracing::{info, info_span, Instrument};

use crate::node::{refused, NodeCtx};
use crate::now_ms;

#[derive(Clone)]
pub struct ClientService {
    ctx: NodeCtx,
}

impl std::fmt::Debug for ClientService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientService")
    }
}

impl ClientService {
    pub fn new(ctx: NodeCtx) -> Self {
        Self { ctx }
    }
}

impl ProtocolHandler for ClientService {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let caller = blixard_mesh::node_id(&conn.remote_id());
        let ctx = self.ctx.clone();
        rpc::serve(conn, move |req: ClientRequest| {
            let ctx = ctx.clone();
            let span = info_span!("request", caller = %caller.short(), kind = kind(&req));
            async move { handle(&ctx, caller, req).await.unwrap_or_else(ClientResponse::Error) }.instrument(span)
        })
        .await;
        Ok(())
    }
}

fn kind(req: &ClientRequest) -> &'static str {
    match req {
        ClientRequest::Status => "status",
        ClientRequest::CreateTicket { .. } => "create-ticket",
        ClientRequest::RevokeTicket { .. } => "revoke-ticket",
        ClientRequest::RemoveNode { .. } => "remove-node",
        ClientRequest::Label { .. } => "label",
        ClientRequest::NodeStatus { .. } => "node-status",
        ClientRequest::ImagePush { .. } => "image-push",
        ClientRequest::ImageList => "image-list",
        ClientRequest::ImageInfo { .. } => "image-info",
        ClientRequest::ImageRemove { .. } => "image-remove",
        ClientRequest::ImageGc { .. } => "image-gc",
        ClientRequest::ImagePull { .. } => "image-pull",
        ClientRequest::VmCreate { .. } => "vm-create",
        ClientRequest::VmSetDesired { .. } => "vm-set-desired",
        ClientRequest::VmReboot { .. } => "vm-reboot",
        ClientRequest::VmDelete { .. } => "vm-delete",
        ClientRequest::VmInfo { .. } => "vm-info",
        ClientRequest::VmList => "vm-list",
        ClientRequest::VmLogs { .. } => "vm-logs",
        ClientRequest::NodeDrain { .. } => "node-drain",
        ClientRequest::Propose(_) => "propose",
        ClientRequest::Forwarded { .. } => "forwarded",
        ClientRequest::WithId { request, .. } => kind(request),
    }
}

async fn handle(ctx: &NodeCtx, caller: NodeId, req: ClientRequest) -> Result<ClientResponse, ApiError> {
    let is_member = ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.is_member(&caller);
    // Requests that only members may send.
    let (caller, req) = match req {
        ClientRequest::Propose(r) if is_member => {
            if ctx.leader().await? != ctx.id {
                return Ok(ClientResponse::Error(ApiError::NoLeader));
            }
            return match ctx.write_here(r).await {
                Ok(data) => Ok(result_response(data)),
                Err(e) => Err(ApiError::Internal(e.to_string())),
            };
        }
        ClientRequest::Forwarded { origin, request, id } if is_member => {
            return crate::node::with_request_id(id, dispatch(ctx, origin, *request)).await;
        }
        // 0 is "not deduplicated": a client that sends it gets a fresh id, as without one.
        ClientRequest::WithId { id, request } if id != 0 => {
            return crate::node::with_request_id(id, dispatch(ctx, caller, *request)).await;
        }
        ClientRequest::WithId { request, .. } => return dispatch(ctx, caller, *request).await,
        ClientRequest::Propose(_) | ClientRequest::Forwarded { .. } => {
            return Err(ApiError::Refused("only members may forward requests".into()))
        }
        other => (caller, other),
    };
    dispatch(ctx, caller, req).await
}

/// Answers `req` from `caller` here, or forwards it to the node that answers it.
async fn dispatch(ctx: &NodeCtx, caller: NodeId, req: ClientRequest) -> Result<ClientResponse, ApiError> {
    if matches!(req, ClientRequest::Propose(_) | ClientRequest::Forwarded { .. } | ClientRequest::WithId { .. }) {
        return Err(ApiError::Invalid("nested forwarding".into()));
    }
    // Requests one particular node answers (not the leader).
    if let Some(target) = answered_by(ctx, &req)? {
        if target != ctx.id {
            let id = crate::node::forward_id();
            return ctx.forward(target, ClientRequest::Forwarded { origin: caller, request: Box::new(req), id }).await;
        }
        return crate::api_local::handle(ctx, caller, req).await;
    }
    // Forward to the leader; if it does not answer, leadership may be moving: look again.
    // Every attempt carries the same id, so a request that got through before its answer
    // was lost is not carried out twice.
    let id = crate::node::forward_id();
    let mut attempts = 0;
    // Whether an attempt may have got through. "No leader" tells the client nothing was
    // done (it asks again, as a new request), so once that is not known it is not said.
    let mut maybe_done = false;
    loop {
        let leader = match ctx.leader().await {
            Ok(l) => l,
            Err(_) if maybe_done => return Err(crate::node::outcome_unknown()),
            Err(e) => return Err(e),
        };
        if leader == ctx.id {
            break;
        }
        let fwd = ClientRequest::Forwarded { origin: caller, request: Box::new(req.clone()), id };
        let answer = ctx.forward(leader, fwd).await;
        let again = match &answer {
            Err(e) => {
                tracing::debug!(error = %e, "forwarding failed; retrying");
                maybe_done = true;
                true
            }
            // The node we took for the leader was not; an earlier attempt may still commit.
            Ok(ClientResponse::Error(ApiError::NoLeader)) => maybe_done,
            Ok(_) => false,
        };
        if !again {
            return answer;
        }
        if attempts == 5 {
            return Err(crate::node::outcome_unknown());
        }
        attempts += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match req {
        ClientRequest::Status => Ok(ClientResponse::Status(status(ctx).await?)),
        ClientRequest::CreateTicket { role, ttl_ms } => {
            let expires = now_ms().saturating_add(ttl_ms);
            let t = issue_ticket(ctx, caller, role, expires).await?;
            Ok(ClientResponse::Ticket { ticket: t.encode(), id: t.id(), expires_at_ms: expires })
        }
        ClientRequest::RevokeTicket { id } => write(ctx, caller, Command::RevokeTicket { id }).await,
        ClientRequest::Label { node, set, remove } => {
            let node = resolve(ctx, &node)?;
            write(ctx, caller, Command::SetLabels { node, set, remove }).await
        }
        ClientRequest::RemoveNode { node } => {
            let node = resolve(ctx, &node)?;
            remove_node(ctx, caller, node).await
        }
        other => crate::api_leader::handle(ctx, caller, other).await,
    }
}

/// The node that must answer `req` itself, if it is not the leader's to answer: node
/// status and pulls go to the named node, logs to the VM's node, pushes and cluster-wide
/// gc are answered by whichever node received them.
fn answered_by(ctx: &NodeCtx, req: &ClientRequest) -> Result<Option<NodeId>, ApiError> {
    Ok(match req {
        ClientRequest::NodeStatus { node } | ClientRequest::ImagePull { node, .. } => Some(resolve(ctx, node)?),
        ClientRequest::ImageGc { node: Some(node) } => Some(resolve(ctx, node)?),
        ClientRequest::ImageGc { node: None } | ClientRequest::ImagePush { .. } => Some(ctx.id),
        ClientRequest::VmLogs { name, .. } => {
            let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
            let vm = st.state.vms.get(name).ok_or_else(|| refused(Refusal::UnknownVm(name.clone())))?;
            Some(vm.node.ok_or_else(|| ApiError::Invalid(format!("VM {name:?} is not placed on a node yet")))?)
        }
        _ => None,
    })
}

pub(crate) fn result_response(r: CommandResult) -> ClientResponse {
    match r {
        CommandResult::Ok => ClientResponse::Ok,
        CommandResult::Refused(r) => ClientResponse::Error(refused(r)),
    }
}

pub(crate) async fn write(ctx: &NodeCtx, by: NodeId, cmd: Command) -> Result<ClientResponse, ApiError> {
    Ok(result_response(ctx.propose(by, cmd).await?))
}

pub(crate) fn resolve(ctx: &NodeCtx, prefix: &str) -> Result<NodeId, ApiError> {
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    st.state.resolve_node(prefix).map_err(|e| match e {
        blixard_state::ResolveError::NoMatch => ApiError::NoSuchNode(prefix.into()),
        blixard_state::ResolveError::Ambiguous => ApiError::AmbiguousNode(prefix.into()),
    })
}

/// Removes `node` from Raft membership, then from cluster state (which revokes its key),
/// then drops our connections to it.
async fn remove_node(ctx: &NodeCtx, by: NodeId, node: NodeId) -> Result<ClientResponse, ApiError> {
    let in_membership = {
        let m = ctx.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&node).is_some()
    };
    if in_membership {
        let voters: std::collections::BTreeSet<NodeId> = [node].into();
        let is_voter = ctx.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == node);
        let change = if is_voter { ChangeMembers::RemoveVoters(voters) } else { ChangeMembers::RemoveNodes(voters) };
        ctx.change_membership(change, false).await.map_err(ApiError::Internal)?;
        info!(node = %node.short(), "removed from raft membership");
    }
    // If we removed ourselves, leadership moves: `propose` follows it.
    let r = write(ctx, by, Command::RemoveNode { node }).await?;
    ctx.peers.disconnect(&node);
    Ok(r)
}

/// Issues a ticket for `role`: records the hash of a fresh secret in Raft state and
/// returns the ticket with the current members' addresses.
pub async fn issue_ticket(ctx: &NodeCtx, by: NodeId, role: Role, expires_at_ms: u64) -> Result<Ticket, ApiError> {
    let secret: [u8; 32] = rand::random();
    let secret_hash = blixard_types::ticket::secret_hash(&secret);
    match ctx.propose(by, Command::CreateTicket { secret_hash, role, expires_at_ms }).await? {
        CommandResult::Ok => {}
        CommandResult::Refused(r) => return Err(refused(r)),
    }
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    let cluster_id = st.state.cluster_id.ok_or_else(|| refused(Refusal::NotBootstrapped))?;
    let mut peers: Vec<PeerAddr> =
        st.state.nodes.iter().map(|(id, n)| PeerAddr { id: *id, addrs: n.addrs.clone() }).collect();
    // The leader first: it answers joins without a redirect.
    peers.sort_by_key(|p| p.id != ctx.id);
    Ok(Ticket { cluster_id, role, expires_at_ms, secret, peers })
}

/// This node's own view (no leader involved, so it may be stale: that is the point).
pub(crate) fn node_status(ctx: &NodeCtx) -> NodeStatus {
    let m = ctx.raft.metrics().borrow().clone();
    let applied = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    let digest = blake3::hash(&postcard::to_stdvec(&applied.state).unwrap_or_default());
    let state = match m.state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    };
    NodeStatus {
        id: ctx.id,
        state: state.into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index.unwrap_or(0),
        last_applied: applied.last_applied.map(|l| l.index).unwrap_or(0),
        state_digest: digest.to_hex().to_string(),
        members: applied.state.nodes.len() as u32,
        peers: applied
            .state
            .nodes
            .keys()
            .filter(|id| **id != ctx.id)
            .map(|id| (*id, ctx.liveness_of(id).as_str().to_string()))
            .collect(),
    }
}

/// Confirms this node is still the leader with a quorum, so what it reads next is current.
pub(crate) async fn linearizable(ctx: &NodeCtx) -> Result<(), ApiError> {
    ctx.raft.ensure_linearizable().await.map(|_| ()).map_err(|e| match e {
        openraft::error::RaftError::APIError(_) => ApiError::NoLeader,
        other => ApiError::Internal(other.to_string()),
    })
}

/// The cluster as the leader sees it, after confirming leadership (linearizable).
async fn status(ctx: &NodeCtx) -> Result<ClusterStatus, ApiError> {
    linearizable(ctx).await?;
    let metrics = ctx.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    let cluster_id = st.state.cluster_id.ok_or(ApiError::NoLeader)?;
    let members = st
        .state
        .nodes
        .iter()
        .map(|(id, n)| {
            let in_raft = membership.get_node(id).is_some();
            let role = if voters.contains(id) { "voter" } else if in_raft { "learner" } else { "joining" };
            let live = ctx.liveness_of(id);
            let reachable = live == crate::liveness::Liveness::Alive;
            let state = if metrics.current_leader == Some(*id) {
                "leader"
            } else if !reachable {
                live.as_str()
            } else if voters.contains(id) {
                "follower"
            } else {
                "learner"
            };
            let usage = st.state.usage.get(id).cloned().unwrap_or_default();
            MemberStatus {
                id: *id,
                addrs: n.addrs.clone(),
                role: role.into(),
                state: state.into(),
                healthy: reachable,
                labels: n.labels.clone(),
                resources: n.resources,
                cpus_free: n.resources.cpus.saturating_sub(usage.used.cpus),
                memory_mib_free: n.resources.memory_mib.saturating_sub(usage.used.memory_mib),
                vms: usage.vms,
            }
        })
        .collect();
    Ok(ClusterStatus {
        cluster_id,
        leader: metrics.current_leader,
        term: metrics.current_term,
        commit_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
        members,
    })
}
