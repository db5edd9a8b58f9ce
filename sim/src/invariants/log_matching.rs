//! Committed entries are never lost or changed.
//!
//! An entry a state machine applied is committed. The first node to apply index `i` fixes
//! what index `i` is (its log id and a hash of the whole entry); every later application of
//! `i`, on any node (including re-application after a restart), and every entry at `i` found
//! in a node's stored log at or below what it applied, must be the same.

use std::collections::BTreeMap;

/// What a committed entry is: its term (one leader per term) and a BLAKE3 hash of the
/// encoded entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryDigest {
    pub term: u64,
    pub hash: [u8; 32],
}

#[derive(Debug, Default)]
pub struct CommittedLog {
    entries: BTreeMap<u64, (u64, EntryDigest)>,
}

impl CommittedLog {
    /// `node` applied the entry `digest` at `index`.
    pub fn on_applied(&mut self, node: u64, index: u64, digest: EntryDigest) -> Option<String> {
        let (first_node, first) = *self.entries.entry(index).or_insert((node, digest));
        (first != digest).then(|| {
            format!(
                "committed entry changed: index {index} applied by n{first_node} as term {} but by n{node} as term {} (or with other contents)",
                first.term, digest.term
            )
        })
    }

    /// `node`'s stored log holds `entries` (index, digest), ascending, all at or below the
    /// index it has applied: each must be the committed entry, with no holes.
    pub fn check_log(&self, node: u64, entries: &[(u64, EntryDigest)]) -> Vec<String> {
        let mut out = Vec::new();
        for pair in entries.windows(2) {
            if pair[1].0 != pair[0].0 + 1 {
                out.push(format!(
                    "log hole on n{node}: index {} follows {}",
                    pair[1].0, pair[0].0
                ));
            }
        }
        for (index, digest) in entries {
            if let Some((by, committed)) = self.entries.get(index) {
                if committed != digest {
                    out.push(format!(
                        "log matching: n{node} stores index {index} as term {} but n{by} applied term {}",
                        digest.term, committed.term
                    ));
                }
            }
        }
        out
    }

    pub fn get(&self, index: u64) -> Option<EntryDigest> {
        self.entries.get(&index).map(|e| e.1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(term: u64, h: u8) -> EntryDigest {
        EntryDigest { term, hash: [h; 32] }
    }

    #[test]
    fn a_changed_entry_or_a_hole_is_a_violation() {
        let mut c = CommittedLog::default();
        assert!(c.on_applied(1, 1, d(1, 1)).is_none());
        assert!(c.on_applied(2, 1, d(1, 1)).is_none());
        assert!(c.on_applied(2, 1, d(2, 9)).is_some());
        assert!(c.check_log(3, &[(1, d(1, 1))]).is_empty());
        assert_eq!(c.check_log(3, &[(1, d(1, 2))]).len(), 1);
        assert_eq!(c.check_log(3, &[(1, d(1, 1)), (3, d(1, 1))]).len(), 1);
    }
}
