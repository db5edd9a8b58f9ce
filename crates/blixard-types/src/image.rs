//! Images as the cluster's catalogue records them: a content hash (the root of the image in
//! `blixard-images`), its kind and size, and optional names pointing at it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest image name.
pub const MAX_IMAGE_NAME_LEN: usize = 63;
/// Shortest hash prefix accepted as an image reference.
pub const MIN_HASH_PREFIX: usize = 8;

/// What an image holds, and so which VM backend runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    /// A Nix closure whose entry point is a microvm.nix runner (the microvm backend).
    NixClosure,
    /// Kernel, initrd, optional root disk and command line (the qemu backend).
    Bundle,
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageKind::NixClosure => "nix-closure",
            ImageKind::Bundle => "bundle",
        })
    }
}

/// True for a full image hash: 64 lowercase hex digits.
pub fn is_full_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks an image name: 1-63 characters of `a-z 0-9 - _ .`, starting with a letter or
/// digit, and not itself hex-only of hash-prefix length (it would be ambiguous with a hash).
pub fn validate_image_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IMAGE_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        return Err(format!(
            "invalid image name {:?}: use 1-{MAX_IMAGE_NAME_LEN} characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
            name.chars().take(80).collect::<String>()
        ));
    }
    if name.len() >= MIN_HASH_PREFIX && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("invalid image name {name:?}: it looks like a hash; add a letter outside a-f"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hashes() {
        for ok in ["test-guest", "web_1.2", "a", "deadbeefx"] {
            assert!(validate_image_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a/b", "deadbeef", &"a".repeat(64), "a b"] {
            assert!(validate_image_name(bad).is_err(), "{bad:?}");
        }
        assert!(is_full_hash(&"ab".repeat(32)));
        assert!(!is_full_hash(&"AB".repeat(32)));
        assert!(!is_full_hash("abc"));
    }
}
