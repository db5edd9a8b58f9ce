//! Election safety: at most one leader per term, ever.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct ElectionSafety {
    /// The first node seen leading each term.
    leaders: BTreeMap<u64, u64>,
}

impl ElectionSafety {
    /// `node` is (per its own metrics) the leader of `term`.
    pub fn observe_leader(&mut self, node: u64, term: u64) -> Option<String> {
        let first = *self.leaders.entry(term).or_insert(node);
        (first != node)
            .then(|| format!("election safety: two leaders in term {term}: n{first} and n{node}"))
    }

    pub fn terms_with_leader(&self) -> usize {
        self.leaders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_leader_in_a_term_is_a_violation() {
        let mut e = ElectionSafety::default();
        assert!(e.observe_leader(1, 3).is_none());
        assert!(e.observe_leader(1, 3).is_none());
        assert!(e.observe_leader(2, 4).is_none());
        assert!(e.observe_leader(2, 3).is_some());
    }
}
