#![allow(dead_code, clippy::unwrap_used)]
//! Real nodes on loopback: an iroh endpoint (no relay), a FsStore in a temp dir, a router
//! serving the blobs ALPN.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blixard_images::{ImageStore, ImageStoreOptions, ALPN, HAVE_ALPN};
use iroh::endpoint::presets;
use iroh::protocol::{ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, RelayMode, SecretKey};

pub struct Node {
    pub images: ImageStore,
    pub router: Router,
    pub dir: tempfile::TempDir,
}

pub async fn endpoint(alpns: Vec<Vec<u8>>) -> Endpoint {
    Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::generate())
        .relay_mode(RelayMode::Disabled)
        .alpns(alpns)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0".parse::<SocketAddr>().unwrap())
        .unwrap()
        .bind()
        .await
        .unwrap()
}

pub fn addr(ep: &Endpoint) -> EndpointAddr {
    let mut a = EndpointAddr::new(ep.id());
    for s in ep.bound_sockets() {
        a = a.with_ip_addr(s);
    }
    a
}

pub async fn node_with(f: impl FnOnce(&mut ImageStoreOptions)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let ep = endpoint(vec![ALPN.to_vec(), HAVE_ALPN.to_vec()]).await;
    let mut opts = ImageStoreOptions::new(dir.path().join("images"));
    f(&mut opts);
    let images = ImageStore::open(ep.clone(), opts).await.unwrap();
    let router = Router::builder(ep).accept(ALPN, images.protocol_handler()).accept(HAVE_ALPN, images.have_handler()).spawn();
    Node { images, router, dir }
}

pub async fn node() -> Node {
    node_with(|_| {}).await
}

impl Node {
    pub fn addr(&self) -> EndpointAddr {
        addr(self.router.endpoint())
    }
    pub async fn stop(self) {
        let _ = self.router.shutdown().await;
        self.images.shutdown().await;
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no rng state.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

pub fn noop(_: blixard_images::Progress) {}

/// A provider that forwards every request to a real provider and flips one byte of each
/// response longer than 4 KiB: a peer serving corrupt data. With `stall`, it forwards
/// nothing back and keeps the stream open: a peer that has stopped sending.
#[derive(Debug, Clone)]
pub struct CorruptingProxy {
    pub ep: Endpoint,
    pub upstream: EndpointAddr,
    pub stall: bool,
}

impl ProtocolHandler for CorruptingProxy {
    async fn accept(&self, conn: iroh::endpoint::Connection) -> Result<(), iroh::protocol::AcceptError> {
        let up = match self.ep.connect(self.upstream.clone(), ALPN).await {
            Ok(c) => c,
            Err(_) => return Ok(()),
        };
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let up = up.clone();
            let stall = self.stall;
            tokio::spawn(async move {
                let Ok(req) = recv.read_to_end(64 * 1024).await else { return };
                if stall {
                    // Hold the stream open, unanswered, until the fetcher gives up on it.
                    let _ = send.stopped().await;
                    return;
                }
                let Ok((mut usend, mut urecv)) = up.open_bi().await else { return };
                if usend.write_all(&req).await.is_err() || usend.finish().is_err() {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                let mut offset = 0usize;
                while let Ok(Some(n)) = urecv.read(&mut buf).await {
                    let chunk = &mut buf[..n];
                    if offset <= 4000 && offset + n > 4000 {
                        chunk[4000 - offset] ^= 0x55;
                    }
                    offset += n;
                    if send.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = send.finish();
            });
        }
        Ok(())
    }
}

pub fn require_real() -> bool {
    std::env::var("BLIXARD_REQUIRE_REAL").is_ok_and(|v| v == "1")
}
