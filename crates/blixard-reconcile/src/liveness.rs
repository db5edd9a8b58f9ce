//! Failure detection from gossip: a node silent past `suspect_after` is suspect, past
//! `dead_after` dead. Pure: time is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blixard_types::gossip::NodeHealth;
use blixard_types::NodeId;

/// Defaults: reports every 500 ms (twice a second keeps an idle node cheap); a node silent
/// for 1.5 s (three reports) is suspect; every node sees a silent one dead within 3 s.
pub const INTERVAL: Duration = Duration::from_millis(500);
pub const SUSPECT_AFTER: Duration = Duration::from_millis(1500);
pub const DEAD_AFTER: Duration = Duration::from_millis(2500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
    /// Never heard from (since this node started).
    Unknown,
}

impl Liveness {
    pub fn as_str(&self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
            Liveness::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    report: NodeHealth,
}

/// What this node has heard from the others.
#[derive(Debug, Clone)]
pub struct Detector {
    suspect_after: Duration,
    dead_after: Duration,
    seen: BTreeMap<NodeId, Seen>,
}

impl Default for Detector {
    fn default() -> Self {
        Self::new(SUSPECT_AFTER, DEAD_AFTER)
    }
}

impl Detector {
    pub fn new(suspect_after: Duration, dead_after: Duration) -> Self {
        Self { suspect_after, dead_after, seen: BTreeMap::new() }
    }

    /// Records a report; returns false for stale or replayed ones. Within one incarnation
    /// (process) seq must grow. A report of another incarnation is taken once the current
    /// one has been silent for `suspect_after` (it is gone; until then its last report
    /// keeps the node alive), whatever its seq: seq is the node's wall clock, and ordering
    /// incarnations by it would ignore a node restarted after its clock stepped back (dead to
    /// everyone until its clock caught up), while a late report of an earlier process,
    /// arriving while the current one is heard, would take over.
    pub fn observe(&mut self, from: NodeId, report: NodeHealth, now: Instant) -> bool {
        if let Some(s) = self.seen.get(&from) {
            let take = if report.incarnation == s.report.incarnation {
                report.seq > s.report.seq
            } else {
                now.saturating_duration_since(s.at) >= self.suspect_after
            };
            if !take {
                return false;
            }
        }
        self.seen.insert(from, Seen { at: now, report });
        true
    }

    pub fn liveness(&self, id: &NodeId, now: Instant) -> Liveness {
        match self.seen.get(id) {
            None => Liveness::Unknown,
            Some(s) => {
                let silent = now.saturating_duration_since(s.at);
                if silent >= self.dead_after {
                    Liveness::Dead
                } else if silent >= self.suspect_after {
                    Liveness::Suspect
                } else {
                    Liveness::Alive
                }
            }
        }
    }

    /// The last report of `id`.
    pub fn report(&self, id: &NodeId) -> Option<&NodeHealth> {
        self.seen.get(id).map(|s| &s.report)
    }

    /// How long ago `id` was last heard from.
    pub fn silent_for(&self, id: &NodeId, now: Instant) -> Option<Duration> {
        self.seen.get(id).map(|s| now.saturating_duration_since(s.at))
    }

    /// Whether `me` and voter `v` are in touch both ways: `v` is alive to `me`, and `v`'s
    /// latest report says it hears `me`. (`me` itself: always.)
    pub fn in_touch(&self, me: &NodeId, v: &NodeId, now: Instant) -> bool {
        v == me || (self.liveness(v, now) == Liveness::Alive && self.report(v).is_some_and(|r| r.hears.contains(me)))
    }

    /// Which of `voters`, other than `me`, are alive to this node `me` (for its own
    /// report's `hears`).
    pub fn hears(&self, me: &NodeId, voters: &[NodeId], now: Instant) -> Vec<NodeId> {
        voters.iter().filter(|v| *v != me && self.liveness(v, now) == Liveness::Alive).copied().collect()
    }

    /// Whether `id`'s VMs must move elsewhere: dead, and silent for `grace` past that, as
    /// seen by a node that has been in touch with a majority for `in_touch_for` (see
    /// [`crate::fence::Fence::in_touch_for`]): at least as long, or the silence may be this
    /// node's own. Never for a node not heard from at all.
    pub fn lost(&self, id: &NodeId, now: Instant, grace: Duration, in_touch_for: Duration) -> bool {
        let after = self.dead_after + grace;
        in_touch_for >= after && self.silent_for(id, now).is_some_and(|s| s >= after)
    }

    /// Forgets a node (removed from the cluster).
    pub fn forget(&mut self, id: &NodeId) {
        self.seen.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_suspect_dead_and_replays() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        let a = NodeId([1; 32]);
        assert_eq!(d.liveness(&a, t0), Liveness::Unknown);
        assert!(d.observe(a, NodeHealth { seq: 5, ..Default::default() }, t0));
        assert_eq!(d.liveness(&a, t0 + Duration::from_millis(500)), Liveness::Alive);
        assert_eq!(d.liveness(&a, t0 + SUSPECT_AFTER), Liveness::Suspect);
        assert_eq!(d.liveness(&a, t0 + DEAD_AFTER), Liveness::Dead);
        let grace = Duration::from_secs(10);
        let long = Duration::from_secs(3600);
        assert!(!d.lost(&a, t0 + DEAD_AFTER + grace - Duration::from_millis(1), grace, long));
        assert!(d.lost(&a, t0 + DEAD_AFTER + grace, grace, long));
        assert!(!d.lost(&a, t0 + DEAD_AFTER + grace, grace, DEAD_AFTER), "the silence overlaps this node's own");
        assert!(!d.lost(&NodeId([2; 32]), t0 + DEAD_AFTER + grace, grace, long), "never heard of: not lost");
        // A replayed or older report does not revive it.
        let late = t0 + DEAD_AFTER;
        assert!(!d.observe(a, NodeHealth { seq: 5, ..Default::default() }, late));
        assert!(!d.observe(a, NodeHealth { seq: 4, ..Default::default() }, late));
        assert_eq!(d.liveness(&a, late), Liveness::Dead);
        assert!(d.observe(a, NodeHealth { seq: 6, ..Default::default() }, late));
        assert_eq!(d.liveness(&a, late), Liveness::Alive);
        // In touch only when heard and hearing: a report that does not list `me` is a
        // one-way link.
        let me = NodeId([9; 32]);
        assert!(d.in_touch(&me, &me, late));
        assert!(!d.in_touch(&me, &a, late), "a does not list me");
        assert!(d.observe(a, NodeHealth { seq: 7, hears: vec![me], ..Default::default() }, late));
        assert!(d.in_touch(&me, &a, late));
        assert!(!d.in_touch(&me, &a, late + DEAD_AFTER), "silent since");
        assert_eq!(d.hears(&me, &[a, me], late), vec![a]);
        d.forget(&a);
        assert_eq!(d.liveness(&a, late), Liveness::Unknown);
    }

    #[test]
    fn a_restart_after_the_clock_stepped_back_is_heard_and_late_reports_are_not() {
        let t0 = Instant::now();
        let mut d = Detector::default();
        let a = NodeId([1; 32]);
        let r = |incarnation, seq| NodeHealth { seq, incarnation, ..Default::default() };
        assert!(d.observe(a, r(1, 50_000), t0));
        // Restarted with its clock 30 s behind: a new incarnation, a lower seq. Taken once
        // the old process has been silent for SUSPECT_AFTER (well before it is dead).
        assert!(!d.observe(a, r(2, 20_000), t0 + Duration::from_millis(500)));
        let t1 = t0 + SUSPECT_AFTER;
        assert!(d.observe(a, r(2, 20_500), t1), "the restarted node is heard");
        assert!(d.liveness(&a, t1) == Liveness::Alive);
        assert!(!d.observe(a, r(2, 20_500), t1), "a replay within the incarnation");
        // A late report of the earlier process while the current one is heard.
        assert!(!d.observe(a, r(1, 40_000), t1 + Duration::from_millis(100)));
        assert!(d.observe(a, r(2, 21_000), t1 + Duration::from_millis(500)));
        assert_eq!(d.report(&a).map(|h| h.incarnation), Some(2));
        // Any restart: the new process is taken once the old one is silent.
        assert!(!d.observe(a, r(3, 90_000), t1 + Duration::from_millis(600)));
        assert!(d.observe(a, r(3, 90_500), t1 + Duration::from_millis(500) + SUSPECT_AFTER));
    }

    #[test]
    fn defaults_meet_the_three_second_budget() {
        // Dead after DEAD_AFTER of silence, at most one interval after the last report.
        assert!(DEAD_AFTER + INTERVAL <= Duration::from_secs(3));
        assert!(SUSPECT_AFTER >= INTERVAL * 3, "a few lost reports must not make a node suspect");
    }
}
