//! Image manifests: a postcard-encoded, versioned description of an image that names every
//! part by its BLAKE3 hash.
//!
//! An image is identified by the hash of a *root hash sequence* whose first child is the
//! manifest blob and whose further children are every distinct part (NAR blobs, kernel,
//! initrd, the disk's chunk list and each distinct disk chunk). Pinning that root with one
//! `HashSeq` tag keeps the whole image; the downloader can hand every child to any peer.
//!
//! **Wire rule:** `Manifest` only grows: new versions are new variants, never edits of `V1`.

use std::collections::BTreeSet;

use iroh_blobs::Hash;
use serde::{Deserialize, Serialize};

/// Largest manifest blob accepted (a closure of ~50k store paths).
pub const MAX_MANIFEST_SIZE: u64 = 32 * 1024 * 1024;
/// Largest hash sequence accepted (root or chunk list): 2M hashes (a 256 GiB disk at 128 KiB).
pub const MAX_HASH_SEQ_SIZE: u64 = 64 * 1024 * 1024;

/// A versioned manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Manifest {
    V1(ManifestV1),
}

/// Version 1 of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestV1 {
    pub image: Image,
    /// Sum of the sizes of all distinct parts (for progress bars; not trusted for anything).
    pub parts_size: u64,
}

/// What an image contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Image {
    NixClosure(NixClosure),
    Bundle(Bundle),
}

/// A Nix closure: every store path packed as one NAR blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixClosure {
    /// The entry point, e.g. a microvm.nix runner (`/nix/store/…-microvm-run-…`).
    pub entry: String,
    /// The closure in dependency order (references before referrers).
    pub paths: Vec<StorePathEntry>,
}

/// One store path of a closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePathEntry {
    /// Full store path (`/nix/store/<hash>-<name>`).
    pub store_path: String,
    /// SHA-256 of the NAR serialisation (what Nix records as `narHash`).
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    /// Full store paths this path refers to (may include itself).
    pub references: Vec<String>,
    /// The BLAKE3 hash of the NAR blob.
    #[serde(with = "hash_bytes")]
    pub blob: Hash,
}

/// Kernel, initrd, optional root disk and command line, for the qemu backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub kernel: FilePart,
    pub initrd: FilePart,
    pub disk: Option<ChunkedFile>,
    pub cmdline: String,
}

/// A file stored as one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    #[serde(with = "hash_bytes")]
    pub blob: Hash,
    pub size: u64,
}

/// A file split by content-defined chunking: `chunks` is a hash sequence listing the chunk
/// blobs in file order (a repeated chunk appears repeatedly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkedFile {
    #[serde(with = "hash_bytes")]
    pub chunks: Hash,
    pub size: u64,
    pub chunk_count: u64,
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ManifestDecodeError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_SIZE} allowed")]
    TooLarge(u64),
    #[error("manifest is not a valid postcard manifest: {0}")]
    Malformed(String),
    #[error("manifest has {0} trailing bytes")]
    Trailing(usize),
    #[error("manifest is inconsistent: {0}")]
    Invalid(String),
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain structs into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes and validates manifest bytes; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestDecodeError> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(ManifestDecodeError::TooLarge(bytes.len() as u64));
        }
        let (m, rest): (Manifest, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| ManifestDecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ManifestDecodeError::Trailing(rest.len()));
        }
        m.validate()?;
        Ok(m)
    }

    pub fn image(&self) -> &Image {
        match self {
            Manifest::V1(v) => &v.image,
        }
    }

    pub fn parts_size(&self) -> u64 {
        match self {
            Manifest::V1(v) => v.parts_size,
        }
    }

    /// Structural checks: store paths look like store paths, references stay inside the
    /// closure, the entry is part of it.
    pub fn validate(&self) -> Result<(), ManifestDecodeError> {
        let bad = |s: String| Err(ManifestDecodeError::Invalid(s));
        match self.image() {
            Image::NixClosure(c) => {
                let names: BTreeSet<&str> = c.paths.iter().map(|p| p.store_path.as_str()).collect();
                if names.len() != c.paths.len() {
                    return bad("a store path is listed twice".into());
                }
                if !names.contains(c.entry.as_str()) {
                    return bad(format!("entry {} is not in the closure", c.entry));
                }
                for p in &c.paths {
                    if crate::nix::store_path_name(&p.store_path).is_none() {
                        return bad(format!("{:?} is not a store path", p.store_path));
                    }
                    for r in &p.references {
                        if !names.contains(r.as_str()) {
                            return bad(format!("{} refers to {} outside the closure", p.store_path, r));
                        }
                    }
                }
            }
            Image::Bundle(b) => {
                if let Some(d) = &b.disk {
                    if d.chunk_count.saturating_mul(32) > MAX_HASH_SEQ_SIZE {
                        return bad(format!("disk has {} chunks, too many", d.chunk_count));
                    }
                }
            }
        }
        Ok(())
    }

    /// The part blobs named directly by the manifest (not the chunks inside a chunk list).
    pub fn direct_parts(&self) -> Vec<Hash> {
        match self.image() {
            Image::NixClosure(c) => c.paths.iter().map(|p| p.blob).collect(),
            Image::Bundle(b) => {
                let mut v = vec![b.kernel.blob, b.initrd.blob];
                if let Some(d) = &b.disk {
                    v.push(d.chunks);
                }
                v
            }
        }
    }
}

/// Serialises a BLAKE3 hash as 32 raw bytes, independent of iroh-blobs' own serde impl.
mod hash_bytes {
    use iroh_blobs::Hash;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(h.as_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let b: &[u8] = <&[u8]>::deserialize(d)?;
        let a: [u8; 32] = b.try_into().map_err(|_| serde::de::Error::invalid_length(b.len(), &"32 bytes"))?;
        Ok(Hash::from_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let a = "/nix/store/09pmdb5hvvn7gvd2dhwnqi3kc6vb4zi6-initrd.txt".to_string();
        let b = "/nix/store/kb0gpxyssfqcnzsflnqa9g0yq0gr6zig-microvm-runner".to_string();
        Manifest::V1(ManifestV1 {
            parts_size: 10,
            image: Image::NixClosure(NixClosure {
                entry: b.clone(),
                paths: vec![
                    StorePathEntry { store_path: a.clone(), nar_hash: [1; 32], nar_size: 5, references: vec![], blob: Hash::new(b"a") },
                    StorePathEntry { store_path: b, nar_hash: [2; 32], nar_size: 5, references: vec![a], blob: Hash::new(b"b") },
                ],
            }),
        })
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()), Ok(m));
        let bundle = Manifest::V1(ManifestV1 {
            parts_size: 3,
            image: Image::Bundle(Bundle {
                kernel: FilePart { blob: Hash::new(b"k"), size: 1 },
                initrd: FilePart { blob: Hash::new(b"i"), size: 1 },
                disk: Some(ChunkedFile { chunks: Hash::new(b"d"), size: 1, chunk_count: 1 }),
                cmdline: "console=ttyS0".into(),
            }),
        });
        assert_eq!(Manifest::decode(&bundle.encode()), Ok(bundle));
    }

    #[test]
    fn refuses_inconsistent_closures() {
        let Manifest::V1(mut v) = sample();
        let Image::NixClosure(c) = &mut v.image else { unreachable!() };
        c.paths[0].references.push("/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-elsewhere".into());
        let m = Manifest::V1(v);
        assert!(matches!(Manifest::decode(&m.encode()), Err(ManifestDecodeError::Invalid(_))));
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(Manifest::decode(&bytes), Err(ManifestDecodeError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_mutated_manifests(idx in 0usize..4096, val in any::<u8>(), cut in 0usize..4096) {
            let mut bytes = sample().encode();
            let n = bytes.len();
            bytes[idx % n] = val;
            bytes.truncate(cut % (n + 1));
            let _ = Manifest::decode(&bytes);
        }
    }
}
