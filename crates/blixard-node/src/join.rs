//! The join protocol: the one protocol open to unknown keys. A node proves a ticket's
//! secret and is admitted as a learner, caught up, then promoted to voter if the ticket
//! says so; a CLI key proves a client ticket and is authorised for the client API.

use blixard_mesh::rpc;
use blixard_types::rpc::{JoinRequest, JoinResponse};
use blixard_types::ticket::PeerAddr;
use blixard_types::{Command, CommandResult, NodeId, Role};
use blixard_raft::RaftNode;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use openraft::ChangeMembers;
use tracing::{info, info_span, warn, Instrument};

use crate::node::{hash_of, NodeCtx};
use crate::now_ms;

#[derive(Clone)]
pub struct JoinService {
    ctx: NodeCtx,
}

impl std::fmt::Debug for JoinService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinService")
    }
}

impl JoinService {
    pub fn new(ctx: NodeCtx) -> Self {
        Self { ctx }
    }
}

impl ProtocolHandler for JoinService {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let peer = blixard_mesh::node_id(&conn.remote_id());
        let ctx = self.ctx.clone();
        rpc::serve(conn, move |req: JoinRequest| {
            let ctx = ctx.clone();
            let span = info_span!("join", peer = %peer.short());
            async move {
                let resp = handle(&ctx, peer, req).await;
                if let JoinResponse::Refused(reason) = &resp {
                    warn!(%reason, "join refused");
                }
                resp
            }
            .instrument(span)
        })
        .await;
        Ok(())
    }
}

async fn handle(ctx: &NodeCtx, peer: NodeId, req: JoinRequest) -> JoinResponse {
    let Some(cluster_id) = ctx.cluster_id() else {
        return JoinResponse::Refused("this node has not joined a cluster yet".into());
    };
    let ticket = match &req {
        JoinRequest::Node { ticket, .. } | JoinRequest::Client { ticket } => ticket,
    };
    if ticket.cluster_id != cluster_id {
        return JoinResponse::Refused(format!(
            "the ticket is for cluster {}, but this node belongs to cluster {cluster_id}",
            ticket.cluster_id
        ));
    }
    let hash = hash_of(ticket);
    match req {
        JoinRequest::Client { .. } => {
            // Fast answer without a write when the key is already authorised.
            if ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.clients.contains_key(&peer) {
                return JoinResponse::Authorized { cluster_id };
            }
            match ctx.propose(peer, Command::AuthorizeClient { key: peer, secret_hash: hash }).await {
                Ok(CommandResult::Ok) => {
                    info!("client key authorised");
                    JoinResponse::Authorized { cluster_id }
                }
                Ok(CommandResult::Refused(r)) => JoinResponse::Refused(r.to_string()),
                Err(e) => JoinResponse::Refused(e.to_string()),
            }
        }
        JoinRequest::Node { ticket, info } => {
            let role = match ticket.role {
                Role::Client => {
                    return JoinResponse::Refused(
                        "a client ticket cannot make a node join; use a voter or learner ticket".into(),
                    )
                }
                r => r,
            };
            let leader = match ctx.leader().await {
                Ok(l) => l,
                Err(e) => return JoinResponse::Refused(e.to_string()),
            };
            if leader != ctx.id {
                return JoinResponse::Redirect { leader: PeerAddr { id: leader, addrs: ctx.addrs_of(&leader) } };
            }
            // Check first for a clear error without a write; `apply` checks again.
            if let Err(r) = ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.check_ticket(&hash, role, now_ms())
            {
                return JoinResponse::Refused(r.to_string());
            }
            let admit = Command::AdmitNode { node: peer, info: info.clone(), secret_hash: hash, role };
            match ctx.propose(peer, admit).await {
                Ok(CommandResult::Ok) => {}
                Ok(CommandResult::Refused(r)) => return JoinResponse::Refused(r.to_string()),
                Err(e) => return JoinResponse::Refused(e.to_string()),
            }
            info!(%role, "admitted; adding as learner");
            let node = RaftNode { addrs: info.addrs };
            if let Err(e) = ctx.add_learner(peer, node).await {
                return JoinResponse::Refused(format!("could not add as learner: {e}"));
            }
            if role == Role::Voter {
                let change = ChangeMembers::AddVoterIds([peer].into());
                if let Err(e) = ctx.change_membership(change, true).await {
                    return JoinResponse::Refused(format!("could not promote to voter: {e}"));
                }
                info!("promoted to voter");
            }
            JoinResponse::Admitted { cluster_id, role }
        }
    }
}
