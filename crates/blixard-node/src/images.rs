//! The node's image store: images pushed from a CLI or pulled from peers, what this node
//! holds (reported in gossip, so others know whom to fetch from), and gc against the
//! catalogue.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::RwLock;

use blixard_images::manifest::Image;
use blixard_images::{FetchError, FetchStats, Hash, ImageStore, ImageStoreOptions, Materialised, NixOptions};
use blixard_types::image::ImageKind;
use blixard_types::NodeId;
use iroh::{Endpoint, EndpointAddr};
use tracing::warn;

/// This node's images.
#[derive(Debug)]
pub struct NodeImages {
    pub store: ImageStore,
    /// Full hashes of the images held complete here (cached for gossip).
    held: RwLock<BTreeSet<String>>,
}

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageUseError {
    #[error("{0:?} is not an image hash")]
    BadHash(String),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Materialise(#[from] blixard_images::MaterialiseError),
    #[error(transparent)]
    Info(#[from] blixard_images::InfoError),
}

impl NodeImages {
    /// Opens `DATA_DIR/images` on the node's endpoint.
    pub async fn open(dir: &Path, endpoint: Endpoint) -> Result<Self, blixard_images::OpenError> {
        let mut opts = ImageStoreOptions::new(dir);
        opts.nix = nix_options();
        // The collector only runs when `gc` asks; polling for that request less often
        // keeps an idle node idle.
        opts.gc_poll = std::time::Duration::from_secs(2);
        let store = ImageStore::open(endpoint, opts).await?;
        let me = Self { store, held: RwLock::new(BTreeSet::new()) };
        me.refresh_held().await;
        Ok(me)
    }

    /// Full hashes of the complete images here.
    pub fn held(&self) -> BTreeSet<String> {
        self.held.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn holds(&self, hash: &str) -> bool {
        self.held.read().unwrap_or_else(|p| p.into_inner()).contains(hash)
    }

    /// Re-reads which images are complete.
    pub async fn refresh_held(&self) {
        match self.store.list().await {
            Ok(list) => {
                let set = list.into_iter().filter(|i| i.complete).map(|i| i.hash.to_hex().to_string()).collect();
                *self.held.write().unwrap_or_else(|p| p.into_inner()) = set;
            }
            Err(e) => warn!(error = %e, "cannot list images"),
        }
    }

    /// Fetches an image from `providers` (verified, pinned).
    pub async fn fetch(&self, hash: &str, providers: Vec<EndpointAddr>) -> Result<FetchStats, ImageUseError> {
        let h = parse_hash(hash)?;
        let r = self.store.fetch(h, providers, &|_| {}).await;
        self.refresh_held().await;
        Ok(r?)
    }

    /// The kind and size (bytes of its parts) of a fetched image, read from its manifest.
    pub async fn describe(&self, hash: &str) -> Result<(ImageKind, u64), ImageUseError> {
        let m = self.store.manifest(parse_hash(hash)?).await?;
        let kind = match m.image() {
            Image::NixClosure(_) => ImageKind::NixClosure,
            Image::Bundle(_) => ImageKind::Bundle,
        };
        Ok((kind, m.parts_size()))
    }

    /// Materialises a fetched image (idempotent).
    pub async fn materialise(&self, hash: &str) -> Result<Materialised, ImageUseError> {
        Ok(self.store.materialise(parse_hash(hash)?, &|_| {}).await?)
    }

    /// Drops every local image the catalogue does not list. Returns (images removed,
    /// blobs before, blobs after).
    pub async fn gc(&self, catalogue: &BTreeSet<String>) -> Result<blixard_images::GcStats, blixard_images::GcError> {
        let keep: Vec<Hash> = catalogue.iter().filter_map(|h| Hash::from_str(h).ok()).collect();
        let r = self.store.gc(&keep).await;
        self.refresh_held().await;
        r
    }
}

pub(crate) fn parse_hash(s: &str) -> Result<Hash, ImageUseError> {
    if !blixard_types::image::is_full_hash(s) {
        return Err(ImageUseError::BadHash(s.chars().take(80).collect()));
    }
    Hash::from_str(s).map_err(|_| ImageUseError::BadHash(s.to_string()))
}

/// Nix as the node runs it: as root without build users, with no substituters (images
/// come from the mesh, never from the internet).
fn nix_options() -> NixOptions {
    let mut o = NixOptions::default();
    if std::env::var_os("NIX_CONFIG").is_none() {
        o.env.push(("NIX_CONFIG".into(), "build-users-group =\nsubstituters =\n".into()));
    }
    o
}

/// The dialable addresses of members for fetching `hash`: those whose gossip says they hold
/// it first, then every other live member (a peer still fetching serves finished parts).
pub(crate) fn providers(ctx: &crate::node::NodeCtx, hash: &str) -> Vec<EndpointAddr> {
    let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
    let det = ctx.liveness.lock().unwrap_or_else(|p| p.into_inner());
    let mut holders: Vec<(bool, NodeId)> = st
        .state
        .nodes
        .keys()
        .filter(|id| **id != ctx.id && ctx.is_alive_locked(&det, id))
        .map(|id| (det.report(id).is_some_and(|r| r.images.iter().any(|i| i == hash)), *id))
        .collect();
    holders.sort_by_key(|(holds, _)| !holds);
    holders
        .into_iter()
        .filter_map(|(_, id)| blixard_mesh::endpoint_addr(&id, &st.state.nodes.get(&id)?.addrs))
        .collect()
}
