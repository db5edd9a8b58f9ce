//! Breaking split votes: a fresh random timeout for every election round after the first.
//!
//! openraft 0.9 draws a node's election timeout once, when the node starts, and checks it
//! only on its ticks (every 1.5 heartbeats). With standard Raft leader ids
//! (`single-term-leader`) two candidates of one term refuse each other, so two nodes whose
//! timeouts round to the same number of ticks, and whose ticks fall within one vote round
//! trip of each other, split the vote in every round until scheduler jitter parts them. On a
//! loaded 2-core machine that held a three-node cluster without a leader for seconds after
//! its leader died.
//!
//! Standard Raft draws a new timeout for every round. [`break_split_votes`] does that with
//! openraft's public controls: while this node is a candidate, openraft's own election timer
//! is off and the next round starts after a fresh random time in
//! `election_timeout_min..election_timeout_max`, not quantised to ticks. Once the node is a
//! follower or leader again, openraft's timer is back on, so the first election after a
//! leader goes silent (and the leader lease it honours) is unchanged.

use std::time::Duration;

use openraft::{AsyncRuntime, Instant as _, Raft, RaftTypeConfig, ServerState};
use rand_core::RngCore;
use tracing::debug;

/// Runs until `raft` shuts down. Spawn it beside the node's `Raft` (with the same runtime, so
/// in the simulator it dies with the node).
pub async fn break_split_votes<C: RaftTypeConfig>(raft: Raft<C>, timeout_min: u64, timeout_max: u64) {
    let mut metrics = raft.metrics();
    // The round we are waiting out: (term, when to stand again).
    let mut round: Option<(u64, Instant<C>)> = None;
    loop {
        let (state, term) = {
            let m = metrics.borrow_and_update();
            (m.state, m.current_term)
        };
        if state == ServerState::Candidate {
            if round.is_none_or(|(t, _)| t != term) {
                // A new round began (ours, or a higher term we saw): draw its timeout.
                raft.runtime_config().elect(false);
                let wait = random_between::<C>(timeout_min, timeout_max);
                round = Some((term, now::<C>() + Duration::from_millis(wait)));
            }
        } else if round.take().is_some() {
            raft.runtime_config().elect(true);
        }
        let Some((term, at)) = round else {
            if metrics.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = <C::AsyncRuntime as AsyncRuntime>::sleep_until(at) => {
                debug!(term, "no leader after this round; standing again");
                // A fatal error ends Raft; the metrics channel then closes and so do we.
                if raft.trigger().elect().await.is_err() {
                    return;
                }
                // Stand only once per drawn timeout, even if the metrics lag.
                round = Some((term, now::<C>() + Duration::from_millis(timeout_max)));
            }
        }
    }
}

type Instant<C> = <<C as RaftTypeConfig>::AsyncRuntime as AsyncRuntime>::Instant;

fn now<C: RaftTypeConfig>() -> Instant<C> {
    Instant::<C>::now()
}

/// Uniform in `min..max` (or `min` if the range is empty), from the runtime's generator (seeded
/// in the simulator).
fn random_between<C: RaftTypeConfig>(min: u64, max: u64) -> u64 {
    let span = max.saturating_sub(min).max(1);
    min + <C::AsyncRuntime as AsyncRuntime>::thread_rng().next_u64() % span
}
