//! Framing shared by every Blixard protocol: a 4-byte big-endian length, then a postcard
//! body. The length is bounded so a peer cannot make us allocate without limit.

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame any protocol accepts (raft snapshots are sent in chunks below this).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes `msg` as one frame: length prefix followed by the postcard body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4])?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME });
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
    body_len_max(prefix, MAX_FRAME)
}

/// [`body_len`] for a protocol whose frames are smaller: refuses lengths over `max` too.
pub fn body_len_max(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
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
        assert!(matches!(body_len(u32::MAX.to_be_bytes()), Err(FrameError::TooLarge { .. })));
        assert!(matches!(body_len_max(101u32.to_be_bytes(), 100), Err(FrameError::TooLarge { len: 101, max: 100 })));
        assert_eq!(body_len_max(100u32.to_be_bytes(), 100).ok(), Some(100));
    }
}
