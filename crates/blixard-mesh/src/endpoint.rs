//! Binding a node's single iroh endpoint.

use std::net::SocketAddr;

use iroh::endpoint::presets;
use iroh::{Endpoint, RelayMode, RelayUrl, SecretKey};

/// How to bind the endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub secret_key: SecretKey,
    /// The UDP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// An operator-run relay; `None` disables relays (the default: no traffic leaves the
    /// addresses you give).
    pub relay: Option<RelayUrl>,
    /// ALPNs to accept (the `Router` sets them too; a client endpoint accepts none).
    pub alpns: Vec<Vec<u8>>,
    /// Where components that dial by id alone (gossip) find members' addresses.
    pub lookup: Option<iroh::address_lookup::MemoryLookup>,
}

/// Why the endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("invalid listen address {0}")]
    Address(SocketAddr),
    #[error("cannot bind {addr}: {source} (is another node using this port?)")]
    Bind { addr: SocketAddr, source: iroh::endpoint::BindError },
}

/// Binds an endpoint with no public infrastructure: no DNS discovery, no port mapping,
/// relays only when configured.
pub async fn bind(opts: EndpointOptions) -> Result<Endpoint, BindError> {
    let relay_mode = match opts.relay {
        Some(url) => RelayMode::custom([url]),
        None => RelayMode::Disabled,
    };
    let mut builder = Endpoint::builder(presets::Minimal)
        .secret_key(opts.secret_key)
        .relay_mode(relay_mode)
        .alpns(opts.alpns);
    if let Some(lookup) = opts.lookup {
        builder = builder.address_lookup(lookup);
    }
    let builder = builder
        .clear_ip_transports()
        .bind_addr(opts.listen)
        .map_err(|_| BindError::Address(opts.listen))?;
    builder.bind().await.map_err(|source| BindError::Bind { addr: opts.listen, source })
}

/// The addresses peers can dial this endpoint on (unspecified binds are skipped).
pub fn dialable_addrs(ep: &Endpoint) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = ep.bound_sockets().into_iter().filter(|a| !a.ip().is_unspecified()).collect();
    if v.is_empty() {
        v = ep.addr().ip_addrs().copied().filter(|a| !a.ip().is_unspecified()).collect();
    }
    v.sort();
    v.dedup();
    v
}
