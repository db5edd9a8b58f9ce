//! One error enum per operation. Messages say what is wrong and what to do.

use std::io;
use std::path::PathBuf;

use iroh_blobs::Hash;

use crate::manifest::ManifestDecodeError;
use crate::nix::{NarError, NixCommandError};

/// True when an I/O error means the disk is full.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) || is_disk_full_msg(&e.to_string())
}

pub(crate) fn is_disk_full_msg(s: &str) -> bool {
    s.contains("No space left on device") || s.contains("StorageFull") || s.contains("storage full")
}

/// Why the image store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create image directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error("cannot open the blob store in {dir}: {detail} (is another process using it?)")]
    Store { dir: PathBuf, detail: String },
}

/// Why an image could not be added (pushed).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("nix-store not found: install nix (apt-get install nix-bin), or set the Nix bin dir")]
    NixNotFound,
    #[error("{0} is not a Nix store path or a link to one (e.g. the `result` link of nix-build)")]
    NotAStorePath(PathBuf),
    #[error("the closure of {path} cannot be read: {source}; build or realise it first (nix-store --realise {path})")]
    Closure { path: String, source: NixCommandError },
    #[error("cannot dump {path} from the Nix store: {detail}")]
    Dump { path: String, detail: String },
    #[error(
        "store path {path} is corrupt: its NAR hash is sha256:{got}, the Nix database says sha256:{expected}; \
         repair it (nix-store --repair-path {path}) and push again"
    )]
    NarHashMismatch { path: String, expected: String, got: String },
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("disk full while adding {what}: free space in {dir}")]
    DiskFull { what: String, dir: PathBuf },
    #[error("blob store error while adding {what}: {detail}")]
    Store { what: String, detail: String },
}

/// Why an image could not be fetched. Cloneable: concurrent fetches of one image share it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("no providers given for image {0}: name at least one peer that holds it")]
    NoProviders(Hash),
    #[error(
        "image {hash}: {missing} of {total} parts could not be fetched from any provider ({reasons}); \
         retry with peers that hold the image"
    )]
    Unavailable { hash: Hash, missing: usize, total: usize, reasons: String },
    #[error("image {hash} is not a valid image: {reason} (tampered, or not an image hash)")]
    BadImage { hash: Hash, reason: String },
    #[error("image {hash}: manifest refused: {source}")]
    Manifest { hash: Hash, source: ManifestDecodeError },
    #[error("disk full while fetching {hash}: free space in {dir}; the partial image was removed")]
    DiskFull { hash: Hash, dir: PathBuf },
    #[error("blob store error while fetching {hash}: {detail}")]
    Store { hash: Hash, detail: String },
    #[error("the image store is shutting down")]
    ShuttingDown,
}

/// Why an image could not be materialised.
#[derive(Debug, thiserror::Error)]
pub enum MaterialiseError {
    #[error("image {0} is not complete in the local store: fetch it first")]
    NotFetched(Hash),
    #[error("image {hash}: manifest refused: {source}")]
    Manifest { hash: Hash, source: ManifestDecodeError },
    #[error(
        "NAR of {path} does not match the manifest (sha256 {got}, manifest says {expected}, \
         {got_size} vs {expected_size} bytes): the publisher's manifest is wrong or tampered; nothing was imported for it"
    )]
    NarHashMismatch { path: String, expected: String, got: String, expected_size: u64, got_size: u64 },
    #[error("importing into the Nix store failed: {0}")]
    Nix(#[from] NixCommandError),
    #[error("after import, the Nix store reports {path} with a different NAR hash than the manifest")]
    ImportMismatch { path: String },
    #[error("unpacking the NAR of {path}: {source}")]
    Nar { path: String, source: NarError },
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("disk full while materialising {hash}: free space in {dir}")]
    DiskFull { hash: Hash, dir: PathBuf },
    #[error("blob store error while materialising {hash}: {detail}")]
    Store { hash: Hash, detail: String },
}

/// Why garbage collection or removal failed.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("blob store error during gc: {0}")]
    Store(String),
    #[error("removing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the blob store's collector did not run within {0:?}: the store may have hit an error, see the log")]
    Stalled(std::time::Duration),
}

/// Why local image information could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("blob store error: {0}")]
    Store(String),
    #[error("image {hash}: manifest refused: {source}")]
    Manifest { hash: Hash, source: ManifestDecodeError },
    #[error("{hash} is not a valid image: {reason}")]
    BadImage { hash: Hash, reason: String },
}
