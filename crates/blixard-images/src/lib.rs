//! Content-addressed VM images on iroh-blobs.
//!
//! - [`ImageStore`]: an iroh-blobs `FsStore` in the node's data dir, served on [`ALPN`]
//!   by [`ImageStore::protocol_handler`], and the swarm's have-state on [`HAVE_ALPN`] by
//!   [`ImageStore::have_handler`]; images pinned by tags; [`ImageStore::gc`].
//! - [`manifest`]: the versioned postcard manifest naming every part by hash.
//! - Push: [`ImageStore::add_closure`] (Nix closure, one NAR blob per store path),
//!   [`ImageStore::add_bundle`] (kernel, initrd, FastCDC-chunked disk, cmdline).
//! - Pull: [`ImageStore::fetch`] (swarm download from many providers) then
//!   [`ImageStore::materialise`] (verified Nix import, store-path layout, or bundle files).
//!
//! See `docs/images.md` for the design and figures.

pub mod error;
mod fetch;
pub mod have;
pub mod manifest;
mod materialise;
pub mod nix;
mod store;

pub use error::{AddError, FetchError, GcError, InfoError, MaterialiseError, OpenError};
pub use fetch::{FetchOptions, FetchStats, ProviderStats};
pub use have::HAVE_ALPN;
pub use iroh_blobs::Hash;
pub use manifest::Manifest;
pub use materialise::Materialised;
pub use nix::NixOptions;
pub use store::{BundleSpec, ChunkParams, GcStats, ImageRef, ImageStore, ImageStoreOptions, LocalImage, Progress, ALPN};
