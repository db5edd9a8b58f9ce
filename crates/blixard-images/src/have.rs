//! Which parts of an image a node holds while it fetches it: the swarm's "have" messages.
//!
//! A fetcher subscribes to every provider on [`HAVE_ALPN`]: one bidirectional stream per
//! image, the request is the image's 32-byte hash, and the answer is a sequence of frames
//! (Blixard's framing, `blixard_types::frame`, each a postcard [`HaveMsg`], at most
//! [`MAX_FRAME`] bytes). A node that holds the whole
//! image answers `All`; one fetching it answers `Bits` with the parts it holds (indices into
//! the root's list of parts, the same on every node) and then `Parts` as more complete,
//! until `All` (done) or `None` (its fetch ended without the image). With this the swarm
//! asks a fellow fetcher only for parts it has, and a seed only for parts nobody else has,
//! instead of polling and backing off (see `fetch.rs`).

use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh_blobs::Hash;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, debug_span, Instrument};

use blixard_mesh::rpc::{read_frame_body, write_frame};

use crate::store::ImageStore;

/// The ALPN of the have protocol (wrap the handler in the member `Gate`, like the blobs').
pub const HAVE_ALPN: &[u8] = b"blixard/image-have/0";

/// Largest frame accepted: the bitmap of the largest chunk list a manifest may name, with
/// room to spare.
pub const MAX_FRAME: usize = (crate::manifest::MAX_HASH_SEQ_SIZE as usize / 32) / 8 + 1024;

/// Updates are sent at most this often, so a burst of completed parts costs one frame.
const COALESCE: Duration = Duration::from_millis(20);

/// Images served at once on one connection.
const MAX_STREAMS_PER_CONN: usize = 16;

/// One frame of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaveMsg {
    /// Holds the whole image.
    All,
    /// Neither holds nor fetches it (any more).
    None,
    /// Fetching; holds the parts whose bits are set (part `i` is bit `i % 8` of byte `i / 8`)
    /// out of `n`.
    Bits { n: u32, bits: Vec<u8> },
    /// Has completed these parts since the last frame.
    Parts(Vec<u32>),
}

/// A frame that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HaveDecodeError {
    #[error("have frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("have frame does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("have frame has {0} bytes after the message")]
    Trailing(usize),
}

impl HaveMsg {
    /// Decodes a frame's body (without the length).
    pub fn decode(body: &[u8]) -> Result<Self, HaveDecodeError> {
        if body.len() > MAX_FRAME {
            return Err(HaveDecodeError::TooLarge(body.len()));
        }
        let (msg, rest) = postcard::take_from_bytes(body)?;
        if !rest.is_empty() {
            return Err(HaveDecodeError::Trailing(rest.len()));
        }
        Ok(msg)
    }
}

/// The parts of an image this node holds while fetching it, by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaveBits {
    n: u32,
    bits: Vec<u8>,
}

impl HaveBits {
    pub fn new(n: u32) -> Self {
        Self { n, bits: vec![0; (n as usize).div_ceil(8)] }
    }

    /// Every one of `n` parts.
    pub fn full(n: u32) -> Self {
        let mut b = Self::new(n);
        b.bits.fill(0xff);
        if !n.is_multiple_of(8) {
            if let Some(last) = b.bits.last_mut() {
                *last = (1u8 << (n % 8)) - 1;
            }
        }
        b
    }

    /// From a `Bits` message, if it is the bitmap of `n` parts.
    pub fn from_msg(n: u32, bits: Vec<u8>) -> Option<Self> {
        (bits.len() == (n as usize).div_ceil(8)).then_some(Self { n, bits })
    }

    pub fn len(&self) -> u32 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.n {
            return false;
        }
        self.bits[i as usize / 8] |= 1 << (i % 8);
        true
    }

    pub fn has(&self, i: usize) -> bool {
        i < self.n as usize && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    /// Parts set here and not in `older`.
    fn added_since(&self, older: &HaveBits) -> Vec<u32> {
        let mut out = Vec::new();
        for (b, (new, old)) in self.bits.iter().zip(&older.bits).enumerate() {
            let mut d = new & !old;
            while d != 0 {
                let bit = d.trailing_zeros();
                out.push(b as u32 * 8 + bit);
                d &= d - 1;
            }
        }
        out
    }

    fn to_msg(&self) -> HaveMsg {
        HaveMsg::Bits { n: self.n, bits: self.bits.clone() }
    }
}

/// A fetch's have-state, shared with the have server: `None` until the parts phase starts.
pub(crate) type HaveWatch = watch::Receiver<Option<HaveBits>>;

/// Serves [`HAVE_ALPN`] for an [`ImageStore`].
#[derive(Debug, Clone)]
pub struct HaveProtocol {
    images: ImageStore,
}

impl HaveProtocol {
    pub(crate) fn new(images: ImageStore) -> Self {
        Self { images }
    }
}

impl ProtocolHandler for HaveProtocol {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS_PER_CONN));
        let peer = conn.remote_id().fmt_short().to_string();
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return Ok(()),
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                debug!(%peer, "too many have streams; refusing one");
                continue;
            };
            let images = self.images.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = serve_one(&images, send, recv).await {
                        debug!("have stream ended: {e}");
                    }
                    drop(permit);
                }
                .instrument(debug_span!("have_serve", %peer)),
            );
        }
    }
}

async fn write(send: &mut SendStream, msg: &HaveMsg) -> Result<(), String> {
    write_frame(send, msg).await.map_err(|e| format!("writing: {e}"))
}

async fn serve_one(images: &ImageStore, mut send: SendStream, mut recv: RecvStream) -> Result<(), String> {
    let mut h = [0u8; 32];
    recv.read_exact(&mut h).await.map_err(|e| format!("reading request: {e}"))?;
    let hash = Hash::from_bytes(h);
    if let Some(rx) = images.have_watch(hash) {
        if !stream_while_fetching(rx, &mut send).await? {
            return Ok(());
        }
    }
    // Not fetching it (any more): whether it holds it is the last word.
    let msg = if images.is_complete(hash).await { HaveMsg::All } else { HaveMsg::None };
    write(&mut send, &msg).await?;
    let _ = send.finish();
    Ok(())
}

/// Sends a fetch's have-state once its parts are known, then what it adds, until the fetch
/// ends (true) or the subscriber goes away (false).
async fn stream_while_fetching(mut rx: HaveWatch, send: &mut SendStream) -> Result<bool, String> {
    let mut sent: Option<HaveBits> = None;
    loop {
        let now = rx.borrow_and_update().clone();
        match (&sent, now) {
            (_, None) => {}
            (None, Some(bits)) => {
                write(send, &bits.to_msg()).await?;
                sent = Some(bits);
            }
            (Some(old), Some(bits)) => {
                let added = bits.added_since(old);
                if !added.is_empty() {
                    write(send, &HaveMsg::Parts(added)).await?;
                }
                sent = Some(bits);
            }
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Ok(true);
                }
            }
            _ = send.stopped() => return Ok(false),
        }
        tokio::time::sleep(COALESCE).await;
    }
}

/// What a subscription learned, for the fetch loop.
#[derive(Debug)]
pub(crate) enum HaveEvent {
    /// The provider holds the whole image.
    All,
    /// It does not hold or fetch the image (it may start later: the subscription retries).
    None,
    Bits(HaveBits),
    Parts(Vec<u32>),
    /// It does not speak the have protocol, or the subscription failed: no information.
    Unknown(String),
}

/// How long a subscription waits before asking again a provider that answered `None` or
/// broke off.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// Failed subscriptions to one provider after which it is left without have information.
const MAX_FAILED_SUBSCRIPTIONS: u32 = 3;

/// Subscribes to `addr`'s have-state of image `hash` with `n` parts and reports it as
/// `(index, event)` until `tx` closes. Runs for the life of the fetch (it is aborted with it).
pub(crate) async fn subscribe(
    endpoint: iroh::Endpoint,
    addr: iroh::EndpointAddr,
    index: usize,
    hash: Hash,
    n: u32,
    connect_timeout: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<(usize, HaveEvent)>,
) {
    let mut failed = 0;
    loop {
        let ev = match subscribe_once(&endpoint, addr.clone(), index, hash, n, connect_timeout, &tx).await {
            Ok(ev) => ev,
            Err(why) => {
                failed += 1;
                HaveEvent::Unknown(why)
            }
        };
        // A provider that does not speak the protocol (a `blixard image push` serves blobs
        // only) stays a seed without being dialled every second.
        let stop = matches!(ev, HaveEvent::All) || failed >= MAX_FAILED_SUBSCRIPTIONS;
        if tx.send((index, ev)).is_err() || stop {
            return;
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

/// One subscription; returns its last event (`All`, `None`, or why it broke off).
async fn subscribe_once(
    endpoint: &iroh::Endpoint,
    addr: iroh::EndpointAddr,
    index: usize,
    hash: Hash,
    n: u32,
    connect_timeout: Duration,
    tx: &tokio::sync::mpsc::UnboundedSender<(usize, HaveEvent)>,
) -> Result<HaveEvent, String> {
    let conn = crate::fetch::dial(endpoint, addr, HAVE_ALPN, connect_timeout).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
    send.write_all(hash.as_bytes()).await.map_err(|e| format!("request: {e}"))?;
    let _ = send.finish();
    let mut first = true;
    loop {
        let body = read_frame_body(&mut recv, MAX_FRAME).await.map_err(|e| format!("reading answer: {e}"))?;
        let msg = HaveMsg::decode(&body).map_err(|e| e.to_string())?;
        let ev = match msg {
            HaveMsg::All => return Ok(HaveEvent::All),
            HaveMsg::None => return Ok(HaveEvent::None),
            HaveMsg::Bits { n: m, bits } if first => match HaveBits::from_msg(m, bits) {
                Some(b) if m == n => HaveEvent::Bits(b),
                _ => return Err(format!("bitmap is not one of {n} parts")),
            },
            HaveMsg::Parts(p) if !first => {
                if p.iter().any(|i| *i >= n) {
                    return Err(format!("part index out of 0..{n}"));
                }
                HaveEvent::Parts(p)
            }
            other => return Err(format!("unexpected {other:?}")),
        };
        first = false;
        if tx.send((index, ev)).is_err() {
            return Ok(HaveEvent::None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn added_since_lists_new_bits_only() {
        let mut a = HaveBits::new(20);
        a.set(3);
        let mut b = a.clone();
        b.set(3);
        b.set(9);
        b.set(19);
        assert!(!b.set(20));
        assert_eq!(b.added_since(&a), vec![9, 19]);
        assert!(b.has(19) && !b.has(20) && !b.has(4));
        let f = HaveBits::full(11);
        assert!((0..11).all(|i| f.has(i)) && !f.has(11));
        assert_eq!(f.added_since(&HaveBits::new(11)).len(), 11);
    }

    #[test]
    fn a_bitmap_of_the_wrong_length_is_refused() {
        assert!(HaveBits::from_msg(9, vec![0; 2]).is_some());
        assert!(HaveBits::from_msg(9, vec![0; 1]).is_none());
        assert!(HaveBits::from_msg(8, vec![0; 2]).is_none());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = HaveMsg::decode(&body);
        }

        #[test]
        fn frames_round_trip(parts in proptest::collection::vec(any::<u32>(), 0..64), n in 0u32..5000) {
            for msg in [HaveMsg::All, HaveMsg::None, HaveMsg::Parts(parts.clone()), HaveBits::new(n).to_msg()] {
                let frame = blixard_types::frame::encode(&msg).unwrap_or_default();
                let prefix: [u8; 4] = frame[..4].try_into().unwrap_or_default();
                prop_assert_eq!(blixard_types::frame::body_len_max(prefix, MAX_FRAME).ok(), Some(frame.len() - 4));
                prop_assert_eq!(HaveMsg::decode(&frame[4..]).ok(), Some(msg));
            }
        }
    }
}
