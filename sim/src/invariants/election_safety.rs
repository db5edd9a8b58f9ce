//! Election safety: at most one leader per term, and no vote ever goes backwards.
//!
//! Blixard builds openraft with `single-term-leader` (standard Raft): a vote is
//! `(term, voted_for)`, and a node that voted for one candidate in a term cannot vote for
//! another in it (the two votes are not comparable). Checked:
//! - a node's vote never goes backwards or sideways, across restarts included (Raft's
//!   durable `currentTerm`/`votedFor`): this is what a store that forgets the vote breaks;
//! - at most one node leads each term.

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
    /// `node` shows `vote` (from its metrics). The default vote is what a restarted node's
    /// metrics show before it has loaded its store (`RaftMetrics::new_initial`); it is
    /// never a vote the node cast, so it is not compared.
    pub fn observe_vote(&mut self, node: u64, vote: Vote<u64>) -> Option<String> {
        if vote == Vote::default() {
            return None;
        }
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

    /// `node` is (per its own metrics) the leader of `term`: a violation if another node
    /// led this term too.
    pub fn observe_leader(&mut self, node: u64, term: u64) -> Option<String> {
        let set = self.leaders.entry(term).or_default();
        set.insert(node);
        (set.len() > 1).then(|| format!("two leaders in term {term}: {set:?}"))
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
        assert!(e.observe_vote(1, Vote::new_committed(3, 0)).is_none());
        assert!(e.observe_vote(1, Vote::new(4, 2)).is_none());
        assert!(e.observe_vote(1, Vote::new(4, 1)).is_some(), "a second vote in term 4");
        assert!(e.observe_vote(1, Vote::new(3, 1)).is_some());
        assert!(e.observe_vote(1, Vote::default()).is_none(), "a restarted node's initial metrics");
        assert!(e.observe_vote(1, Vote::new(2, 2)).is_some());
    }

    #[test]
    fn two_leaders_in_a_term_are_a_violation() {
        let mut e = ElectionSafety::default();
        assert!(e.observe_leader(1, 3).is_none());
        assert!(e.observe_leader(1, 3).is_none());
        assert!(e.observe_leader(2, 4).is_none());
        assert!(e.observe_leader(2, 3).is_some());
    }
}
