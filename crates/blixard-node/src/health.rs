//! Gossip: every node broadcasts a signed health report on the cluster's topic and feeds
//! what it hears into its failure detector. Reports from keys that are not members are
//! dropped, so are stale and replayed ones.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blixard_mesh::{signed, MemoryLookup};
use blixard_types::gossip::{GossipMessage, NodeHealth};
use blixard_types::vm::VmState;
use blixard_types::NodeId;
use iroh::SecretKey;
use iroh_gossip::api::Event;
use iroh_gossip::{Gossip, TopicId};
use n0_future::StreamExt;
use tracing::{debug, info, warn, Instrument};

use crate::liveness::{Detector, INTERVAL};
use crate::node::NodeCtx;
use crate::now_ms;

/// The topic of a cluster: a hash of its id, so clusters never share one.
pub fn topic(cluster: &blixard_types::ClusterId) -> TopicId {
    let mut h = blake3::Hasher::new();
    // 2: reports carry `hears`; nodes of version 1 use another topic.
    h.update(b"blixard/gossip/2");
    h.update(&cluster.0);
    TopicId::from_bytes(*h.finalize().as_bytes())
}

/// This node's report, from the applied state.
fn own_report(ctx: &NodeCtx, seq: u64, incarnation: u64) -> NodeHealth {
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    let cap = st.state.nodes.get(&ctx.id).map(|n| n.resources).unwrap_or_default();
    let used = st.state.usage.get(&ctx.id).map(|u| u.used).unwrap_or_default();
    let vms_running = st
        .state
        .vms
        .iter()
        .filter(|(_, v)| v.node == Some(ctx.id) && v.state == VmState::Running)
        .map(|(n, _)| n.clone())
        .collect();
    let voters = ctx.voters();
    let hears = ctx.liveness.lock().unwrap_or_else(|p| p.into_inner()).hears(&ctx.id, &voters, std::time::Instant::now());
    NodeHealth {
        seq,
        incarnation,
        free: blixard_types::command::Resources {
            cpus: cap.cpus.saturating_sub(used.cpus),
            memory_mib: cap.memory_mib.saturating_sub(used.memory_mib),
            disk_gib: cap.disk_gib.saturating_sub(used.disk_gib),
        },
        vms_running,
        images: ctx.images.held().into_iter().collect(),
        hears,
    }
}

/// Members other than this node, with their addresses registered for dialling by id.
fn members(ctx: &NodeCtx, lookup: &MemoryLookup) -> BTreeSet<NodeId> {
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    st.state
        .nodes
        .iter()
        .filter(|(id, _)| **id != ctx.id)
        .map(|(id, n)| {
            if let Some(addr) = blixard_mesh::endpoint_addr(id, &n.addrs) {
                lookup.add_endpoint_info(addr);
            }
            *id
        })
        .collect()
}

/// Runs gossip for this node until the gossip actor stops.
pub async fn run(ctx: NodeCtx, key: SecretKey, gossip: Gossip, lookup: MemoryLookup, detector: Arc<Mutex<Detector>>) {
    let span = tracing::info_span!("gossip");
    async move {
        // Wait until this node knows its cluster (a joiner catches up first).
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cluster = loop {
            if let Some(c) = ctx.cluster_id() {
                break c;
            }
            tick.tick().await;
        };
        let mut known = members(&ctx, &lookup);
        let topic = match gossip.subscribe(topic(&cluster), known.iter().filter_map(blixard_mesh::endpoint_id).collect()).await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot join the gossip topic");
                return;
            }
        };
        let (tx, mut rx) = topic.split();
        info!(peers = known.len(), "gossip started");
        let mut seq = 0u64;
        let incarnation: u64 = rand::random();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now_members = members(&ctx, &lookup);
                    let new: Vec<_> = now_members.difference(&known).filter_map(blixard_mesh::endpoint_id).collect();
                    if !new.is_empty() {
                        let _ = tx.join_peers(new).await;
                    }
                    for gone in known.difference(&now_members) {
                        detector.lock().unwrap_or_else(|p| p.into_inner()).forget(gone);
                    }
                    known = now_members;
                    seq = now_ms().max(seq + 1);
                    let body = postcard::to_stdvec(&GossipMessage::Health(own_report(&ctx, seq, incarnation))).unwrap_or_default();
                    if let Err(e) = tx.broadcast(signed::sign(&key, body).into()).await {
                        debug!(error = %e, "broadcast failed");
                    }
                }
                ev = rx.next() => match ev {
                    Some(Ok(Event::Received(msg))) => accept(&ctx, &detector, &msg.content),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => debug!(error = %e, "gossip receive error"),
                    None => return,
                },
            }
        }
    }
    .instrument(span)
    .await
}

/// Why a received gossip message was dropped.
#[derive(Debug, PartialEq, Eq)]
enum Dropped {
    Envelope(String),
    /// Signed by a key that is not a member (whoever relayed it), or by this node.
    NotFromAMember(NodeId),
    Malformed(NodeId, String),
}

/// Checks one received message: the author's signature, the author's membership, the body.
/// Who relayed it does not matter: the signature is the author's.
fn verify_report(me: NodeId, is_member: impl Fn(&NodeId) -> bool, bytes: &[u8]) -> Result<(NodeId, GossipMessage), Dropped> {
    let (from, body) = signed::verify(bytes).map_err(|e| Dropped::Envelope(e.to_string()))?;
    if from == me || !is_member(&from) {
        return Err(Dropped::NotFromAMember(from));
    }
    let msg = postcard::from_bytes::<GossipMessage>(&body).map_err(|e| Dropped::Malformed(from, e.to_string()))?;
    Ok((from, msg))
}

/// Verifies and records one received report.
fn accept(ctx: &NodeCtx, detector: &Mutex<Detector>, bytes: &[u8]) {
    let is_member = |k: &NodeId| ctx.state.read().unwrap_or_else(|p| p.into_inner()).state.is_member(k);
    match verify_report(ctx.id, is_member, bytes) {
        Ok((from, GossipMessage::Health(h))) => {
            let now = Instant::now();
            let mut d = detector.lock().unwrap_or_else(|p| p.into_inner());
            let was_dead = d.liveness(&from, now) == crate::liveness::Liveness::Dead;
            let restarted = d.report(&from).is_some_and(|old| old.incarnation != h.incarnation);
            if d.observe(from, h, now) && (was_dead || restarted) {
                // It came back, likely as a new process: a cached connection to the old
                // one would only time out.
                ctx.peers.disconnect(&from);
                info!(node = %from.short(), "member is back");
            }
        }
        Err(Dropped::Envelope(e)) => debug!(error = %e, "dropped gossip with a bad envelope"),
        Err(Dropped::NotFromAMember(from)) => debug!(from = %from.short(), "dropped gossip from a non-member"),
        Err(Dropped::Malformed(from, e)) => debug!(from = %from.short(), error = %e, "dropped malformed gossip"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(&[b; 32])
    }

    fn report(k: &SecretKey) -> Vec<u8> {
        let body = postcard::to_stdvec(&GossipMessage::Health(NodeHealth::default())).expect("encode");
        signed::sign(k, body)
    }

    #[test]
    fn only_reports_signed_by_another_member_are_taken() {
        let (me, member, outsider) = (key(1), key(2), key(3));
        let me_id = blixard_mesh::node_id(&me.public());
        let member_id = blixard_mesh::node_id(&member.public());
        let outsider_id = blixard_mesh::node_id(&outsider.public());
        let is_member = |k: &NodeId| *k == me_id || *k == member_id;

        let got = verify_report(me_id, is_member, &report(&member));
        assert!(matches!(got, Ok((from, GossipMessage::Health(_))) if from == member_id), "{got:?}");
        // A non-member's report arrives relayed by a member: the bytes are the author's, so
        // it is dropped all the same.
        let relayed = report(&outsider);
        assert_eq!(verify_report(me_id, is_member, &relayed), Err(Dropped::NotFromAMember(outsider_id)));
        // A report of this node itself, echoed back, is not news.
        assert_eq!(verify_report(me_id, is_member, &report(&me)), Err(Dropped::NotFromAMember(me_id)));
        // A member's report altered on the way: the signature no longer verifies.
        let mut tampered = report(&member);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(verify_report(me_id, is_member, &tampered), Err(Dropped::Envelope(_))));
        // A member signing bytes that are not a gossip message.
        let junk = signed::sign(&member, vec![0xff; 8]);
        assert!(matches!(verify_report(me_id, is_member, &junk), Err(Dropped::Malformed(from, _)) if from == member_id));
    }
}
