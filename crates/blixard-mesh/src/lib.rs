//! The mesh: who a node is, how it talks, and who it talks to.
//!
//! Layout:
//! - [`identity`]: the persisted Ed25519 key (mode 0600) that *is* a node's or CLI's identity.
//! - [`alpn`]: one ALPN per protocol.
//! - [`endpoint`]: binding the single iroh endpoint of a node (no relay unless configured).
//! - [`rpc`]: framed request/response over QUIC bi-streams, and a connection pool that
//!   dials outside locks and re-dials on error.
//! - [`auth`]: the accept-side gate: a protocol handler wrapper that refuses keys the
//!   cluster does not authorise, with an explicit close code.
//!
//! **Invariant:** no protocol handler sees a connection before [`auth::Gate`] accepted its
//! remote key; the key comes from the QUIC/TLS handshake, never from a message.

pub mod alpn;
pub use iroh::address_lookup::MemoryLookup;
pub mod auth;
pub mod endpoint;
pub mod identity;
pub mod rpc;
pub mod signed;

pub use iroh::{Endpoint, EndpointAddr, EndpointId, SecretKey};

use blixard_types::NodeId;

/// The Blixard node id of an iroh endpoint id (both are the Ed25519 public key).
pub fn node_id(id: &EndpointId) -> NodeId {
    NodeId(*id.as_bytes())
}

/// The iroh endpoint id of a node id, if the bytes are a valid Ed25519 point.
pub fn endpoint_id(id: &NodeId) -> Option<EndpointId> {
    EndpointId::from_bytes(&id.0).ok()
}

/// The dialable address of a node.
pub fn endpoint_addr(id: &NodeId, addrs: &[std::net::SocketAddr]) -> Option<EndpointAddr> {
    let mut a = EndpointAddr::new(endpoint_id(id)?);
    for s in addrs {
        a = a.with_ip_addr(*s);
    }
    Some(a)
}
