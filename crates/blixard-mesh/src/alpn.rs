//! One ALPN per protocol. The version in each name changes when its wire format does.

/// Raft RPCs between members (append entries, vote, snapshot).
pub const RAFT: &[u8] = b"blixard/raft/1";
/// The client API (CLI and members forwarding to the leader).
pub const CLIENT: &[u8] = b"blixard/client/1";
/// Joining with a ticket: the only protocol open to unknown keys.
pub const JOIN: &[u8] = b"blixard/join/1";

/// Health and capacity gossip (iroh-gossip's own ALPN, served to members only).
pub const GOSSIP: &[u8] = iroh_gossip::ALPN;

/// Every protocol a node serves.
pub const ALL: &[&[u8]] = &[RAFT, CLIENT, JOIN, GOSSIP];

#[cfg(test)]
mod tests {
    #[test]
    fn alpns_are_unique() {
        let mut v = super::ALL.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), super::ALL.len());
    }
}
