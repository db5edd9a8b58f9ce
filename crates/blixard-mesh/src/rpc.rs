//! Framed request/response over QUIC bi-streams: one stream per request, connections
//! cached and shared, so concurrent requests to one peer pipeline on one connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_types::frame::{self, FrameError};
use blixard_types::NodeId;
use iroh::endpoint::{Connection, ConnectionError, ReadExactError, RecvStream, SendStream, VarInt};
use iroh::Endpoint;
use serde::{de::DeserializeOwned, Serialize};
use tracing::{debug, Instrument};

/// Process-wide RPC counters, exported as metrics.
pub mod counters {
    use std::sync::atomic::{AtomicU64, Ordering};

    pub static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
    pub static BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);
    pub static DIALS: AtomicU64 = AtomicU64::new(0);
    pub static DIAL_FAILURES: AtomicU64 = AtomicU64::new(0);
    pub static REFUSED: AtomicU64 = AtomicU64::new(0);
    pub static ACCEPTED: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The close code a node sends when it refuses a peer's key.
pub const CLOSE_UNAUTHORIZED: u32 = 403;
/// The close code for a malformed message.
pub const CLOSE_PROTOCOL: u32 = 400;

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("peer {0} has no usable address")]
    NoAddress(NodeId),
    #[error("cannot connect to {peer}: {reason}")]
    Connect { peer: NodeId, reason: String },
    #[error("refused by {peer}: {reason}")]
    Refused { peer: NodeId, reason: String },
    #[error("connection to {peer} lost: {reason}")]
    Lost { peer: NodeId, reason: String },
    #[error("bad message from {peer}: {source}")]
    Frame { peer: NodeId, source: FrameError },
    #[error("{peer} did not answer within {after:?}")]
    Timeout { peer: NodeId, after: Duration },
    #[error("{}", .0.join("; "))]
    NoneReachable(Vec<String>),
}

impl RpcError {
    /// True if the peer refused us (retrying will not help).
    pub fn is_refused(&self) -> bool {
        matches!(self, RpcError::Refused { .. })
    }
}

/// Errors on one stream, before they are attributed to a peer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection closed: {0}")]
    Connection(#[from] ConnectionError),
    #[error("stream error: {0}")]
    Stream(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl StreamError {
    fn attribute(self, peer: NodeId) -> RpcError {
        match self {
            StreamError::Connection(ConnectionError::ApplicationClosed(close))
                if close.error_code == VarInt::from_u32(CLOSE_UNAUTHORIZED) =>
            {
                RpcError::Refused { peer, reason: String::from_utf8_lossy(&close.reason).into_owned() }
            }
            StreamError::Connection(e) => RpcError::Lost { peer, reason: e.to_string() },
            StreamError::Stream(reason) => RpcError::Lost { peer, reason },
            StreamError::Frame(source) => RpcError::Frame { peer, source },
        }
    }
}

fn read_err(e: ReadExactError) -> StreamError {
    match e {
        ReadExactError::ReadError(iroh::endpoint::ReadError::ConnectionLost(c)) => StreamError::Connection(c),
        other => StreamError::Stream(other.to_string()),
    }
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), StreamError> {
    let bytes = frame::encode(msg)?;
    write_bytes(send, &bytes).await
}

/// Writes an already encoded frame.
pub async fn write_bytes(send: &mut SendStream, bytes: &[u8]) -> Result<(), StreamError> {
    counters::add(&counters::BYTES_SENT, bytes.len());
    send.write_all(bytes).await.map_err(|e| match e {
        iroh::endpoint::WriteError::ConnectionLost(c) => StreamError::Connection(c),
        other => StreamError::Stream(other.to_string()),
    })
}

/// Reads one frame, refusing frames over the size limit before allocating.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, StreamError> {
    let body = read_frame_body(recv, frame::MAX_FRAME).await?;
    Ok(frame::decode(&body)?)
}

/// Reads one frame's body, undecoded, refusing frames over `max` bytes before allocating
/// (for a protocol with a smaller limit or its own decoder).
pub async fn read_frame_body(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, StreamError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(read_err)?;
    let len = frame::body_len_max(prefix, max)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(read_err)?;
    counters::add(&counters::BYTES_RECEIVED, 4 + len);
    Ok(body)
}

/// Sends `req` on a new stream of `conn` and reads the response.
pub async fn call_on<Req: Serialize, Resp: DeserializeOwned>(
    conn: &Connection,
    req: &Req,
) -> Result<Resp, StreamError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, req).await?;
    send.finish().map_err(|e| StreamError::Stream(e.to_string()))?;
    read_frame(&mut recv).await
}

/// Serves requests on `conn` until it closes: each bi-stream carries one request, handled
/// on its own task so that slow requests do not block others.
pub async fn serve<Req, Resp, F, Fut>(conn: Connection, handler: F)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Resp> + Send + 'static,
{
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "connection ended");
                return;
            }
        };
        let handler = handler.clone();
        let conn = conn.clone();
        tokio::spawn(
            async move {
                let req: Req = match read_frame(&mut recv).await {
                    Ok(r) => r,
                    Err(StreamError::Frame(e)) => {
                        debug!(error = %e, "malformed request; closing connection");
                        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"malformed request");
                        return;
                    }
                    Err(e) => {
                        debug!(error = %e, "request stream failed");
                        return;
                    }
                };
                let resp = handler(req).await;
                let Ok(bytes) = frame::encode(&resp) else {
                    debug!("response too large to send");
                    return;
                };
                if write_bytes(&mut send, &bytes).await.is_ok() {
                    let _ = send.finish();
                }
            }
            .in_current_span(),
        );
    }
}

/// Cached connections to peers on one ALPN. Dials happen outside the lock; a failed
/// connection is dropped and re-dialled once.
#[derive(Debug, Clone)]
pub struct Pool {
    endpoint: Endpoint,
    alpn: &'static [u8],
    /// Each peer's connection, and when it last answered (or was dialled).
    conns: Arc<Mutex<HashMap<NodeId, (Connection, tokio::time::Instant)>>>,
    connect_timeout: Duration,
}

/// How long a dial may take by default: a dead peer should not hold a request much longer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Pool {
    pub fn new(endpoint: Endpoint, alpn: &'static [u8]) -> Self {
        Self { endpoint, alpn, conns: Default::default(), connect_timeout: DEFAULT_CONNECT_TIMEOUT }
    }

    /// Sets how long one dial may take (relayed paths need longer than direct ones).
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn cached(&self, peer: &NodeId) -> Option<Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.get(peer).map(|(c, _)| c).filter(|c| c.close_reason().is_none()).cloned()
    }

    fn forget(&self, peer: &NodeId, conn: &Connection) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.get(peer).is_some_and(|(c, _)| c.stable_id() == conn.stable_id()) {
            conns.remove(peer);
        }
    }

    /// Notes that `peer` answered on `conn`.
    fn answered(&self, peer: &NodeId, conn: &Connection) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, at)) = conns.get_mut(peer) {
            if c.stable_id() == conn.stable_id() {
                *at = tokio::time::Instant::now();
            }
        }
    }

    /// Whether the cached connection to `peer` has gone [`STALE_AFTER`] without an answer;
    /// if so its clock restarts, so this says yes once per `STALE_AFTER`.
    fn take_stale(&self, peer: &NodeId) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get_mut(peer) {
            Some((_, at)) if at.elapsed() >= STALE_AFTER => {
                *at = tokio::time::Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Dials `peer` afresh in the background and, if that works, replaces the cached
    /// connection. Calls with short timeouts go on failing fast meanwhile: they could not
    /// wait for a handshake anyway.
    fn redial(&self, peer: &NodeId, addrs: &[SocketAddr]) {
        let (pool, peer, addrs) = (self.clone(), *peer, addrs.to_vec());
        tokio::spawn(async move {
            let Ok(conn) = pool.dial(&peer, &addrs).await else { return };
            let mut conns = pool.conns.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((old, _)) = conns.insert(peer, (conn, tokio::time::Instant::now())) {
                old.close(VarInt::from_u32(0), b"stale");
            }
        });
    }

    /// Opens a new connection to `peer`, within the pool's connect timeout.
    async fn dial(&self, peer: &NodeId, addrs: &[SocketAddr]) -> Result<Connection, RpcError> {
        let addr = crate::endpoint_addr(peer, addrs).ok_or(RpcError::NoAddress(*peer))?;
        if addrs.is_empty() {
            return Err(RpcError::NoAddress(*peer));
        }
        counters::add(&counters::DIALS, 1);
        tokio::time::timeout(self.connect_timeout, self.endpoint.connect(addr, self.alpn))
            .await
            .inspect_err(|_| counters::add(&counters::DIAL_FAILURES, 1))
            .map_err(|_| RpcError::Connect { peer: *peer, reason: format!("no answer within {:?}", self.connect_timeout) })?
            .inspect_err(|_| counters::add(&counters::DIAL_FAILURES, 1))
            .map_err(|e| RpcError::Connect { peer: *peer, reason: e.to_string() })
    }

    /// Drops the cached connection to `peer` (e.g. after it was removed).
    pub fn disconnect(&self, peer: &NodeId) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, _)) = conns.remove(peer) {
            c.close(VarInt::from_u32(0), b"bye");
        }
    }

    async fn connect(&self, peer: &NodeId, addrs: &[SocketAddr]) -> Result<Connection, RpcError> {
        if let Some(c) = self.cached(peer) {
            return Ok(c);
        }
        let conn = self.dial(peer, addrs).await?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Another task may have dialled meanwhile: keep the first live one.
        let conn = match conns.get(peer) {
            Some((existing, _)) if existing.close_reason().is_none() => existing.clone(),
            _ => {
                conns.insert(*peer, (conn.clone(), tokio::time::Instant::now()));
                conn
            }
        };
        Ok(conn)
    }

    /// Connects to the first of `peers` that answers: dials them in order, starting the
    /// next one `stagger` after the previous if it has not connected yet (happy eyeballs),
    /// so a dead peer early in the list costs `stagger`, not a timeout.
    pub async fn connect_any(
        &self,
        peers: &[(NodeId, Vec<SocketAddr>)],
        stagger: Duration,
        timeout: Duration,
    ) -> Result<(NodeId, Connection), RpcError> {
        let mut set = tokio::task::JoinSet::new();
        let mut errors = Vec::new();
        let mut next = peers.iter();
        let race = async {
            loop {
                if let Some((id, addrs)) = next.next() {
                    let (pool, id, addrs) = (self.clone(), *id, addrs.clone());
                    set.spawn(async move { (id, pool.connect(&id, &addrs).await) });
                } else if set.is_empty() {
                    return Err(());
                }
                let tick = tokio::time::sleep(stagger);
                tokio::pin!(tick);
                loop {
                    tokio::select! {
                        Some(joined) = set.join_next() => match joined {
                            Ok((id, Ok(conn))) => return Ok((id, conn)),
                            Ok((_, Err(e))) => { errors.push(e.to_string()); if next.len() > 0 { break } }
                            Err(e) => errors.push(e.to_string()),
                        },
                        _ = &mut tick, if next.len() > 0 => break,
                        else => return Err(()),
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, race).await {
            Ok(Ok(hit)) => Ok(hit),
            Ok(Err(())) if peers.is_empty() => Err(RpcError::NoneReachable(vec!["the ticket lists no members".into()])),
            Ok(Err(())) => Err(RpcError::NoneReachable(errors)),
            Err(_) => Err(RpcError::NoneReachable(vec![format!("no member answered within {timeout:?}")])),
        }
    }

    /// Sends `req` on an established connection to `peer`.
    pub async fn call_conn<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: NodeId,
        conn: &Connection,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        match tokio::time::timeout(timeout, call_on(conn, req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.forget(&peer, conn);
                Err(e.attribute(peer))
            }
            Err(_) => Err(RpcError::Timeout { peer, after: timeout }),
        }
    }

    /// Sends `req` to `peer` and returns its response, within `timeout`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: &NodeId,
        addrs: &[SocketAddr],
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let attempt = async {
            let mut last = None;
            for _ in 0..2 {
                let conn = self.connect(peer, addrs).await?;
                match call_on(&conn, req).await {
                    Ok(r) => {
                        self.answered(peer, &conn);
                        return Ok(r);
                    }
                    Err(e) => {
                        self.forget(peer, &conn);
                        let e = e.attribute(*peer);
                        // A refusal or a bad frame will not change on retry.
                        if !matches!(e, RpcError::Lost { .. }) {
                            return Err(e);
                        }
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or(RpcError::NoAddress(*peer)))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                // Silence for this long means the connection is likely dead (e.g. the peer
                // was killed and restarted on the same address, and the old connection never
                // learnt it): dial afresh next time. One short timeout (a Raft heartbeat)
                // says nothing under load, but a second of them without any answer does:
                // dial afresh beside it.
                if timeout >= STALE_AFTER {
                    self.disconnect(peer);
                } else if self.take_stale(peer) {
                    self.redial(peer, addrs);
                }
                Err(RpcError::Timeout { peer: *peer, after: timeout })
            }
        }
    }
}

/// A call that timed out after at least this long drops its cached connection.
const STALE_AFTER: Duration = Duration::from_secs(1);
