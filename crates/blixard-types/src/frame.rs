//! Framing shared by every Blixard protocol: a 4-byte big-endian length, then a postcard
//! body. The length is bounded so a peer cannot make us allocate without limit.

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame any protocol accepts (raft snapshots are sent in chunks below this).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes `msg` as one frame: length prefix followed by the postcard body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4])?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body (without the length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(body)?)
}

/// Reads the length out of a 4-byte prefix, refusing oversized frames.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let msg = (42u32, String::from("hello"));
        let bytes = encode(&msg).expect("encode");
        let len = body_len(bytes[..4].try_into().expect("prefix")).expect("len");
        assert_eq!(len, bytes.len() - 4);
        let back: (u32, String) = decode(&bytes[4..]).expect("decode");
        assert_eq!(back, msg);
    }

    #[test]
    fn oversized_prefix_is_refused() {
        assert!(matches!(body_len(u32::MAX.to_be_bytes()), Err(FrameError::TooLarge(_))));
    }
}
