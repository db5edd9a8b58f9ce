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

    /// Records a report; returns false for stale or replayed ones (seq not newer).
    pub fn observe(&mut self, from: NodeId, report: NodeHealth, now: Instant) -> bool {
        if self.seen.get(&from).is_some_and(|s| report.seq <= s.report.seq) {
            return false;
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
        // A replayed or older report does not revive it.
        let late = t0 + DEAD_AFTER;
        assert!(!d.observe(a, NodeHealth { seq: 5, ..Default::default() }, late));
        assert!(!d.observe(a, NodeHealth { seq: 4, ..Default::default() }, late));
        assert_eq!(d.liveness(&a, late), Liveness::Dead);
        assert!(d.observe(a, NodeHealth { seq: 6, ..Default::default() }, late));
        assert_eq!(d.liveness(&a, late), Liveness::Alive);
        d.forget(&a);
        assert_eq!(d.liveness(&a, late), Liveness::Unknown);
    }

    #[test]
    fn defaults_meet_the_three_second_budget() {
        // Dead after DEAD_AFTER of silence, at most one interval after the last report.
        assert!(DEAD_AFTER + INTERVAL <= Duration::from_secs(3));
        assert!(SUSPECT_AFTER >= INTERVAL * 3, "a few lost reports must not make a node suspect");
    }
}
