//! The Raft network on iroh: outbound RPCs through a cached connection pool on the raft
//! ALPN, inbound RPCs handed to the local `Raft`.
//!
//! Goals: one QUIC connection per peer, reused; dialling never happens under a lock the
//! Raft core needs; a peer's identity is its key, checked by the mesh's gate before any
//! message is read. Non-goals: relaying RPCs through third parties.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard_mesh::rpc::{self, Pool, RpcError};
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, Instrument};

use crate::{NodeId, Raft, RaftNode, TypeConfig};

/// A raft RPC on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// A raft RPC's answer on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcResponse {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// The request was of a kind this node cannot handle.
    Unexpected,
}

/// Where a member can be dialled now (its recorded addresses may be newer than the ones in
/// the Raft membership).
pub type AddrBook = Arc<dyn Fn(&NodeId) -> Vec<SocketAddr> + Send + Sync>;

/// When each peer last answered an RPC: the leader's view of who is alive.
#[derive(Debug, Default)]
pub struct PeerHealth {
    last_ok: Mutex<HashMap<NodeId, Instant>>,
}

impl PeerHealth {
    fn record(&self, peer: NodeId) {
        self.last_ok.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, Instant::now());
    }

    /// How long ago `peer` last answered, if ever.
    pub fn since_last_ok(&self, peer: &NodeId) -> Option<Duration> {
        self.last_ok.lock().unwrap_or_else(|p| p.into_inner()).get(peer).map(|t| t.elapsed())
    }
}

/// Creates one [`NetworkClient`] per target; all share the connection pool.
#[derive(Clone)]
pub struct Network {
    pool: Pool,
    addrs: AddrBook,
    health: Arc<PeerHealth>,
}

impl Network {
    pub fn new(endpoint: iroh::Endpoint, addrs: AddrBook) -> Self {
        Self { pool: Pool::new(endpoint, blixard_mesh::alpn::RAFT), addrs, health: Default::default() }
    }

    pub fn health(&self) -> Arc<PeerHealth> {
        self.health.clone()
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Self::Network {
        NetworkClient { net: self.clone(), target, fallback: node.addrs.clone() }
    }
}

/// RPCs to one target.
pub struct NetworkClient {
    net: Network,
    target: NodeId,
    fallback: Vec<SocketAddr>,
}

impl NetworkClient {
    async fn call<E: std::error::Error>(
        &self,
        req: RaftRpc,
        option: &RPCOption,
    ) -> Result<RaftRpcResponse, RPCError<NodeId, RaftNode, E>> {
        let mut addrs = (self.net.addrs)(&self.target);
        if addrs.is_empty() {
            addrs = self.fallback.clone();
        }
        let resp = self.net.pool.call(&self.target, &addrs, &req, option.hard_ttl()).await;
        match resp {
            Ok(r) => {
                self.net.health.record(self.target);
                Ok(r)
            }
            Err(e @ (RpcError::Connect { .. } | RpcError::NoAddress(_) | RpcError::Refused { .. })) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>() -> RPCError<NodeId, RaftNode, E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other("unexpected response kind")))
    }
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        match self.call(RaftRpc::Append(rpc), &option).await? {
            RaftRpcResponse::Append(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(Self::unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.call(RaftRpc::Snapshot(rpc), &option).await? {
            RaftRpcResponse::Snapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(Self::unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        match self.call(RaftRpc::Vote(rpc), &option).await? {
            RaftRpcResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(Self::unexpected()),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // Retry an unreachable peer quickly at first (it may be restarting), then settle.
        openraft::network::Backoff::new(
            [50u64, 100, 200, 400].into_iter().chain(std::iter::repeat(500)).map(Duration::from_millis),
        )
    }
}

/// Serves inbound raft RPCs (behind the mesh's member gate).
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftService")
    }
}

impl RaftService {
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }
}

async fn handle(raft: Raft, req: RaftRpc) -> RaftRpcResponse {
    match req {
        RaftRpc::Append(r) => RaftRpcResponse::Append(raft.append_entries(r).await),
        RaftRpc::Vote(r) => RaftRpcResponse::Vote(raft.vote(r).await),
        RaftRpc::Snapshot(r) => RaftRpcResponse::Snapshot(raft.install_snapshot(r).await),
    }
}

impl ProtocolHandler for RaftService {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let peer = blixard_mesh::node_id(&conn.remote_id());
        let raft = self.raft.clone();
        let span = tracing::debug_span!("raft-peer", peer = %peer.short());
        async move {
            debug!("raft connection accepted");
            rpc::serve(conn, move |req| handle(raft.clone(), req)).await;
        }
        .instrument(span)
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Raft RPCs from the network decode or fail cleanly, never panic.
        #[test]
        fn raft_rpc_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = blixard_types::frame::decode::<RaftRpc>(&bytes);
            let _ = blixard_types::frame::decode::<RaftRpcResponse>(&bytes);
        }
    }

    #[test]
    fn raft_rpc_round_trips() {
        let vote = VoteRequest { vote: openraft::Vote::new(3, NodeId([1; 32])), last_log_id: None };
        let bytes = blixard_types::frame::encode(&RaftRpc::Vote(vote.clone())).expect("encode");
        let back: RaftRpc = blixard_types::frame::decode(&bytes[4..]).expect("decode");
        assert!(matches!(back, RaftRpc::Vote(v) if v == vote));
        // Errors survive the wire too (a follower's refusal must reach the leader intact).
        let err: RaftRpcResponse = RaftRpcResponse::Vote(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)));
        let bytes = blixard_types::frame::encode(&err).expect("encode");
        let back: RaftRpcResponse = blixard_types::frame::decode(&bytes[4..]).expect("decode");
        assert!(matches!(back, RaftRpcResponse::Vote(Err(RaftError::Fatal(_)))));
    }
}
