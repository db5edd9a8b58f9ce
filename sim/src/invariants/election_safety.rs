//! Election safety, as openraft 0.9 defines it.
//!
//! Blixard builds openraft without its `single-term-leader` feature, so a leader is
//! identified by `LeaderId { term, node_id }`, which is *totally ordered*: a voter may grant
//! `(t, n3)` after `(t, n0)`, and two leaders in one term are legal (their entries carry
//! different leader ids, so log matching still holds). The checked properties are therefore:
//! - a node's vote never goes backwards, across restarts included (Raft's durable
//!   `currentTerm`/`votedFor`): this is what a store that forgets the vote breaks;
//! - at most one leader per leader id (`term`, `node`).
//!
//! Several leaders in one term are counted (`terms_with_several_leaders`), not failed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use openraft::Vote;

#[derive(Debug, Default)]
pub struct ElectionSafety {
    /// The nodes seen leading each term.
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// The highest vote each node has shown.
    votes: BTreeMap<u64, Vote<u64>>,
}

impl ElectionSafety {
    /// `node` shows `vote` (from its metrics).
    pub fn observe_vote(&mut self, node: u64, vote: Vote<u64>) -> Option<String> {
        match self.votes.get(&node) {
            Some(prev)
                if !matches!(
                    vote.partial_cmp(prev),
                    Some(Ordering::Greater | Ordering::Equal)
                ) =>
            {
                Some(format!(
                    "vote went backwards on n{node}: from {prev} to {vote}"
                ))
            }
            _ => {
                self.votes.insert(node, vote);
                None
            }
        }
    }

    /// `node` is (per its own metrics) the leader of `term`. Returns true if another node
    /// led this term too (legal with openraft's default leader ids).
    pub fn observe_leader(&mut self, node: u64, term: u64) -> bool {
        let set = self.leaders.entry(term).or_default();
        set.insert(node);
        set.len() == 2
    }

    pub fn terms_with_leader(&self) -> usize {
        self.leaders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vote_going_backwards_is_a_violation() {
        let mut e = ElectionSafety::default();
        assert!(e.observe_vote(1, Vote::new(3, 0)).is_none());
        assert!(
            e.observe_vote(1, Vote::new(3, 2)).is_none(),
            "(3, n2) > (3, n0) in openraft 0.9"
        );
        assert!(e.observe_vote(1, Vote::new_committed(3, 2)).is_none());
        assert!(e.observe_vote(1, Vote::new(3, 1)).is_some());
        assert!(e.observe_vote(1, Vote::default()).is_some());
    }

    #[test]
    fn several_leaders_in_a_term_are_counted() {
        let mut e = ElectionSafety::default();
        assert!(!e.observe_leader(1, 3));
        assert!(!e.observe_leader(1, 3));
        assert!(e.observe_leader(2, 3));
        assert!(!e.observe_leader(0, 3));
    }
}
