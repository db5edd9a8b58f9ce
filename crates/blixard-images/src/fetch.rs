//! Swarm download of an image from several providers.
//!
//! iroh-blobs 0.104's `Downloader` splits a hash sequence across providers only by trying
//! them in a (shuffled) order per child, and moves work only on failure. This scheduler
//! uses the same primitive (`Remote::fetch` over one QUIC connection per provider, which
//! BLAKE3-verifies every 16 KiB group and resumes from what is already local) but hands
//! out parts from one queue: each provider has a bounded number of parts in flight, so a
//! fast provider takes more parts, a slow one fewer; a part whose request fails, times out
//! or is refused goes back to the queue for another provider; a provider that sends data
//! that does not verify is dropped at once; one that fails repeatedly is dropped.
//! A provider that lacks a part (maybe it is still fetching it) is asked again later.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iroh::endpoint::Connection;
use iroh::{EndpointAddr, EndpointId};
use iroh_blobs::api::proto::BlobStatus;
use iroh_blobs::api::remote::GetProgressItem;
use iroh_blobs::{Hash, HashAndFormat};
use n0_future::StreamExt;
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::error::{is_disk_full_msg, FetchError};
use crate::manifest::{Image, Manifest, MAX_HASH_SEQ_SIZE, MAX_MANIFEST_SIZE};
use crate::store::{tag_name, ImageStore, Progress};

/// Tuning of the swarm download.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Requests in flight per provider.
    pub per_provider: usize,
    /// Parts asked for in one request (adjacent disk chunks go together, so a run of small
    /// parts costs one request, not one each).
    pub batch: usize,
    /// Parts up to this size are received into memory and added in one step (no partial
    /// file on disk); larger parts stream into the store and can resume.
    pub batch_part_max: u64,
    /// Time allowed for one part from one provider before it moves elsewhere.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Consecutive failures after which a provider is dropped.
    pub max_failures: u32,
    /// Pause before asking again for a part that every live provider lacked.
    pub missing_retry: Duration,
    /// Give up on a part that every live provider has lacked for this long.
    pub missing_give_up: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            per_provider: 4,
            batch: 16,
            batch_part_max: 1 << 20,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_failures: 3,
            missing_retry: Duration::from_millis(500),
            missing_give_up: Duration::from_secs(20),
        }
    }
}

/// What one provider contributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStats {
    pub id: EndpointId,
    /// Payload bytes received from it.
    pub bytes: u64,
    /// Parts completed from it.
    pub parts: u64,
    /// Why it was dropped, if it was.
    pub dropped: Option<String>,
}

/// What a fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchStats {
    pub hash: Hash,
    /// Payload bytes received over the network.
    pub bytes_transferred: u64,
    /// Parts (blobs) in the image, and how many were already local.
    pub parts: usize,
    pub parts_already_local: usize,
    pub providers: Vec<ProviderStats>,
    pub elapsed: Duration,
    /// True when this call joined a fetch of the same image already running.
    pub joined: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum FetchState {
    Running(Progress),
    Done(Result<FetchStats, FetchError>),
}

impl ImageStore {
    /// Fetches image `hash` from `providers`, splitting its parts among them, and pins it.
    /// Concurrent calls for the same image share one download. Does not materialise.
    pub async fn fetch(
        &self,
        hash: Hash,
        providers: Vec<EndpointAddr>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<FetchStats, FetchError> {
        let (mut rx, joined) = {
            let mut map = self.inner.fetches.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&hash) {
                Some(rx) => (rx.clone(), true),
                None => {
                    let (tx, rx) = watch::channel(FetchState::Running(Progress::default()));
                    map.insert(hash, rx.clone());
                    let me = self.clone();
                    let span = info_span!("image_fetch", image = %hash.fmt_short());
                    tokio::spawn(
                        async move {
                            let res = me.fetch_inner(hash, providers, &tx).await;
                            if let Err(e) = &res {
                                warn!("fetch failed: {e}");
                            }
                            me.inner.fetches.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
                            tx.send_replace(FetchState::Done(res));
                        }
                        .instrument(span),
                    );
                    (rx, false)
                }
            }
        };
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                FetchState::Running(p) => progress(p),
                FetchState::Done(r) => {
                    return r.map(|mut s| {
                        s.joined = joined;
                        s
                    })
                }
            }
            if rx.changed().await.is_err() {
                let state = rx.borrow().clone();
                return match state {
                    FetchState::Done(r) => r,
                    FetchState::Running(_) => Err(FetchError::ShuttingDown),
                };
            }
        }
    }

    async fn fetch_inner(
        &self,
        hash: Hash,
        providers: Vec<EndpointAddr>,
        tx: &watch::Sender<FetchState>,
    ) -> Result<FetchStats, FetchError> {
        let _op = self.inner.op_lock.read().await;
        let start = Instant::now();
        self.inner.gc.protected.lock().unwrap_or_else(|e| e.into_inner()).insert(hash);
        let res = self.fetch_phases(hash, providers, tx, start).await;
        self.inner.gc.protected.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
        if let Err(FetchError::DiskFull { .. }) = &res {
            // Drop the partial image so its data can be collected.
            let _ = self.inner.store.tags().delete(tag_name(&hash)).await;
            drop(_op);
            let _ = self.collect_blobs().await;
        }
        res
    }

    async fn fetch_phases(
        &self,
        hash: Hash,
        providers: Vec<EndpointAddr>,
        tx: &watch::Sender<FetchState>,
        start: Instant,
    ) -> Result<FetchStats, FetchError> {
        let bad = |reason: String| FetchError::BadImage { hash, reason };
        let mut swarm = Swarm::new(self.clone(), hash, providers, tx.clone());
        // 1. Root, manifest and chunk list (small), then validate before pinning.
        swarm.fetch_set(vec![hash]).await?;
        let root = self.read_root(hash).await.map_err(bad)?;
        swarm.fetch_set(vec![root[0]]).await?;
        let mbytes = self.read_small(root[0], MAX_MANIFEST_SIZE).await.map_err(bad)?;
        let manifest = Manifest::decode(&mbytes).map_err(|source| FetchError::Manifest { hash, source })?;
        let mut expected: HashSet<Hash> = manifest.direct_parts().into_iter().collect();
        if let Image::Bundle(b) = manifest.image() {
            if let Some(d) = &b.disk {
                swarm.fetch_set(vec![d.chunks]).await?;
                let cb = self.read_small(d.chunks, MAX_HASH_SEQ_SIZE).await.map_err(bad)?;
                let seq = iroh_blobs::hashseq::HashSeq::new(cb).ok_or_else(|| bad("chunk list is not a hash sequence".into()))?;
                if seq.len() as u64 != d.chunk_count {
                    return Err(bad(format!("chunk list has {} chunks, manifest says {}", seq.len(), d.chunk_count)));
                }
                expected.extend(seq.iter());
            }
        }
        let children: HashSet<Hash> = root[1..].iter().copied().collect();
        if children.len() != root.len() - 1 || children != expected || expected.contains(&root[0]) {
            return Err(bad("root does not list exactly the parts its manifest names".into()));
        }
        self.inner
            .store
            .tags()
            .set(tag_name(&hash), HashAndFormat::hash_seq(hash))
            .await
            .map_err(|e| FetchError::Store { hash, detail: e.to_string() })?;
        swarm.total = manifest.parts_size() + mbytes.len() as u64 + (root.len() * 32) as u64;
        // 2. Every part, from every provider.
        let parts: Vec<Hash> = root[1..].to_vec();
        swarm.fetch_set(parts).await?;
        if !self.is_complete(hash).await {
            return Err(bad("image is still incomplete after fetching every part".into()));
        }
        // Parts received in memory were written without an fsync each; one syncfs makes the
        // whole image durable before anyone is told it is here.
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || sync_fs(&dir))
            .await
            .map_err(|e| FetchError::Store { hash, detail: format!("sync task: {e}") })?
            .map_err(|e| {
                if crate::error::is_disk_full(&e) {
                    FetchError::DiskFull { hash, dir: self.inner.dir.clone() }
                } else {
                    FetchError::Store { hash, detail: format!("syncing {}: {e}", self.inner.dir.display()) }
                }
            })?;
        let stats = FetchStats {
            hash,
            bytes_transferred: swarm.transferred.load(Ordering::Relaxed),
            parts: root.len() - 1,
            parts_already_local: swarm.already_local,
            providers: swarm
                .providers
                .iter()
                .map(|p| ProviderStats { id: p.addr.id, bytes: p.bytes, parts: p.parts, dropped: p.dropped.clone() })
                .collect(),
            elapsed: start.elapsed(),
            joined: false,
        };
        info!(bytes = stats.bytes_transferred, parts = stats.parts, ms = stats.elapsed.as_millis() as u64, "image fetched");
        Ok(stats)
    }
}

struct ProviderState {
    addr: EndpointAddr,
    conn: Option<Connection>,
    inflight: usize,
    failures: u32,
    dropped: Option<String>,
    bytes: u64,
    parts: u64,
}

enum Outcome {
    Complete { bytes: u64 },
    /// The provider does not have (all of) it.
    Lacked,
    /// Data did not verify.
    Corrupt(String),
    /// Connection or request failed or timed out.
    Failed(String),
    /// Over `batch_part_max`: to be fetched on its own, streaming to disk.
    TooLarge,
}

/// Provider index, its connection if still usable, the parts settled (with how), and the
/// parts the request never reached.
type BatchResult = (usize, Option<Connection>, Vec<(Hash, Outcome)>, Vec<Hash>);

struct Swarm {
    images: ImageStore,
    hash: Hash,
    providers: Vec<ProviderState>,
    tx: watch::Sender<FetchState>,
    transferred: Arc<AtomicU64>,
    local_done: u64,
    total: u64,
    already_local: usize,
}

impl Swarm {
    fn new(images: ImageStore, hash: Hash, mut addrs: Vec<EndpointAddr>, tx: watch::Sender<FetchState>) -> Self {
        // One entry per endpoint; order shuffled so that many fetchers spread their load.
        let mut seen = HashSet::new();
        addrs.retain(|a| seen.insert(a.id) && a.id != images.inner.endpoint.id());
        addrs.shuffle(&mut rand::rng());
        let providers = addrs
            .into_iter()
            .map(|addr| ProviderState { addr, conn: None, inflight: 0, failures: 0, dropped: None, bytes: 0, parts: 0 })
            .collect();
        Self { images, hash, providers, tx, transferred: Arc::new(AtomicU64::new(0)), local_done: 0, total: 0, already_local: 0 }
    }

    fn publish(&self) {
        let done = self.local_done + self.transferred.load(Ordering::Relaxed);
        let total = self.total.max(done);
        self.tx.send_replace(FetchState::Running(Progress { done, total }));
    }

    fn reasons(&self) -> String {
        if self.providers.is_empty() {
            return "no providers".into();
        }
        self.providers
            .iter()
            .map(|p| format!("{}: {}", p.addr.id.fmt_short(), p.dropped.as_deref().unwrap_or("lacked parts")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Dials every live provider without a connection, concurrently (one connection each,
    /// shared by all its requests).
    async fn connect_all(&mut self, endpoint: &iroh::Endpoint, opts: &FetchOptions) {
        let mut set = JoinSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if p.dropped.is_none() && p.conn.as_ref().is_none_or(|c| c.close_reason().is_some()) {
                let ep = endpoint.clone();
                let addr = p.addr.clone();
                let t = opts.connect_timeout;
                set.spawn(async move { (i, tokio::time::timeout(t, ep.connect(addr, iroh_blobs::ALPN)).await) });
            }
        }
        while let Some(Ok((i, res))) = set.join_next().await {
            let p = &mut self.providers[i];
            match res {
                Ok(Ok(c)) => p.conn = Some(c),
                Ok(Err(e)) => {
                    p.failures += 1;
                    debug!(provider = %p.addr.id.fmt_short(), "connect failed: {e}");
                }
                Err(_) => p.failures += 1,
            }
            if p.failures >= opts.max_failures {
                p.dropped = Some(format!("unreachable after {} attempts", p.failures));
            }
        }
    }

    /// Fetches every hash in `hashes` that is not complete locally.
    async fn fetch_set(&mut self, hashes: Vec<Hash>) -> Result<(), FetchError> {
        let hash = self.hash;
        let store = self.images.inner.store.clone();
        let mut queue = VecDeque::new();
        for h in hashes {
            match store.blobs().status(h).await {
                Ok(BlobStatus::Complete { size }) => {
                    self.already_local += 1;
                    self.local_done += size;
                }
                Ok(_) => queue.push_back(h),
                Err(e) => return Err(FetchError::Store { hash, detail: e.to_string() }),
            }
        }
        if queue.is_empty() {
            return Ok(());
        }
        if self.providers.is_empty() {
            return Err(FetchError::NoProviders(hash));
        }
        let total = queue.len();
        let opts = self.images.inner.opts.fetch.clone();
        let endpoint = self.images.inner.endpoint.clone();
        self.connect_all(&endpoint, &opts).await;
        let mut lacked: HashMap<Hash, HashSet<usize>> = HashMap::new();
        let mut all_lacked_since: HashMap<Hash, Instant> = HashMap::new();
        let mut waiting: Vec<(Instant, Hash)> = Vec::new();
        let mut failed_parts: Vec<Hash> = Vec::new();
        // Parts found too large to receive in memory: fetched one per request, streaming.
        let mut large: HashSet<Hash> = HashSet::new();
        let mut tasks: JoinSet<BatchResult> = JoinSet::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        loop {
            // Move parts whose retry time has come back to the queue.
            let now = Instant::now();
            waiting.retain(|(t, h)| {
                if *t <= now {
                    queue.push_back(*h);
                    false
                } else {
                    true
                }
            });
            // Hand out parts to providers with free slots.
            let mut deferred = VecDeque::new();
            while let Some(h) = queue.pop_front() {
                let live: Vec<usize> = (0..self.providers.len()).filter(|i| self.providers[*i].dropped.is_none()).collect();
                if live.is_empty() {
                    failed_parts.push(h);
                    failed_parts.extend(queue.drain(..));
                    break;
                }
                let l = lacked.entry(h).or_default();
                let candidates: Vec<usize> = live.iter().copied().filter(|i| !l.contains(i)).collect();
                if candidates.is_empty() {
                    let since = *all_lacked_since.entry(h).or_insert(now);
                    if now.duration_since(since) > opts.missing_give_up {
                        failed_parts.push(h);
                    } else {
                        l.clear();
                        waiting.push((now + opts.missing_retry, h));
                    }
                    continue;
                }
                let best = candidates
                    .iter()
                    .copied()
                    .filter(|i| self.providers[*i].inflight < opts.per_provider)
                    .min_by_key(|i| (self.providers[*i].inflight, self.providers[*i].failures));
                let Some(p) = best else {
                    deferred.push_back(h);
                    // Every candidate is busy; if all providers are busy, stop handing out.
                    if live.iter().all(|i| self.providers[*i].inflight >= opts.per_provider) {
                        break;
                    }
                    continue;
                };
                // Adjacent parts this provider may serve ride along in the same request.
                let mut batch = vec![h];
                if !large.contains(&h) {
                    let mut i = 0;
                    let scan = queue.len().min(opts.batch * 4);
                    while batch.len() < opts.batch && i < scan.min(queue.len()) {
                        let c = queue[i];
                        if !large.contains(&c) && !lacked.get(&c).is_some_and(|l| l.contains(&p)) {
                            batch.push(c);
                            queue.remove(i);
                        } else {
                            i += 1;
                        }
                    }
                }
                let prov = &mut self.providers[p];
                prov.inflight += 1;
                let conn = prov.conn.clone();
                let addr = prov.addr.clone();
                let endpoint = endpoint.clone();
                let store = store.clone();
                let counter = self.transferred.clone();
                let opts = opts.clone();
                let single = large.contains(&h);
                tasks.spawn(async move {
                    let (conn, done, untouched) = if single {
                        let (conn, outcome) = fetch_one(&endpoint, &store, addr, conn, h, &counter, &opts).await;
                        (conn, vec![(h, outcome)], Vec::new())
                    } else {
                        fetch_batch(&endpoint, &store, addr, conn, batch, &counter, &opts).await
                    };
                    (p, conn, done, untouched)
                });
            }
            deferred.extend(queue.drain(..));
            queue = deferred;
            if tasks.is_empty() && queue.is_empty() && waiting.is_empty() {
                break;
            }
            tokio::select! {
                joined = tasks.join_next(), if !tasks.is_empty() => {
                    let Some(joined) = joined else { continue };
                    let (p, conn, done, untouched) = match joined {
                        Ok(x) => x,
                        Err(e) => return Err(FetchError::Store { hash, detail: format!("fetch task failed: {e}") }),
                    };
                    let prov = &mut self.providers[p];
                    prov.inflight -= 1;
                    if conn.is_some() {
                        prov.conn = conn;
                    }
                    // Parts the request never reached go back to the front, in order.
                    for h in untouched.into_iter().rev() {
                        queue.push_front(h);
                    }
                    for (h, outcome) in done {
                        match outcome {
                            Outcome::Complete { bytes } => {
                                prov.failures = 0;
                                prov.bytes += bytes;
                                prov.parts += 1;
                            }
                            Outcome::TooLarge => {
                                large.insert(h);
                                queue.push_front(h);
                            }
                            Outcome::Lacked => {
                                debug!(provider = %prov.addr.id.fmt_short(), part = %h.fmt_short(), "provider lacks part");
                                lacked.entry(h).or_default().insert(p);
                                queue.push_back(h);
                            }
                            Outcome::Corrupt(why) => {
                                warn!(provider = %prov.addr.id.fmt_short(), part = %h.fmt_short(), "dropping provider: sent data that does not verify ({why})");
                                prov.dropped = Some(format!("sent corrupt data for {}", h.fmt_short()));
                                prov.conn = None;
                                queue.push_back(h);
                            }
                            Outcome::Failed(why) => {
                                if is_disk_full_msg(&why) {
                                    return Err(FetchError::DiskFull { hash, dir: self.images.inner.dir.clone() });
                                }
                                prov.failures += 1;
                                prov.conn = None;
                                debug!(provider = %prov.addr.id.fmt_short(), failures = prov.failures, "request failed: {why}");
                                if prov.failures >= opts.max_failures {
                                    warn!(provider = %prov.addr.id.fmt_short(), "dropping provider after {} failures: {why}", prov.failures);
                                    prov.dropped = Some(format!("failed {} times: {why}", prov.failures));
                                }
                                queue.push_back(h);
                            }
                        }
                    }
                    self.publish();
                }
                _ = ticker.tick() => self.publish(),
            }
        }
        if !failed_parts.is_empty() {
            return Err(FetchError::Unavailable { hash, missing: failed_parts.len(), total, reasons: self.reasons() });
        }
        Ok(())
    }
}

/// The cached connection if it is still open, else a new one.
async fn usable(endpoint: &iroh::Endpoint, addr: EndpointAddr, conn: Option<Connection>, opts: &FetchOptions) -> Result<Connection, String> {
    match conn {
        Some(c) if c.close_reason().is_none() => Ok(c),
        _ => match tokio::time::timeout(opts.connect_timeout, endpoint.connect(addr, iroh_blobs::ALPN)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err("connect timed out".into()),
        },
    }
}

/// Fetches a run of parts from one provider in one request (iroh-blobs `GetMany`). Each
/// part is BLAKE3-verified as it arrives (16 KiB groups), held in memory (at most
/// `batch_part_max`) and added to the store complete, so a small part costs no partial
/// file, outboard file or fsync on disk. Returns the connection if still usable, the
/// parts settled, and the parts the request never reached.
async fn fetch_batch(
    endpoint: &iroh::Endpoint,
    store: &iroh_blobs::api::Store,
    addr: EndpointAddr,
    conn: Option<Connection>,
    hashes: Vec<Hash>,
    counter: &AtomicU64,
    opts: &FetchOptions,
) -> (Option<Connection>, Vec<(Hash, Outcome)>, Vec<Hash>) {
    use iroh_blobs::get::fsm::{self, BlobContentNext, DecodeError, EndBlobNext};
    use iroh_blobs::protocol::{ChunkRangesSeq, GetManyRequest};

    let conn = match usable(endpoint, addr, conn, opts).await {
        Ok(c) => c,
        Err(why) => {
            let mut rest = hashes;
            let first = rest.remove(0);
            return (None, vec![(first, Outcome::Failed(why))], rest);
        }
    };
    let mut done: Vec<(Hash, Outcome)> = Vec::with_capacity(hashes.len());
    let work = async {
        let request = GetManyRequest { hashes: hashes.clone(), ranges: ChunkRangesSeq::all() };
        let mut next = match fsm::start_get_many(conn.clone(), request, Default::default()).await {
            Ok(Ok(child)) => child,
            Ok(Err(_closing)) => return,
            Err(e) => {
                done.push((hashes[0], Outcome::Failed(format!("request: {e}"))));
                return;
            }
        };
        loop {
            let Some(&hash) = hashes.get(next.offset() as usize) else { return };
            let (mut content, size) = match next.next(hash).next().await {
                Ok(x) => x,
                // The provider ends the stream at a part it does not have.
                Err(e) if conn.close_reason().is_none() && matches!(e, fsm::AtBlobHeaderNextError::NotFound { .. }) => {
                    done.push((hash, Outcome::Lacked));
                    return;
                }
                Err(e) => {
                    done.push((hash, Outcome::Failed(format!("reading size: {e}"))));
                    return;
                }
            };
            if size > opts.batch_part_max {
                done.push((hash, Outcome::TooLarge));
                return;
            }
            // The size is not verified until the last group arrives, but every byte kept is.
            let mut data = Vec::with_capacity(size as usize);
            let end = loop {
                match content.next().await {
                    BlobContentNext::More((c, item)) => {
                        match item {
                            Ok(bao_tree::io::fsm::BaoContentItem::Leaf(leaf)) => {
                                counter.fetch_add(leaf.data.len() as u64, Ordering::Relaxed);
                                data.extend_from_slice(&leaf.data);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let outcome = match e {
                                    DecodeError::ParentHashMismatch { .. } | DecodeError::LeafHashMismatch { .. } => Outcome::Corrupt(e.to_string()),
                                    DecodeError::ChunkNotFound { .. } | DecodeError::LeafNotFound { .. } | DecodeError::ParentNotFound { .. }
                                        if conn.close_reason().is_none() =>
                                    {
                                        Outcome::Lacked
                                    }
                                    _ => Outcome::Failed(e.to_string()),
                                };
                                done.push((hash, outcome));
                                return;
                            }
                        }
                        content = c;
                    }
                    BlobContentNext::Done(end) => break end,
                }
            };
            let len = data.len() as u64;
            let outcome = match store.add_bytes(bytes::Bytes::from(data)).temp_tag().await {
                // Pinned by the image's tag, set before any part is fetched.
                Ok(tt) if tt.hash() == hash => Outcome::Complete { bytes: len },
                Ok(tt) => Outcome::Corrupt(format!("received data hashes to {}", tt.hash().fmt_short())),
                Err(e) => Outcome::Failed(format!("local store: {e}")),
            };
            let stop = !matches!(outcome, Outcome::Complete { .. });
            done.push((hash, outcome));
            if stop {
                return;
            }
            next = match end.next() {
                EndBlobNext::MoreChildren(c) => c,
                EndBlobNext::Closing(closing) => {
                    let _ = closing.next().await;
                    return;
                }
            };
        }
    };
    if tokio::time::timeout(opts.request_timeout, work).await.is_err() {
        let at = hashes.get(done.len()).copied();
        if let Some(h) = at {
            done.push((h, Outcome::Failed(format!("no complete answer within {:?}", opts.request_timeout))));
        }
    }
    let untouched = hashes[done.len().min(hashes.len())..].to_vec();
    let keep = done.iter().all(|(_, o)| matches!(o, Outcome::Complete { .. } | Outcome::Lacked | Outcome::TooLarge));
    (keep.then_some(conn), done, untouched)
}

/// Fetches one blob from one provider. Returns the (possibly new) connection.
async fn fetch_one(
    endpoint: &iroh::Endpoint,
    store: &iroh_blobs::api::Store,
    addr: EndpointAddr,
    conn: Option<Connection>,
    hash: Hash,
    counter: &AtomicU64,
    opts: &FetchOptions,
) -> (Option<Connection>, Outcome) {
    let conn = match usable(endpoint, addr, conn, opts).await {
        Ok(c) => c,
        Err(why) => return (None, Outcome::Failed(why)),
    };
    let mut stream = Box::pin(store.remote().fetch(conn.clone(), HashAndFormat::raw(hash)).stream());
    let mut last = 0u64;
    let work = async {
        while let Some(item) = stream.next().await {
            match item {
                GetProgressItem::Progress(n) => {
                    counter.fetch_add(n.saturating_sub(last), Ordering::Relaxed);
                    last = n.max(last);
                }
                GetProgressItem::Done(stats) => return Ok(stats.payload_bytes_read),
                GetProgressItem::Error(e) => return Err(e),
            }
        }
        Ok(last)
    };
    let res = tokio::time::timeout(opts.request_timeout, work).await;
    let outcome = match res {
        Err(_) => Outcome::Failed(format!("no complete answer within {:?}", opts.request_timeout)),
        Ok(Ok(bytes)) => match store.blobs().status(hash).await {
            Ok(BlobStatus::Complete { .. }) => Outcome::Complete { bytes },
            Ok(_) => Outcome::Lacked,
            Err(e) => Outcome::Failed(format!("local store: {e}")),
        },
        Ok(Err(e)) => {
            let dbg = format!("{e} {e:?}");
            let lower = dbg.to_lowercase();
            if lower.contains("hashmismatch") || lower.contains("hash mismatch") {
                Outcome::Corrupt(e.to_string())
            } else if conn.close_reason().is_some() {
                Outcome::Failed(format!("connection closed: {e}"))
            } else if dbg.contains("NotFound") {
                Outcome::Lacked
            } else if is_disk_full_msg(&dbg) {
                Outcome::Failed(dbg)
            } else {
                Outcome::Failed(e.to_string())
            }
        }
    };
    let keep = match &outcome {
        Outcome::Failed(_) | Outcome::Corrupt(_) => None,
        _ => Some(conn),
    };
    (keep, outcome)
}

/// Flushes every dirty page of the filesystem holding `dir` (one `syncfs(2)`).
#[allow(unsafe_code)]
fn sync_fs(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
