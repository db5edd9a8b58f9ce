//! Tickets: how an operator hands a new node (or a CLI user) the right to join a cluster.
//!
//! A ticket carries the cluster id, the addresses of members at the time it was made, the
//! role it grants, an expiry and a random 256-bit secret. Raft state keeps only the BLAKE3
//! hash of the secret, together with the role and expiry, so the ticket's own copy of role
//! and expiry is a hint for the holder: the cluster checks the ones it recorded.
//!
//! String form: `blixard` + base32 (lowercase, no padding) of the postcard encoding of a
//! versioned wire enum, followed by a 4-byte BLAKE3 checksum, so that a truncated or
//! mistyped ticket is reported as such instead of as an unknown secret.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::id::{hex, ClusterId, NodeId};

const PREFIX: &str = "blixard";
const CHECKSUM_LEN: usize = 4;
/// Longest ticket string accepted; a ticket lists at most a few dozen addresses.
pub const MAX_TICKET_LEN: usize = 8 * 1024;

/// What a ticket lets its holder become.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Joins as a learner, then is promoted to a voting member.
    Voter,
    /// Joins and stays a non-voting learner.
    Learner,
    /// Authorises a CLI key to use the client API; never a member.
    Client,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "voter" => Ok(Role::Voter),
            "learner" => Ok(Role::Learner),
            "client" => Ok(Role::Client),
            other => Err(format!("unknown role {other:?}: expected voter, learner or client")),
        }
    }
}

/// A member's id and the socket addresses it listens on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub id: NodeId,
    pub addrs: Vec<SocketAddr>,
}

/// A join or client ticket. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub cluster_id: ClusterId,
    pub role: Role,
    /// Unix time in milliseconds after which the ticket is refused.
    pub expires_at_ms: u64,
    pub secret: [u8; 32],
    pub peers: Vec<PeerAddr>,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id())
            .field("cluster_id", &self.cluster_id)
            .field("role", &self.role)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// The versioned wire form: a new variant can be added without breaking old tickets.
#[derive(Serialize, Deserialize)]
enum WireFormat {
    V0(Ticket),
}

/// Why a string is not a usable ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketDecodeError {
    #[error("not a Blixard ticket: it must start with \"{PREFIX}\"")]
    Prefix,
    #[error("ticket is too long ({0} characters; at most {MAX_TICKET_LEN})")]
    TooLong(usize),
    #[error("ticket is not valid base32 (was it truncated or mistyped?)")]
    Encoding,
    #[error("ticket checksum does not match: it was truncated, mistyped or tampered with")]
    Checksum,
    #[error("ticket content is malformed: {0}")]
    Malformed(String),
}

impl Ticket {
    /// The BLAKE3 hash of the secret: the only form of it the cluster stores.
    pub fn secret_hash(&self) -> [u8; 32] {
        secret_hash(&self.secret)
    }

    /// A short public name for the ticket (used to list and revoke it).
    pub fn id(&self) -> String {
        ticket_id(&self.secret_hash())
    }

    pub fn encode(&self) -> String {
        // Serialising a plain struct into a Vec cannot fail.
        let mut bytes = postcard::to_stdvec(&WireFormat::V0(self.clone())).unwrap_or_default();
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
        format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase())
    }

    pub fn decode(s: &str) -> Result<Self, TicketDecodeError> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(TicketDecodeError::TooLong(s.len()));
        }
        let body = s.strip_prefix(PREFIX).ok_or(TicketDecodeError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TicketDecodeError::Encoding)?;
        if bytes.len() < CHECKSUM_LEN {
            return Err(TicketDecodeError::Checksum);
        }
        let (payload, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if blake3::hash(payload).as_bytes()[..CHECKSUM_LEN] != *sum {
            return Err(TicketDecodeError::Checksum);
        }
        let WireFormat::V0(ticket) =
            postcard::from_bytes(payload).map_err(|e| TicketDecodeError::Malformed(e.to_string()))?;
        Ok(ticket)
    }
}

/// BLAKE3 of a ticket secret.
pub fn secret_hash(secret: &[u8; 32]) -> [u8; 32] {
    *blake3::hash(secret).as_bytes()
}

/// The public short name of a ticket, from its secret hash.
pub fn ticket_id(hash: &[u8; 32]) -> String {
    hex(&hash[..8])
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for Ticket {
    type Err = TicketDecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Ticket {
        Ticket {
            cluster_id: ClusterId([7; 16]),
            role: Role::Voter,
            expires_at_ms: 1_800_000_000_000,
            secret: [9; 32],
            peers: vec![PeerAddr { id: NodeId([1; 32]), addrs: vec!["127.0.0.1:4000".parse().expect("addr")] }],
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with("blixard"));
        assert_eq!(Ticket::decode(&s), Ok(t));
    }

    #[test]
    fn debug_hides_secret() {
        let dbg = format!("{:?}", sample());
        assert!(!dbg.contains("secret"), "{dbg}");
        assert!(!dbg.contains("9, 9, 9"), "{dbg}");
    }

    #[test]
    fn tampering_is_detected() {
        let s = sample().encode();
        // Flip every character position in turn: each must fail to decode or decode to a
        // different ticket only if the checksum still matches (it must not).
        for i in PREFIX.len()..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let t = String::from_utf8(b).expect("ascii");
            if t == s {
                continue;
            }
            assert!(Ticket::decode(&t).is_err(), "tampered ticket at {i} accepted");
        }
        assert_eq!(Ticket::decode("nope"), Err(TicketDecodeError::Prefix));
        assert_eq!(Ticket::decode("blixard"), Err(TicketDecodeError::Checksum));
        assert!(Ticket::decode(&s[..s.len() - 3]).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in "\\PC{0,300}") {
            let _ = Ticket::decode(&s);
        }

        #[test]
        fn decode_never_panics_on_prefixed_base32(s in "blixard[a-z2-7]{0,400}") {
            let _ = Ticket::decode(&s);
        }

        #[test]
        fn decode_never_panics_on_checksummed_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = bytes.clone();
            b.extend_from_slice(&blake3::hash(&bytes).as_bytes()[..CHECKSUM_LEN]);
            let s = format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase());
            let _ = Ticket::decode(&s);
        }
    }
}
