//! Self-fencing: a node cut off from the cluster stops its VMs before the cluster could
//! place them elsewhere. Pure: the node's executor and the simulator feed it what the
//! node sees and the time.
//!
//! The leader moves a node's VMs once it has not heard from the node for
//! `dead_after + grace` ([`crate::liveness::Detector::lost`]). A node that is not in touch
//! with enough voters to rule out a majority acting without it starts nothing, and stops its
//! VMs after `grace / 2`, well before that. In touch means both ways
//! ([`crate::liveness::Detector::in_touch`]): hearing the others is not enough when they do
//! not hear this node (a one-way partition: they move its VMs while it sees them all).

use std::time::{Duration, Instant};

use blixard_types::NodeId;

/// Whether the voters this node cannot see could form a majority without it, i.e. could be
/// placing its VMs elsewhere. (A 2-node cluster split in two cannot: neither half has a
/// quorum, so neither fences.)
pub fn others_could_act(voters: &[NodeId], sees: impl Fn(&NodeId) -> bool) -> bool {
    if voters.is_empty() {
        return false;
    }
    let unseen = voters.iter().filter(|id| !sees(id)).count();
    unseen * 2 > voters.len()
}

/// How long a node must have been in touch before it acts again (at start, or after being
/// cut off). The leader heard it again at the start of this at the latest, so a placement
/// the leader decided before (from the node's silence) has been proposed or dropped by
/// the end of it (plans live one placer tick, 500 ms), and the catch-up that follows sees it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What the executor does this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// In touch (for [`SETTLE`] at least): reconcile. `resumed`: the first round after
    /// not reconciling, so catch up with the leader's log first. `back`: the node was fenced
    /// until now, so the VMs it stopped may start again at once.
    Reconcile { resumed: bool, back: bool },
    /// Cut off, not yet for long, or in touch for less than [`SETTLE`]: start nothing;
    /// running VMs keep running.
    Wait,
    /// Cut off for `grace / 2`: stop every active VM now (and do nothing else). `first`:
    /// the first round of this fencing.
    Fence { first: bool },
}

/// The fencing state of one node.
#[derive(Clone, Debug)]
pub struct Fence {
    /// Last time in touch (a node just started counts as in touch: it starts nothing
    /// before it is, and fences only `grace / 2` later).
    in_touch_at: Instant,
    /// Since when in touch without a break (`None`: cut off, or not yet in touch).
    streak_from: Option<Instant>,
    fenced: bool,
    /// The last step was `Reconcile`.
    reconciling: bool,
}

impl Fence {
    pub fn new(now: Instant) -> Self {
        Self { in_touch_at: now, streak_from: None, fenced: false, reconciling: false }
    }

    /// How long this node has been in touch without a break. The leader trusts its
    /// detector's silences (declares a node lost) only past `dead_after + grace` of this:
    /// while it was cut off itself, a silence says nothing about the silent node.
    pub fn in_touch_for(&self, now: Instant) -> Duration {
        self.streak_from.map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// One round: `cut_off` is [`others_could_act`] now.
    pub fn step(&mut self, cut_off: bool, now: Instant, grace: Duration) -> Step {
        if cut_off {
            self.streak_from = None;
        } else {
            self.streak_from.get_or_insert(now);
        }
        if !cut_off {
            self.in_touch_at = now;
            if self.in_touch_for(now) < SETTLE {
                self.reconciling = false;
                return Step::Wait;
            }
            let back = std::mem::take(&mut self.fenced);
            let resumed = !std::mem::replace(&mut self.reconciling, true);
            return Step::Reconcile { resumed, back };
        }
        self.reconciling = false;
        if now.saturating_duration_since(self.in_touch_at) < grace / 2 {
            return Step::Wait;
        }
        let first = !self.fenced;
        self.fenced = true;
        Step::Fence { first }
    }

    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// The catch-up a `Reconcile { resumed: true, back }` asked for did not finish (the
    /// leader could not be reached): the next round that may reconcile resumes again, with
    /// the same `back`. Catching up must not hold up the fencing decisions meanwhile.
    pub fn retry_resume(&mut self, back: bool) {
        self.reconciling = false;
        self.fenced |= back;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_rule() {
        let v: Vec<NodeId> = (1..=5).map(|i| NodeId([i; 32])).collect();
        assert!(!others_could_act(&v, |_| true));
        assert!(!others_could_act(&v, |id| id.0[0] <= 3), "two unseen of five cannot act");
        assert!(others_could_act(&v, |id| id.0[0] <= 2), "three unseen of five can");
        let two = &v[..2];
        assert!(!others_could_act(two, |id| id.0[0] == 1), "one of two is no majority");
        assert!(!others_could_act(&[], |_| false));
    }

    #[test]
    fn fences_after_half_the_grace_and_comes_back() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let grace = Duration::from_secs(10);
        let mut f = Fence::new(t0);
        assert_eq!(f.in_touch_for(t0 + grace), Duration::ZERO, "not in touch before the first round");
        assert_eq!(f.step(false, t0, grace), Step::Wait, "in touch, not yet for SETTLE");
        assert_eq!(f.step(false, s(1.0), grace), Step::Reconcile { resumed: true, back: false });
        assert_eq!(f.step(false, s(1.5), grace), Step::Reconcile { resumed: false, back: false });
        assert_eq!(f.step(true, s(5.0), grace), Step::Wait);
        assert_eq!(f.step(true, s(6.5), grace), Step::Fence { first: true });
        assert_eq!(f.step(true, s(7.0), grace), Step::Fence { first: false });
        assert!(f.fenced());
        assert_eq!(f.step(false, s(8.0), grace), Step::Wait, "back in touch: settles first");
        assert_eq!(f.in_touch_for(s(8.5)), Duration::from_millis(500));
        assert_eq!(f.step(false, s(9.0), grace), Step::Reconcile { resumed: true, back: true });
        assert_eq!(f.step(false, s(9.5), grace), Step::Reconcile { resumed: false, back: false });
        // Cut off briefly (no fence): catches up again when it resumes.
        assert_eq!(f.step(true, s(10.0), grace), Step::Wait);
        assert_eq!(f.in_touch_for(s(10.0)), Duration::ZERO);
        assert_eq!(f.step(false, s(10.5), grace), Step::Wait);
        assert_eq!(f.step(false, s(11.5), grace), Step::Reconcile { resumed: true, back: false });
        // A catch-up that did not finish: resume again, fenced or not.
        f.retry_resume(true);
        assert_eq!(f.step(false, s(12.0), grace), Step::Reconcile { resumed: true, back: true });
    }
}
