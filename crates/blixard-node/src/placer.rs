//! Placement, on the leader: every VM without a node (new, or its node was removed, or
//! dead past the grace period) is placed by the scheduler on a live node, and the
//! placement recorded in Raft. The node a VM left stops it when it comes back (its
//! reconciler sees the VM is no longer placed there).

use std::sync::atomic::Ordering;
use std::time::Duration;

use blixard_state::Placement;
use blixard_types::command::VmCommand;
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
    // Only to know how long this node has been in touch (it never fences here).
    let mut touch = blixard_reconcile::fence::Fence::new(last);
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
        touch.step(ctx.cut_off(), std::time::Instant::now(), ctx.placement_grace);
        if metrics.borrow().current_leader != Some(ctx.id) {
            continue;
        }
        // Under a stream of writes, place at most every MIN_GAP (a round reads every node).
        if let Some(wait) = MIN_GAP.checked_sub(last.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        last = std::time::Instant::now();
        let in_touch_for = touch.in_touch_for(std::time::Instant::now());
        round(&ctx, in_touch_for).instrument(tracing::info_span!("placement")).await;
    }
}

/// Whether the VMs on `node` must move: it is dead (per gossip) for longer than the grace
/// period ([`GRACE`] by default), and this node has been in touch with a majority for at
/// least as long (`in_touch_for`), so the silence is the other node's.
fn lost(ctx: &NodeCtx, node: &NodeId, in_touch_for: Duration) -> bool {
    if *node == ctx.id {
        return false;
    }
    let d = ctx.liveness.lock().unwrap_or_else(|p| p.into_inner());
    d.lost(node, std::time::Instant::now(), ctx.placement_grace, in_touch_for)
}

/// One placement round: decided by [`blixard_state::ClusterState::plan_placements`], then
/// proposed as one [`Command::Batch`] (one Raft entry for the round). If the batch is
/// refused (a VM deleted or a node removed since the plan), the round is proposed again one
/// command at a time, so the rest still lands. Returns how many VMs were placed.
pub async fn round(ctx: &NodeCtx, in_touch_for: Duration) -> usize {
    let plan = {
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
        let salt = st.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
        st.state
            .plan_placements(views, |n| lost(ctx, n, in_touch_for), salt, PER_ROUND)
    };
    let decided = std::time::Instant::now();
    // Each entry with the node a moved VM comes from, for the log.
    let mut entries: Vec<(VmCommand, Option<NodeId>)> = Vec::new();
    for p in plan {
        let from = match &p {
            Placement::Place { from, .. } => *from,
            Placement::Unplaceable { .. } => {
                ctx.metrics.placement_failures.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        entries.extend(p.into_command().map(|c| (c, from)));
    }
    if entries.is_empty() {
        return 0;
    }
    let commands = entries.iter().map(|(c, _)| c.clone()).collect();
    match ctx.propose(ctx.id, Command::Batch { commands }).await {
        Ok(CommandResult::Ok) => entries.iter().filter(|(c, from)| record_placed(ctx, c, *from)).count(),
        Ok(CommandResult::Refused(r)) => {
            warn!(reason = %r, "placement batch refused; proposing its commands one at a time");
            one_at_a_time(ctx, entries, decided).await
        }
        Err(e) => {
            warn!(error = %e, "placements not recorded");
            0
        }
    }
}

/// Logs and counts a committed placement; false for any other command.
fn record_placed(ctx: &NodeCtx, c: &VmCommand, from: Option<NodeId>) -> bool {
    let VmCommand::PlaceVm { name, node } = c else {
        return false;
    };
    info!(vm = %name, node = %node.short(), moved_from = ?from.map(|f| f.short()), "placed");
    ctx.metrics.placements.fetch_add(1, Ordering::Relaxed);
    true
}

/// The round's commands as one entry each; a refused one is logged and skipped.
async fn one_at_a_time(ctx: &NodeCtx, entries: Vec<(VmCommand, Option<NodeId>)>, decided: std::time::Instant) -> usize {
    let mut placed = 0;
    for (c, from) in entries {
        // A plan is only as good as the liveness it was made from: after a proposal that
        // took long (no quorum for a while), decide again.
        if decided.elapsed() > TICK {
            break;
        }
        match ctx.propose(ctx.id, c.clone().into()).await {
            Ok(CommandResult::Ok) => {
                if record_placed(ctx, &c, from) {
                    placed += 1;
                }
            }
            Ok(CommandResult::Refused(r)) => warn!(vm = %c.vm(), reason = %r, "placement refused"),
            Err(e) => {
                warn!(vm = %c.vm(), error = %e, "placement not recorded");
                return placed;
            }
        }
    }
    placed
}
