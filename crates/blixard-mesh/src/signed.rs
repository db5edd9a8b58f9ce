//! Signed envelopes for broadcast messages (gossip), whose deliverer is not their author:
//! the author's key signs the body, receivers verify it and then check the author is a
//! member.

use blixard_types::NodeId;
use iroh::{PublicKey, SecretKey, Signature};
use serde::{Deserialize, Serialize};

/// Domain separation: a signature made here means nothing anywhere else.
const DOMAIN: &[u8] = b"blixard/signed/1\0";
/// Largest envelope accepted.
pub const MAX_SIGNED: usize = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: NodeId,
    body: Vec<u8>,
    sig: Vec<u8>,
}

/// Why an envelope was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("envelope too large ({0} bytes)")]
    TooLarge(usize),
    #[error("malformed envelope")]
    Malformed,
    #[error("author is not a valid key")]
    BadKey,
    #[error("bad signature")]
    BadSignature,
}

fn signed_bytes(from: &NodeId, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DOMAIN.len() + 32 + body.len());
    v.extend_from_slice(DOMAIN);
    v.extend_from_slice(&from.0);
    v.extend_from_slice(body);
    v
}

/// Wraps `body` in an envelope signed by `key`.
pub fn sign(key: &SecretKey, body: Vec<u8>) -> Vec<u8> {
    let from = crate::node_id(&key.public());
    let sig = key.sign(&signed_bytes(&from, &body)).to_bytes().to_vec();
    postcard::to_stdvec(&Envelope { from, body, sig }).unwrap_or_default()
}

/// Checks an envelope's signature; returns its author and body.
pub fn verify(bytes: &[u8]) -> Result<(NodeId, Vec<u8>), VerifyError> {
    if bytes.len() > MAX_SIGNED {
        return Err(VerifyError::TooLarge(bytes.len()));
    }
    let env: Envelope = postcard::from_bytes(bytes).map_err(|_| VerifyError::Malformed)?;
    let key = PublicKey::from_bytes(&env.from.0).map_err(|_| VerifyError::BadKey)?;
    let sig: [u8; 64] = env.sig.as_slice().try_into().map_err(|_| VerifyError::Malformed)?;
    key.verify(&signed_bytes(&env.from, &env.body), &Signature::from_bytes(&sig))
        .map_err(|_| VerifyError::BadSignature)?;
    Ok((env.from, env.body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sign_verify_and_tamper() {
        let key = SecretKey::generate();
        let env = sign(&key, b"hello".to_vec());
        let (from, body) = verify(&env).expect("valid");
        assert_eq!(from, crate::node_id(&key.public()));
        assert_eq!(body, b"hello");
        // Any flipped byte breaks it.
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 1;
            assert!(verify(&bad).is_err(), "flip at {i} accepted");
        }
        // Someone else's key cannot claim the author's name.
        let other = SecretKey::generate();
        let forged = postcard::to_stdvec(&Envelope {
            from,
            body: b"evil".to_vec(),
            sig: other.sign(&signed_bytes(&from, b"evil")).to_bytes().to_vec(),
        })
        .expect("encode");
        assert_eq!(verify(&forged), Err(VerifyError::BadSignature));
    }

    proptest! {
        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = verify(&bytes);
        }
    }
}
