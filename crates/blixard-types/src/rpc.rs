//! Messages of the join and client-API protocols. Each protocol frames these with
//! [`crate::frame`]; the peer's identity always comes from the QUIC connection, never
//! from a message.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::command::{NodeInfo, Request, Resources};
use crate::id::{ClusterId, NodeId};
use crate::ticket::{PeerAddr, Role, Ticket};

/// Sent by a joining node, or by a CLI authorising its key, on the join protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JoinRequest {
    /// A node asks to become a member with the role its ticket grants.
    Node { ticket: Ticket, info: NodeInfo },
    /// A CLI key asks to be authorised as a client.
    Client { ticket: Ticket },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JoinResponse {
    /// The node is a member (a learner, or a voter if the ticket said so).
    Admitted { cluster_id: ClusterId, role: Role },
    /// This peer is not the leader: ask this one. The joiner may trust it as a member.
    Redirect { leader: PeerAddr },
    /// The CLI key is authorised as a client.
    Authorized { cluster_id: ClusterId },
    /// Refused, with the reason.
    Refused(String),
}

/// A request on the client API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Cluster id, leader, term and members (a linearizable read).
    Status,
    /// Issues a ticket.
    CreateTicket { role: Role, ttl_ms: u64 },
    /// Revokes a ticket by id.
    RevokeTicket { id: String },
    /// Removes a node (id or unique prefix).
    RemoveNode { node: String },
    /// Sets and removes labels of a node (id or unique prefix).
    Label { node: String, set: BTreeMap<String, String>, remove: Vec<String> },
    /// What one node itself knows (its own Raft view and applied state), answered by that
    /// node (forwarded to it if needed), not by the leader.
    NodeStatus { node: String },
    /// A member forwarding a proposal to the leader on behalf of `Request::by`.
    /// Accepted only from members.
    Propose(Request),
    /// A member forwarding a client request to the leader; answered as if `origin` had
    /// sent it. Accepted only from members.
    Forwarded { origin: NodeId, request: Box<ClientRequest> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientResponse {
    Status(ClusterStatus),
    Ticket { ticket: String, id: String, expires_at_ms: u64 },
    Node(NodeStatus),
    Ok,
    Error(ApiError),
}

/// Errors the client API reports to the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("no leader is known right now; retry in a moment")]
    NoLeader,
    #[error("no node matches {0:?}")]
    NoSuchNode(String),
    #[error("{0:?} matches more than one node; give more characters")]
    AmbiguousNode(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The answer to `cluster status`. Field names are the `--json` contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: ClusterId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit_index: u64,
    pub members: Vec<MemberStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addrs: Vec<SocketAddr>,
    /// `voter` or `learner`.
    pub role: String,
    /// `leader`, `follower`, `learner` or `unreachable`, as the leader sees it.
    pub state: String,
    /// The leader heard from it recently.
    pub healthy: bool,
    pub labels: BTreeMap<String, String>,
    pub resources: Resources,
    pub cpus_free: u32,
    pub memory_mib_free: u64,
    pub vms: u32,
}

/// One node's own view. Field names are the `--json` contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    /// `leader`, `follower`, `learner` or `candidate`.
    pub state: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub last_applied: u64,
    /// BLAKE3 of the applied cluster state: equal on replicas that applied the same log.
    pub state_digest: String,
    pub members: u32,
    /// This node's gossip view of every other member: alive, suspect, dead or unknown.
    pub peers: BTreeMap<NodeId, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use proptest::prelude::*;

    fn decodes<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
        let _ = frame::decode::<T>(bytes);
    }

    proptest! {
        /// Every message a peer can send us decodes or fails cleanly: never a panic, never
        /// an unbounded allocation.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            decodes::<ClientRequest>(&bytes);
            decodes::<ClientResponse>(&bytes);
            decodes::<JoinRequest>(&bytes);
            decodes::<JoinResponse>(&bytes);
            decodes::<crate::Request>(&bytes);
            decodes::<crate::CommandResult>(&bytes);
        }

        /// Valid messages with a corrupted byte still never panic.
        #[test]
        fn mutated_messages_never_panic(node in "[0-9a-f]{0,64}", k in "[a-z]{1,8}", v in "[a-z]{0,8}", pos in any::<usize>(), byte in any::<u8>()) {
            let req = ClientRequest::Label { node, set: BTreeMap::from([(k, v)]), remove: vec![] };
            let mut bytes = frame::encode(&req).expect("encode")[4..].to_vec();
            let back: ClientRequest = frame::decode(&bytes).expect("round trip");
            let is_label = matches!(back, ClientRequest::Label { .. });
            prop_assert!(is_label);
            let i = pos % bytes.len();
            bytes[i] = byte;
            decodes::<ClientRequest>(&bytes);
        }
    }
}
