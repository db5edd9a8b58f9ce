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
    let mut commands = Vec::new();
    let mut moved_from = Vec::new();
    for p in plan {
        match &p {
            Placement::Place { from, .. } => moved_from.push(*from),
            Placement::Unplaceable { .. } => {
                ctx.metrics.placement_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        commands.extend(p.into_command());
    }
    if commands.is_empty() {
        return 0;
    }
    let result = ctx
        .propose(ctx.id, Command::Batch { commands: commands.clone() })
        .await;
    match result {
        Ok(CommandResult::Ok) => {
            let mut from = moved_from.into_iter();
            let mut placed = 0;
            for c in &commands {
                if let VmCommand::PlaceVm { name, node } = c {
                    let from = from.next().flatten();
                    info!(vm = %name, node = %node.short(), moved_from = ?from.map(|f| f.short()), "placed");
                    placed += 1;
                }
            }
            ctx.metrics.placements.fetch_add(placed as u64, Ordering::Relaxed);
            placed
        }
        Ok(CommandResult::Refused(r)) => {
            warn!(reason = %r, "placement batch refused; proposing its commands one at a time");
            one_at_a_time(ctx, commands, decided).await
        }
        Err(e) => {
            warn!(error = %e, "placements not recorded");
            0
        }
    }
}

/// The round's commands as one entry each; a refused one is logged and skipped.
async fn one_at_a_time(ctx: &NodeCtx, commands: Vec<VmCommand>, decided: std::time::Instant) -> usize {
    let mut placed = 0;
    for c in commands {
        // A plan is only as good as the liveness it was made from: after a proposal that
        // took long (no quorum for a while), decide again.
        if decided.elapsed() > TICK {
            break;
        }
        let vm = c.vm().to_string();
        let place = matches!(c, VmCommand::PlaceVm { .. });
        match ctx.propose(ctx.id, c.into()).await {
            Ok(CommandResult::Ok) if place => {
                info!(vm = %vm, "placed");
                ctx.metrics.placements.fetch_add(1, Ordering::Relaxed);
                placed += 1;
            }
            Ok(CommandResult::Ok) => {}
            Ok(CommandResult::Refused(r)) => warn!(vm = %vm, reason = %r, "placement refused"),
            Err(e) => {
                warn!(vm = %vm, error = %e, "placement not recorded");
                return placed;
            }
        }
    }
    placed
}
