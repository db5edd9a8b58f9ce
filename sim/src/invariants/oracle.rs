//! The client oracle: every write a client saw acknowledged is committed where the
//! acknowledgement said, and present in every replica's state once the cluster has healed.
//!
//! Clients write `SetLabels` with a label key unique to each write, so presence is exact.

use std::collections::BTreeMap;

use super::log_matching::{CommittedLog, EntryDigest};

/// One acknowledged write: its label key, and the entry the leader said it committed.
#[derive(Clone, Debug)]
pub struct Ack {
    pub key: String,
    pub index: u64,
    pub digest: EntryDigest,
}

#[derive(Debug, Default)]
pub struct Oracle {
    acked: BTreeMap<String, Ack>,
}

impl Oracle {
    pub fn on_ack(&mut self, ack: Ack) {
        self.acked.insert(ack.key.clone(), ack);
    }

    pub fn acked(&self) -> usize {
        self.acked.len()
    }

    /// Each acknowledged entry must be the committed entry at its index.
    pub fn check_committed(&self, log: &CommittedLog) -> Vec<String> {
        let mut out = Vec::new();
        for ack in self.acked.values() {
            match log.get(ack.index) {
                Some(d) if d == ack.digest => {}
                Some(_) => out.push(format!(
                    "acknowledged write {} at index {} was replaced by another entry",
                    ack.key, ack.index
                )),
                None => out.push(format!(
                    "acknowledged write {} at index {} was never applied",
                    ack.key, ack.index
                )),
            }
        }
        out
    }

    /// The acknowledged label keys missing from a replica's labels.
    pub fn missing<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.acked
            .keys()
            .filter(|k| !labels.contains_key(*k))
            .map(|k| k.as_str())
    }
}
