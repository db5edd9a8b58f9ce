//! Raft for Blixard: the openraft type configuration, durable storage in redb, and the
//! Raft network carried on iroh streams.
//!
//! Layout:
//! - [`TypeConfig`]: ties openraft's generics to Blixard's types.
//! - [`storage`]: `RaftLogStorage` + `RaftStateMachine` on one redb file.
//! - [`network`]: `RaftNetworkFactory` over the mesh's raft ALPN, and the inbound handler.
//!
//! **Invariant:** this is the only crate that knows openraft and redb table layouts.

use std::fmt;
use std::io::Cursor;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub mod elections;
pub mod network;
pub mod storage;

pub use blixard_types::{NodeId, Request, Response};

/// What openraft stores about each member: where to dial it. Its identity is the
/// `NodeId` (its key), so addresses are only hints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    pub addrs: Vec<SocketAddr>,
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.addrs)
    }
}

openraft::declare_raft_types!(
    /// Blixard's openraft configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, RaftNode>;
pub type StoredMembership = openraft::StoredMembership<NodeId, RaftNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, RaftNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
