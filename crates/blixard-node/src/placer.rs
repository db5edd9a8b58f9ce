//! Placement, on the leader: every VM without a node (new, or its node was removed, or
//! dead past the grace period) is placed by the scheduler on a live node, and the
//! placement recorded in Raft. The node a VM left stops it when it comes back (its
//! reconciler sees the VM is no longer placed there).

use std::time::Duration;

use blixard_scheduler::place;
use blixard_types::{Command, CommandResult, NodeId};
use tracing::{info, warn, Instrument};

use crate::node::NodeCtx;

/// How long a node may be dead (after it is declared dead) before its VMs are placed
/// elsewhere, by default.
pub const GRACE: Duration = Duration::from_secs(10);
/// Most placements proposed per round (a round is at most every `TICK`).
const PER_ROUND: usize = 256;
const TICK: Duration = Duration::from_millis(500);
/// Least time between two rounds.
const MIN_GAP: Duration = Duration::from_millis(50);

/// Places VMs while this node is the leader; runs until the node stops.
pub async fn run(ctx: NodeCtx) {
    let metrics = ctx.raft.metrics();
    let mut applied = ctx.applied.clone();
    let mut last = std::time::Instant::now();
    let mut next = tokio::time::Instant::now() + TICK;
    loop {
        // A new entry (a VM created, a node gone) is placed at once; the tick catches the
        // passage of time (a node dead for long enough). A deadline, so that metrics
        // changing on every heartbeat do not postpone it.
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + TICK;
            }
            r = applied.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
        if metrics.borrow().current_leader != Some(ctx.id) {
            continue;
        }
        // Under a stream of writes, place at most every MIN_GAP (a round reads every node).
        if let Some(wait) = MIN_GAP.checked_sub(last.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        last = std::time::Instant::now();
        round(&ctx)
            .instrument(tracing::info_span!("placement"))
            .await;
    }
}

/// Whether the VMs on `node` must move: it is dead (per gossip) for longer than the grace
/// period ([`GRACE`] by default).
fn lost(ctx: &NodeCtx, node: &NodeId) -> bool {
    if *node == ctx.id {
        return false;
    }
    let d = ctx.liveness.lock().unwrap_or_else(|p| p.into_inner());
    d.silent_for(node, std::time::Instant::now())
        .is_some_and(|s| s >= crate::liveness::DEAD_AFTER + ctx.placement_grace)
}

/// One placement round. Returns how many VMs were placed.
pub async fn round(ctx: &NodeCtx) -> usize {
    let (mut views, todo, policy, salt) = {
        let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
        let mut views = st.state.node_views(|id| ctx.is_alive(id));
        // Image locality: the images each node holds (gossip), besides those its VMs use.
        {
            let det = ctx.liveness.lock().unwrap_or_else(|p| p.into_inner());
            for v in &mut views {
                if v.id == ctx.id {
                    v.images.extend(ctx.images.held());
                } else if let Some(r) = det.report(&v.id) {
                    v.images.extend(r.images.iter().cloned());
                }
            }
        }
        let todo: Vec<_> = st
            .state
            .vms
            .iter()
            .filter(|(_, v)| !v.deleting)
            .filter(|(_, v)| match v.node {
                None => true,
                // Drained nodes hand their VMs over too.
                Some(n) => {
                    !st.state.nodes.contains_key(&n)
                        || lost(ctx, &n)
                        || st.state.drained.contains(&n)
                }
            })
            .take(PER_ROUND)
            .map(|(name, v)| (name.clone(), v.spec.clone(), v.error.clone(), v.node))
            .collect();
        let salt = st.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
        (views, todo, st.state.policy.clone(), salt)
    };
    let mut placed = 0;
    for (i, (name, spec, error, from)) in todo.into_iter().enumerate() {
        // A VM leaving a lost or drained node must not be placed back on it.
        if let Some(from) = from {
            if let Some(v) = views.iter_mut().find(|v| v.id == from) {
                v.schedulable = false;
            }
        }
        match place(&views, &spec, &policy, salt.wrapping_add(i as u64)) {
            Ok(node) => match ctx
                .propose(
                    ctx.id,
                    Command::PlaceVm {
                        name: name.clone(),
                        node,
                    },
                )
                .await
            {
                Ok(CommandResult::Ok) => {
                    info!(vm = %name, node = %node.short(), moved_from = ?from.map(|f| f.short()), "placed");
                    ctx.metrics
                        .placements
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    placed += 1;
                    // Count it at once, so this round does not overfill the node.
                    if let Some(v) = views.iter_mut().find(|v| v.id == node) {
                        blixard_scheduler::charge(v, &spec);
                    }
                }
                Ok(CommandResult::Refused(r)) => {
                    warn!(vm = %name, reason = %r, "placement refused")
                }
                Err(e) => {
                    warn!(vm = %name, error = %e, "placement not recorded");
                    return placed;
                }
            },
            Err(unschedulable) => {
                let reason = unschedulable.to_string();
                ctx.metrics
                    .placement_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if error.as_deref() != Some(format!("cannot place: {reason}").as_str()) {
                    let _ = ctx
                        .propose(
                            ctx.id,
                            Command::PlacementFailed {
                                name: name.clone(),
                                reason,
                            },
                        )
                        .await;
                }
            }
        }
    }
    placed
}
