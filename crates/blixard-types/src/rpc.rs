//! Messages of the join and client-API protocols. Each protocol frames these with
//! [`crate::frame`]; the peer's identity always comes from the QUIC connection, never
//! from a message.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::command::{NodeInfo, Request, Resources};
use crate::id::{ClusterId, NodeId};
use crate::ticket::{PeerAddr, Role, Ticket};
use crate::vm::{Desired, VmSpec};

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
    /// Fetches image `hash` from `provider` (the pushing CLI's endpoint), verifies it,
    /// keeps it, and records it in the catalogue (under `name`, if given). Answered by the
    /// node that receives it.
    ImagePush { hash: String, name: Option<String>, provider: PeerAddr },
    /// The image catalogue, with which nodes hold each image.
    ImageList,
    /// One image (a name, full hash or unique hash prefix).
    ImageInfo { reference: String },
    /// Removes an image from the catalogue (refused while a VM uses it); every node then
    /// drops its copy.
    ImageRemove { reference: String },
    /// Deletes, on `node` (or on every member if `None`), local image data that the
    /// catalogue no longer lists.
    ImageGc { node: Option<String> },
    /// Fetches (from the nodes that hold it) and materialises an image on `node`.
    ImagePull { reference: String, node: String },
    /// Records a VM (validated, image resolved) and lets the leader place it.
    VmCreate { spec: VmSpec, start: bool },
    /// Sets what a VM should be: running, paused or stopped.
    VmSetDesired { name: String, desired: Desired },
    VmReboot { name: String },
    VmDelete { name: String },
    VmInfo { name: String },
    VmList,
    /// Serial console bytes of a VM from `offset`, answered by its node.
    VmLogs { name: String, offset: u64, max_bytes: u32 },
    /// A drained node takes no new VMs and its VMs move away (`drain: false` undoes it).
    NodeDrain { node: String, drain: bool },
    /// A member forwarding a proposal to the leader on behalf of `Request::by`.
    /// Accepted only from members.
    Propose(Request),
    /// A member forwarding a client request to the leader; answered as if `origin` had
    /// sent it. Accepted only from members. `id` is the same for every attempt to forward
    /// one request: the writes it leads to are applied once (see `Request::id`).
    Forwarded { origin: NodeId, request: Box<ClientRequest>, id: u128 },
    /// A client's request under an id the client chose, the same for every time it sends
    /// it again (after "no leader", a lost answer, ...): the writes it leads to are applied
    /// once whatever path each attempt takes. Any caller; `request` must not be wrapped again.
    WithId { id: u128, request: Box<ClientRequest> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientResponse {
    Status(ClusterStatus),
    Ticket { ticket: String, id: String, expires_at_ms: u64 },
    Node(NodeStatus),
    Image(ImageInfo),
    Images(Vec<ImageInfo>),
    Pulled(PullReport),
    Gc(Vec<GcReport>),
    Vm(VmInfo),
    Vms(Vec<VmInfo>),
    Logs(LogChunk),
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

/// An image in the catalogue. Field names are the `--json` contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub hash: String,
    pub names: Vec<String>,
    /// `nix-closure` or `bundle`.
    pub kind: String,
    /// Bytes of all its blobs.
    pub size: u64,
    pub publisher: NodeId,
    pub created_at_ms: u64,
    /// Members that hold it complete (from gossip), and VMs that use it.
    pub nodes: Vec<NodeId>,
    pub vms: Vec<String>,
}

/// What a fetch onto a node did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullReport {
    pub node: NodeId,
    pub image: ImageInfo,
    pub bytes_transferred: u64,
    pub parts: u64,
    pub parts_already_local: u64,
    pub elapsed_ms: u64,
    /// Bytes received per provider.
    pub providers: BTreeMap<NodeId, u64>,
}

/// What `image gc` did on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub node: NodeId,
    pub images_removed: u64,
    pub blobs_before: u64,
    pub blobs_after: u64,
    /// Why it failed on this node, if it did.
    pub error: Option<String>,
}

/// A VM as `vm info`/`vm list` show it. Field names are the `--json` contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    /// The image reference as given at create, and the hash it resolved to.
    pub image: String,
    pub image_hash: String,
    /// What it actually is (as its node reports).
    pub state: String,
    /// What it should be.
    pub desired: String,
    pub node: Option<NodeId>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub healthy: Option<bool>,
    /// The last error (placement, image, boot, crash), if any.
    pub error: Option<String>,
    pub restarts: u32,
    pub restart: String,
    pub health_check: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub constraints: BTreeMap<String, String>,
    pub anti_affinity: Option<String>,
    pub deleting: bool,
    pub created_at_ms: u64,
    /// When `state` last changed (Unix ms).
    pub since: u64,
}

/// Console bytes of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub node: NodeId,
    pub data: Vec<u8>,
    /// Offset to ask from next time.
    pub next: u64,
    /// Bytes that were dropped from the bounded log before `offset` (if any).
    pub skipped: u64,
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
