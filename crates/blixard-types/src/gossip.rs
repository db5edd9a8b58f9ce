//! What nodes gossip about themselves. Carried inside a signed envelope
//! (`blixard_mesh::signed`); the author is the envelope's signer.

use serde::{Deserialize, Serialize};

use crate::command::Resources;
use crate::NodeId;

/// A node's periodic report about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Strictly increasing per author (its wall clock in ms, bumped if needed): older or
    /// replayed reports are dropped.
    pub seq: u64,
    /// Random per process start: a new value means the node restarted (connections to its
    /// previous process are dead).
    pub incarnation: u64,
    /// Capacity not used by VMs running there.
    pub free: Resources,
    /// VMs running on the node.
    pub vms_running: Vec<String>,
    /// Images the node holds, complete and verified.
    pub images: Vec<String>,
    /// The voters the node heard from recently (alive to it). A node runs its VMs only
    /// while a majority of voters both are heard by it and list it here, so a node that
    /// hears the others but is not heard by them (a one-way partition) stops them too.
    pub hears: Vec<NodeId>,
}

/// The versioned wire form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMessage {
    Health(NodeHealth),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = postcard::from_bytes::<GossipMessage>(&bytes);
        }
    }
}
