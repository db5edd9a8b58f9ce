//! The simulated network: openraft's RPCs handed straight to the target's `Raft`, through a
//! seeded scheduler that loses, delays, duplicates (and so reorders) messages and honours
//! partitions.
//!
//! An RPC is two messages, request and response, each with its own fate. A lost message is
//! never answered: the caller waits out the RPC's time-to-live, as on a real network. Errors
//! are reported as `RPCError::Network`, never `Unreachable`: `Unreachable` sends openraft's
//! replication into a backoff loop built on an unbiased `tokio::select!`, whose branch order
//! tokio draws from an unseeded generator.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use blixard_raft::RaftNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::runtime;
use crate::world::World;
use crate::{Raft, SimConfig};

/// Why a simulated RPC failed, as the caller sees it.
#[derive(Debug)]
struct SimNetError(&'static str);

impl std::fmt::Display for SimNetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for SimNetError {}

/// What happens to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Lost,
    Delivered { delay_ms: u64, seq: u64 },
}

impl World {
    /// Decides the fate of one message on link `from → to` and counts it.
    pub fn plan(&self, from: u64, to: u64, what: &str) -> Fate {
        let mut w = self.lock();
        w.counters.bump("messages");
        let seq = {
            let link = w.links.entry((from, to)).or_default();
            link.0 += 1;
            link.0
        };
        let net = w.net;
        let fate = if w.blocked.contains(&(from, to)) {
            w.counters.bump("msg_dropped_partition");
            Fate::Lost
        } else if w.rng.chance(net.loss) {
            w.counters.bump("msg_lost");
            Fate::Lost
        } else {
            let spike = w.rng.chance(net.spike);
            let (lo, hi) = if spike { net.spike_ms } else { net.base_ms };
            if spike {
                w.counters.bump("msg_delayed");
            }
            Fate::Delivered {
                delay_ms: w.rng.range(lo, hi),
                seq,
            }
        };
        w.event(format_args!("msg n{from}->n{to} {what} #{seq} {fate:?}"));
        fate
    }

    /// Whether to deliver a duplicate of a request, and after how long.
    fn plan_duplicate(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let mut w = self.lock();
        let net = w.net;
        if w.blocked.contains(&(from, to)) || !w.rng.chance(net.dup) {
            return None;
        }
        w.counters.bump("msg_duplicated");
        let seq = {
            let link = w.links.entry((from, to)).or_default();
            link.0 += 1;
            link.0
        };
        let delay = w
            .rng
            .range(net.base_ms.0, net.spike_ms.1.max(net.base_ms.1));
        w.event(format_args!("dup n{from}->n{to} #{seq} in {delay}ms"));
        Some((delay, seq))
    }

    /// A message with sequence number `seq` arrives at `to`: counts reordering, and returns
    /// the target's `Raft` if it is up and the link is not cut now.
    fn arrive(&self, from: u64, to: u64, seq: u64) -> Option<Raft> {
        let mut w = self.lock();
        let reordered = {
            let link = w.links.entry((from, to)).or_default();
            let reordered = seq < link.1;
            link.1 = link.1.max(seq);
            reordered
        };
        if reordered {
            w.counters.bump("msg_reordered");
        }
        if w.blocked.contains(&(from, to)) {
            w.counters.bump("msg_dropped_partition");
            return None;
        }
        w.rafts.get(&to).cloned()
    }

    /// Carries one RPC `from → to`: request, handling by the target's real `Raft`, response.
    async fn rpc<Q, P, E, F, Fut>(
        self: &Arc<Self>,
        from: u64,
        to: u64,
        what: &'static str,
        req: Q,
        ttl: Duration,
        call: F,
    ) -> Result<P, RPCError<u64, RaftNode, RaftError<u64, E>>>
    where
        Q: Clone + Send + 'static,
        P: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(Raft, Q) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<P, RaftError<u64, E>>> + Send,
    {
        let lost = || async move {
            tokio::time::sleep(ttl).await;
            Err(RPCError::Network(NetworkError::new(&SimNetError(
                "message lost",
            ))))
        };
        let Fate::Delivered { delay_ms, seq } = self.plan(from, to, what) else {
            return lost().await;
        };
        if let Some((dup_delay, dup_seq)) = self.plan_duplicate(from, to) {
            let world = self.clone();
            let (req, call) = (req.clone(), call.clone());
            let deliver = async move {
                tokio::time::sleep(Duration::from_millis(dup_delay)).await;
                if let Some(raft) = world.arrive(from, to, dup_seq) {
                    // The duplicate's answer goes nowhere.
                    let _ = call(raft, req).await;
                }
            };
            match runtime::current_node() {
                Some(node) => drop(runtime::spawn_on(node, deliver)),
                None => drop(tokio::spawn(deliver)),
            }
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let Some(raft) = self.arrive(from, to, seq) else {
            return lost().await;
        };
        let result = call(raft, req).await;
        let Fate::Delivered { delay_ms, seq } = self.plan(to, from, "reply") else {
            return lost().await;
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if self.arrive(to, from, seq).is_none() {
            // The caller crashed (its task is gone anyway) or the link was cut meanwhile.
            return lost().await;
        }
        match result {
            Ok(p) => Ok(p),
            // The target stopped while handling it: to the caller, a broken connection.
            Err(RaftError::Fatal(_)) => Err(RPCError::Network(NetworkError::new(&SimNetError(
                "peer stopped",
            )))),
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(to, e))),
        }
    }
}

/// openraft's network factory for one simulated node.
pub struct SimNetwork {
    pub from: u64,
    pub world: Arc<World>,
}

/// One node's client to one peer.
pub struct SimClient {
    from: u64,
    to: u64,
    world: Arc<World>,
}

impl RaftNetworkFactory<SimConfig> for SimNetwork {
    type Network = SimClient;

    async fn new_client(&mut self, target: u64, _node: &RaftNode) -> SimClient {
        SimClient {
            from: self.from,
            to: target,
            world: self.world.clone(),
        }
    }
}

impl RaftNetwork<SimConfig> for SimClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        let what = if rpc.entries.is_empty() {
            "heartbeat"
        } else {
            "append"
        };
        self.world
            .rpc(
                self.from,
                self.to,
                what,
                rpc,
                option.hard_ttl(),
                |raft: Raft, rpc| async move { raft.append_entries(rpc).await },
            )
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, RaftNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.world
            .rpc(
                self.from,
                self.to,
                "snapshot",
                rpc,
                option.hard_ttl(),
                |raft: Raft, rpc| async move { raft.install_snapshot(rpc).await },
            )
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        let asked = rpc.vote;
        let result = self
            .world
            .rpc(
                self.from,
                self.to,
                "vote",
                rpc,
                option.hard_ttl(),
                |raft: Raft, rpc| async move { raft.vote(rpc).await },
            )
            .await;
        if let Ok(r) = &result {
            let (from, to) = (self.from, self.to);
            self.world.lock().event(format_args!(
                "vote n{from}<-n{to} asked {asked} granted {} their vote {}",
                r.vote_granted, r.vote
            ));
        }
        result
    }
}
