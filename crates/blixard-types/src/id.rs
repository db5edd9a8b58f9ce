//! Identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A node's (or a CLI user's) identity: the 32 bytes of its Ed25519 public key, which is
/// also its iroh endpoint id. Nothing else names a peer: a name written inside a message
/// is never trusted.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The first 5 bytes in hex: enough to tell nodes apart in logs.
    pub fn short(&self) -> String {
        hex(&self.0[..5])
    }

    /// True if `prefix` (hex) is a prefix of this id's hex form.
    pub fn matches_prefix(&self, prefix: &str) -> bool {
        !prefix.is_empty() && self.to_string().starts_with(&prefix.to_ascii_lowercase())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {input:?}: expected 64 hex characters")]
pub struct NodeIdParseError {
    input: String,
}

impl FromStr for NodeId {
    type Err = NodeIdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NodeIdParseError { input: s.chars().take(80).collect() };
        let bytes = unhex(s).filter(|b| b.len() == 32).ok_or_else(err)?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(NodeId(out))
    }
}

/// A cluster's identity, chosen at random by `node run --init`. Tickets name it so that a
/// ticket of one cluster can never be used against another.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// Ids are hex strings in human-readable formats (JSON) and raw bytes in postcard.
macro_rules! serde_as_hex {
    ($t:ident, $n:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex(&self.0))
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    let v = unhex(&s).ok_or_else(|| serde::de::Error::custom("expected hex"))?;
                    let arr: [u8; $n] = v.try_into().map_err(|_| serde::de::Error::custom("wrong length"))?;
                    Ok($t(arr))
                } else {
                    Ok($t(<[u8; $n]>::deserialize(d)?))
                }
            }
        }
    };
}
serde_as_hex!(NodeId, 32);
serde_as_hex!(ClusterId, 16);

/// Bytes of a hex string.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2).map(|p| Some(hex_val(p[0])? << 4 | hex_val(p[1])?)).collect()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_hex() {
        let id = NodeId([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<NodeId>(), Ok(id));
        assert!(id.matches_prefix("abab"));
        assert!(!id.matches_prefix(""));
        assert!("xyz".parse::<NodeId>().is_err());
        assert!(format!("{}g", &s[..63]).parse::<NodeId>().is_err());
    }
}
