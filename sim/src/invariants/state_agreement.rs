//! Replicas that applied the same index have the same state (a BLAKE3 hash of the postcard
//! encoding of `ClusterState`, which is deterministic: it holds only ordered maps).

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct StateAgreement {
    at: BTreeMap<u64, (u64, [u8; 32])>,
}

impl StateAgreement {
    /// `node`'s state after applying `index` hashes to `hash`.
    pub fn on_state(&mut self, node: u64, index: u64, hash: [u8; 32]) -> Option<String> {
        let (first_node, first) = *self.at.entry(index).or_insert((node, hash));
        (first != hash).then(|| {
            format!(
                "state divergence: n{first_node} and n{node} differ after applying index {index}"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_states_at_one_index_are_a_violation() {
        let mut s = StateAgreement::default();
        assert!(s.on_state(1, 5, [1; 32]).is_none());
        assert!(s.on_state(2, 5, [1; 32]).is_none());
        assert!(s.on_state(3, 5, [2; 32]).is_some());
    }
}
