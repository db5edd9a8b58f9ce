//! Swarm download of an image from several providers.
//!
//! iroh-blobs 0.104's `Downloader` splits a hash sequence across providers only by trying
//! them in a (shuffled) order per child, and moves work only on failure. This scheduler
//! hands out runs of adjacent parts, one request (`GetMany`) per run, each provider with a
//! bounded number of requests in flight, so a fast provider takes more, a slow one fewer.
//! Every byte is BLAKE3-verified as it arrives (16 KiB groups). Small parts are received in
//! memory and added complete; large ones stream into the store through `Remote::fetch`,
//! which resumes from what is already local.
//!
//! Failures: a part whose request fails or times out goes back for another provider; a
//! provider that sends data that does not verify is dropped at once; one that fails
//! repeatedly is dropped; one that lacks a part (it is still fetching) is paused briefly
//! and asked where it fetches first (see `Swarm::fetch_set`).

use std::collections::{BTreeSet, HashSet};
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
    /// Pause before asking a provider again after it lacked a part; doubles on repeated
    /// lacks, up to 8 times this.
    pub missing_retry: Duration,
    /// Give up when no byte has arrived from any provider for this long.
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
            missing_retry: Duration::from_millis(100),
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
    /// Requests to it that failed (refused, broken off, or data that did not verify).
    pub failures: u32,
    /// Times it was asked for a part and sent none of it: it does not have the part yet, or
    /// (a holder whose stored copy went bad) it would not send bytes that fail its own check.
    pub lacked: u32,
    /// Why it was dropped, if it was.
    pub dropped: Option<String>,
}

impl std::fmt::Display for ProviderStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} parts, {} bytes", self.id.fmt_short(), self.parts, self.bytes)?;
        if self.failures > 0 {
            write!(f, ", {} failed requests", self.failures)?;
        }
        if self.lacked > 0 {
            write!(f, ", lacked parts {} times", self.lacked)?;
        }
        if let Some(why) = &self.dropped {
            write!(f, ", dropped ({why})")?;
        }
        Ok(())
    }
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
                            me.inner
                                .fetches
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&hash);
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
        self.inner
            .gc
            .protected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash);
        let res = self.fetch_phases(hash, providers, tx, start).await;
        self.inner
            .gc
            .protected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&hash);
        if let Err(FetchError::DiskFull { .. }) = &res {
            // Drop the partial image so its data can be collected. The reserve makes room
            // for the store's database to record the deletions; it is taken again after.
            crate::store::release_space(&self.inner.dir).await;
            let _ = self.inner.store.tags().delete(tag_name(&hash)).await;
            drop(_op);
            // Twice: a run that failed (the disk filled again under it) counts as finished
            // all the same, and the next one deletes what it left.
            for _ in 0..2 {
                let _ = self.collect_blobs().await;
            }
            let _ = crate::store::reserve_space(&self.inner.dir).await;
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
        let mbytes = self
            .read_small(root[0], MAX_MANIFEST_SIZE)
            .await
            .map_err(bad)?;
        let manifest =
            Manifest::decode(&mbytes).map_err(|source| FetchError::Manifest { hash, source })?;
        let mut expected: HashSet<Hash> = manifest.direct_parts().into_iter().collect();
        if let Image::Bundle(b) = manifest.image() {
            if let Some(d) = &b.disk {
                swarm.fetch_set(vec![d.chunks]).await?;
                let cb = self
                    .read_small(d.chunks, MAX_HASH_SEQ_SIZE)
                    .await
                    .map_err(bad)?;
                let seq = iroh_blobs::hashseq::HashSeq::new(cb)
                    .ok_or_else(|| bad("chunk list is not a hash sequence".into()))?;
                if seq.len() as u64 != d.chunk_count {
                    return Err(bad(format!(
                        "chunk list has {} chunks, manifest says {}",
                        seq.len(),
                        d.chunk_count
                    )));
                }
                expected.extend(seq.iter());
            }
        }
        let children: HashSet<Hash> = root[1..].iter().copied().collect();
        if children.len() != root.len() - 1 || children != expected || expected.contains(&root[0]) {
            return Err(bad(
                "root does not list exactly the parts its manifest names".into(),
            ));
        }
        self.inner
            .store
            .tags()
            .set(tag_name(&hash), HashAndFormat::hash_seq(hash))
            .await
            .map_err(|e| FetchError::Store {
                hash,
                detail: e.to_string(),
            })?;
        swarm.total = manifest.parts_size() + mbytes.len() as u64 + (root.len() * 32) as u64;
        // 2. Every part, from every provider.
        let parts: Vec<Hash> = root[1..].to_vec();
        swarm.fetch_set(parts).await?;
        if !self.is_complete(hash).await {
            return Err(bad(
                "image is still incomplete after fetching every part".into()
            ));
        }
        // Parts received in memory were written without an fsync each; one syncfs makes the
        // whole image durable before anyone is told it is here.
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || sync_fs(&dir))
            .await
            .map_err(|e| FetchError::Store {
                hash,
                detail: format!("sync task: {e}"),
            })?
            .map_err(|e| {
                if crate::error::is_disk_full(&e) {
                    FetchError::DiskFull {
                        hash,
                        dir: self.inner.dir.clone(),
                    }
                } else {
                    FetchError::Store {
                        hash,
                        detail: format!("syncing {}: {e}", self.inner.dir.display()),
                    }
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
                .map(|p| ProviderStats {
                    id: p.addr.id,
                    bytes: p.bytes,
                    parts: p.parts,
                    failures: p.failures,
                    lacked: p.lacked,
                    dropped: p.dropped.clone(),
                })
                .collect(),
            elapsed: start.elapsed(),
            joined: false,
        };
        info!(
            bytes = stats.bytes_transferred,
            parts = stats.parts,
            ms = stats.elapsed.as_millis() as u64,
            providers = %stats.providers.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            "image fetched"
        );
        Ok(stats)
    }
}

struct ProviderState {
    addr: EndpointAddr,
    conn: Option<Connection>,
    inflight: usize,
    /// When it first lacked a part: from then on it counts as fetching too (see
    /// `fetch_set`).
    partial_since: Option<Instant>,
    /// Some request to it has ended (served, lacked or failed).
    answered: bool,
    /// Not asked again before this (it lacked a part); `pause` is the current length.
    paused_until: Instant,
    pause: Duration,
    failures: u32,
    lacked: u32,
    dropped: Option<String>,
    bytes: u64,
    parts: u64,
}

impl ProviderState {
    /// Lacked a part at least once.
    fn partial(&self) -> bool {
        self.partial_since.is_some()
    }
}

enum Outcome {
    Complete {
        bytes: u64,
    },
    /// The provider does not have (all of) it.
    Lacked,
    /// Data did not verify.
    Corrupt(String),
    /// Connection or request failed or timed out.
    Failed(String),
    /// Over `batch_part_max`: to be fetched on its own, streaming to disk.
    TooLarge,
}

/// Provider index, its connection if still usable, the parts settled (with how, in request
/// order), and the part indices asked for (in request order; those past the settled ones
/// were never reached).
type BatchResult = (usize, Option<Connection>, Vec<(Hash, Outcome)>, Vec<usize>);

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
    fn new(
        images: ImageStore,
        hash: Hash,
        mut addrs: Vec<EndpointAddr>,
        tx: watch::Sender<FetchState>,
    ) -> Self {
        // One entry per endpoint; order shuffled so that many fetchers spread their load.
        let mut seen = HashSet::new();
        addrs.retain(|a| seen.insert(a.id) && a.id != images.inner.endpoint.id());
        addrs.shuffle(&mut rand::rng());
        let providers = addrs
            .into_iter()
            .map(|addr| ProviderState {
                addr,
                conn: None,
                inflight: 0,
                partial_since: None,
                answered: false,
                paused_until: Instant::now(),
                pause: Duration::ZERO,
                failures: 0,
                lacked: 0,
                dropped: None,
                bytes: 0,
                parts: 0,
            })
            .collect();
        Self {
            images,
            hash,
            providers,
            tx,
            transferred: Arc::new(AtomicU64::new(0)),
            local_done: 0,
            total: 0,
            already_local: 0,
        }
    }

    fn publish(&self) {
        let done = self.local_done + self.transferred.load(Ordering::Relaxed);
        let total = self.total.max(done);
        self.tx
            .send_replace(FetchState::Running(Progress { done, total }));
    }

    fn reasons(&self) -> String {
        if self.providers.is_empty() {
            return "no providers".into();
        }
        self.providers
            .iter()
            .map(|p| {
                format!(
                    "{}: {}",
                    p.addr.id.fmt_short(),
                    p.dropped.as_deref().unwrap_or("lacked parts")
                )
            })
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
                let opts = opts.clone();
                set.spawn(async move { (i, usable(&ep, addr, None, &opts).await) });
            }
        }
        while let Some(Ok((i, res))) = set.join_next().await {
            let p = &mut self.providers[i];
            match res {
                Ok(c) => p.conn = Some(c),
                Err(why) => {
                    p.failures += 1;
                    debug!(provider = %p.addr.id.fmt_short(), "{why}");
                }
            }
            if p.failures >= opts.max_failures {
                p.dropped = Some(format!("unreachable after {} attempts", p.failures));
            }
        }
    }

    /// Fetches every hash in `hashes` that is not complete locally.
    ///
    /// Parts are handed out by index. This node and the providers that are fetching too (they
    /// lacked a part) split the parts into equal regions, in id order, so every fetcher
    /// computes the same ones without talking. A provider that has everything (a seed, until
    /// it lacks something) is asked for this node's own region; a fellow fetcher is asked for
    /// its region, which it fetches first, so what it just received is passed on at once.
    /// A provider that lacks a part is paused briefly (doubling on repeats), not dropped.
    async fn fetch_set(&mut self, hashes: Vec<Hash>) -> Result<(), FetchError> {
        let hash = self.hash;
        let store = self.images.inner.store.clone();
        let mut parts = Vec::new();
        for h in hashes {
            match store.blobs().status(h).await {
                Ok(BlobStatus::Complete { size }) => {
                    self.already_local += 1;
                    self.local_done += size;
                }
                Ok(_) => parts.push(h),
                Err(e) => {
                    return Err(FetchError::Store {
                        hash,
                        detail: e.to_string(),
                    })
                }
            }
        }
        if parts.is_empty() {
            return Ok(());
        }
        if self.providers.is_empty() {
            return Err(FetchError::NoProviders(hash));
        }
        let n = parts.len();
        let opts = self.images.inner.opts.fetch.clone();
        let endpoint = self.images.inner.endpoint.clone();
        self.connect_all(&endpoint, &opts).await;
        let me = endpoint.id();
        let mut need: BTreeSet<usize> = (0..n).collect();
        // Parts found too large to receive in memory: fetched one per request, streaming.
        let mut large: HashSet<usize> = HashSet::new();
        let mut tasks: JoinSet<BatchResult> = JoinSet::new();
        // First parts of requests to seeds for other fetchers' regions, in flight.
        let mut steals: HashSet<usize> = HashSet::new();
        // The same for requests to seeds for our own region.
        let mut own_requests: HashSet<usize> = HashSet::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        let mut last_progress = Instant::now();
        let mut last_bytes = self.transferred.load(Ordering::Relaxed);
        let max_pause = opts.missing_retry * 8;
        loop {
            let now = Instant::now();
            // Hand out runs of parts to providers with free slots, least busy first.
            while !need.is_empty() {
                // Who fetches this image too, as far as this node can tell: providers that
                // lacked a part and have served one, or lacked one only lately. With this
                // node, in id order, they split the parts into equal regions; each fetches
                // its region from seeds first, and the others take it from them.
                let fetching = |q: &ProviderState| {
                    q.dropped.is_none()
                        && q.partial_since
                            .is_some_and(|t| q.parts > 0 || now.duration_since(t) < IDLE_AFTER)
                };
                let mut ring: Vec<EndpointId> = self
                    .providers
                    .iter()
                    .filter(|q| fetching(q))
                    .map(|q| q.addr.id)
                    .collect();
                ring.push(me);
                ring.sort_unstable();
                // Alone (so far), start at a place of our own so that fetchers starting
                // together do not all ask a seed for the same first parts.
                let start_of = |id: &EndpointId| {
                    if ring.len() == 1 {
                        return Some(offset(id, &hash, n));
                    }
                    ring.iter()
                        .position(|x| x == id)
                        .map(|k| k * n / ring.len())
                };
                // Until every provider has answered once, nobody knows the regions yet: one
                // request per seed. A fetching provider has little to give: one request.
                let learning = self
                    .providers
                    .iter()
                    .any(|q| q.dropped.is_none() && !q.answered);
                let slots = |q: &ProviderState| {
                    if q.partial() || learning {
                        1
                    } else {
                        opts.per_provider
                    }
                };
                let Some(p) = (0..self.providers.len())
                    .filter(|i| {
                        let pr = &self.providers[*i];
                        pr.dropped.is_none() && pr.inflight < slots(pr) && pr.paused_until <= now
                    })
                    .min_by_key(|i| (self.providers[*i].inflight, self.providers[*i].failures))
                else {
                    break;
                };
                let (batch, stolen) = if self.providers[p].partial() {
                    let id = self.providers[p].addr.id;
                    (
                        pick_from(
                            &need,
                            &large,
                            start_of(&id).unwrap_or_else(|| offset(&id, &hash, n)),
                            opts.batch,
                        ),
                        false,
                    )
                } else {
                    let mine = start_of(&me).unwrap_or(0);
                    let others: Vec<usize> = ring
                        .iter()
                        .filter(|id| **id != me)
                        .filter_map(start_of)
                        .collect();
                    // Help with others' regions only while none of them has anything for us,
                    // one request at a time: a seed's uplink is the scarcest thing here.
                    let may_steal = steals.is_empty()
                        && own_requests.is_empty()
                        && self
                            .providers
                            .iter()
                            .filter(|q| fetching(q))
                            .all(|q| q.paused_until > now);
                    // While learning, one part per request: little is wasted if the regions
                    // turn out different.
                    let max = if learning { 1 } else { opts.batch };
                    pick_for_seed(&need, &large, n, mine, &others, max, may_steal)
                };
                if batch.is_empty() {
                    // Nothing for this provider now; others may still have work.
                    self.providers[p].paused_until = now + opts.missing_retry;
                    continue;
                }
                if stolen {
                    steals.insert(batch[0]);
                } else if !self.providers[p].partial() {
                    own_requests.insert(batch[0]);
                }
                for i in &batch {
                    need.remove(i);
                }
                let prov = &mut self.providers[p];
                prov.inflight += 1;
                let conn = prov.conn.clone();
                let addr = prov.addr.clone();
                let endpoint = endpoint.clone();
                let store = store.clone();
                let counter = self.transferred.clone();
                let opts = opts.clone();
                let hashes: Vec<Hash> = batch.iter().map(|i| parts[*i]).collect();
                let single = large.contains(&batch[0]);
                tasks.spawn(async move {
                    let (conn, done) = if single {
                        let (conn, outcome) =
                            fetch_one(&endpoint, &store, addr, conn, hashes[0], &counter, &opts)
                                .await;
                        (conn, vec![(hashes[0], outcome)])
                    } else {
                        fetch_batch(&endpoint, &store, addr, conn, hashes, &counter, &opts).await
                    };
                    (p, conn, done, batch)
                });
            }
            if tasks.is_empty() && need.is_empty() {
                break;
            }
            let live = self.providers.iter().any(|p| p.dropped.is_none());
            if !live || now.duration_since(last_progress) > opts.missing_give_up {
                tasks.shutdown().await;
                // Parts in flight when giving up are unavailable too.
                let missing = n - self.done_in_set(&parts).await;
                return Err(FetchError::Unavailable {
                    hash,
                    missing,
                    total: n,
                    reasons: self.reasons(),
                });
            }
            tokio::select! {
                joined = tasks.join_next(), if !tasks.is_empty() => {
                    let Some(joined) = joined else { continue };
                    let (p, conn, done, batch) = match joined {
                        Ok(x) => x,
                        Err(e) => return Err(FetchError::Store { hash, detail: format!("fetch task failed: {e}") }),
                    };
                    let prov = &mut self.providers[p];
                    prov.inflight -= 1;
                    prov.answered = true;
                    if conn.is_some() {
                        prov.conn = conn;
                    }
                    steals.remove(&batch[0]);
                    own_requests.remove(&batch[0]);
                    // The batch's hashes are in `batch`'s order: settled first, then untouched.
                    let mut idx = batch.into_iter();
                    for (h, outcome) in done {
                        let Some(i) = idx.next() else { break };
                        debug_assert_eq!(parts[i], h);
                        match outcome {
                            Outcome::Complete { bytes } => {
                                prov.failures = 0;
                                prov.pause = Duration::ZERO;
                                prov.paused_until = Instant::now();
                                prov.bytes += bytes;
                                prov.parts += 1;
                                last_progress = Instant::now();
                            }
                            Outcome::TooLarge => {
                                large.insert(i);
                                need.insert(i);
                            }
                            Outcome::Lacked => {
                                prov.lacked += 1;
                                debug!(provider = %prov.addr.id.fmt_short(), part = %h.fmt_short(), "provider lacks part");
                                prov.partial_since.get_or_insert_with(Instant::now);
                                prov.pause = (prov.pause * 2).clamp(opts.missing_retry, max_pause);
                                prov.paused_until = Instant::now() + prov.pause;
                                need.insert(i);
                            }
                            Outcome::Corrupt(why) => {
                                warn!(provider = %prov.addr.id.fmt_short(), part = %h.fmt_short(), "dropping provider: sent data that does not verify ({why})");
                                prov.dropped = Some(format!("sent corrupt data for {}", h.fmt_short()));
                                prov.conn = None;
                                need.insert(i);
                            }
                            Outcome::Failed(why) => {
                                if is_disk_full_msg(&why) {
                                    // Stop the other requests before the caller frees space:
                                    // one still writing would take what is freed for the
                                    // store's database to record the deletions.
                                    tasks.shutdown().await;
                                    return Err(FetchError::DiskFull { hash, dir: self.images.inner.dir.clone() });
                                }
                                prov.failures += 1;
                                prov.conn = None;
                                debug!(provider = %prov.addr.id.fmt_short(), failures = prov.failures, "request failed: {why}");
                                if prov.failures >= opts.max_failures {
                                    warn!(provider = %prov.addr.id.fmt_short(), "dropping provider after {} failures: {why}", prov.failures);
                                    prov.dropped = Some(format!("failed {} times: {why}", prov.failures));
                                }
                                need.insert(i);
                            }
                        }
                    }
                    // Parts the request never reached go back as they were.
                    need.extend(idx);
                    self.publish();
                }
                _ = ticker.tick() => {
                    // Bytes still arriving (a large part streaming) count as progress.
                    let b = self.transferred.load(Ordering::Relaxed);
                    if b != last_bytes {
                        last_bytes = b;
                        last_progress = Instant::now();
                    }
                    self.publish();
                }
            }
        }
        Ok(())
    }

    /// How many of `parts` are complete locally.
    async fn done_in_set(&self, parts: &[Hash]) -> usize {
        let blobs = self.images.inner.store.blobs();
        let mut done = 0;
        for h in parts {
            if matches!(blobs.status(*h).await, Ok(BlobStatus::Complete { .. })) {
                done += 1;
            }
        }
        done
    }
}

/// Up to `max` needed parts from `start` on (wrapping once), ascending; a large part goes
/// alone.
fn pick_from(
    need: &BTreeSet<usize>,
    large: &HashSet<usize>,
    start: usize,
    max: usize,
) -> Vec<usize> {
    let Some(&first) = need.range(start..).next().or_else(|| need.iter().next()) else {
        return Vec::new();
    };
    let mut batch = vec![first];
    if !large.contains(&first) {
        batch.extend(
            need.range(first + 1..)
                .copied()
                .take_while(|i| !large.contains(i))
                .take(max.saturating_sub(1)),
        );
    }
    batch
}

/// The circular region `[from, to)` of `0..n` as one or two ascending ranges.
fn segments(from: usize, to: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let mut v = Vec::with_capacity(2);
    if from < to {
        v.push(from..to);
    } else {
        v.push(from..n);
        v.push(0..to);
    }
    v
}

/// What to ask a seed (a provider with everything) for, and whether it is for another's
/// region. This fetcher owns the region from its offset `me` to the next offset of a
/// fetcher in `others`; parts there come from a seed, parts in others' regions from their
/// owners, who fetch them first. Once its own region is done or in flight, and if
/// `may_steal`, it helps with the region that has most left, from its back (its owner works
/// from the front). With no known fetchers, everything is its region.
fn pick_for_seed(
    need: &BTreeSet<usize>,
    large: &HashSet<usize>,
    n: usize,
    me: usize,
    others: &[usize],
    max: usize,
    may_steal: bool,
) -> (Vec<usize>, bool) {
    let mut bounds: Vec<usize> = others.iter().copied().filter(|o| *o != me).collect();
    bounds.push(me);
    bounds.sort_unstable();
    bounds.dedup();
    let next = |b: usize| bounds.iter().copied().find(|x| *x > b).unwrap_or(bounds[0]);
    let region = |b: usize| {
        if bounds.len() == 1 {
            segments(b, b, n)
        } else {
            segments(b, next(b), n)
        }
    };
    // Own region, from its front.
    for seg in region(me) {
        if let Some(&first) = need.range(seg.clone()).next() {
            let mut batch = vec![first];
            if !large.contains(&first) {
                batch.extend(
                    need.range(first + 1..seg.end)
                        .copied()
                        .take_while(|i| !large.contains(i))
                        .take(max.saturating_sub(1)),
                );
            }
            return (batch, false);
        }
    }
    if !may_steal {
        return (Vec::new(), false);
    }
    // The region with most left, from its back.
    let Some(b) = bounds.iter().copied().filter(|b| *b != me).max_by_key(|b| {
        region(*b)
            .into_iter()
            .map(|seg| need.range(seg).count())
            .sum::<usize>()
    }) else {
        return (Vec::new(), false);
    };
    for seg in region(b).into_iter().rev() {
        if let Some(&last) = need.range(seg.clone()).next_back() {
            if large.contains(&last) {
                return (vec![last], true);
            }
            // Small: the owner may still get there first.
            let mut batch: Vec<usize> = need
                .range(seg.start..=last)
                .rev()
                .copied()
                .take_while(|i| !large.contains(i))
                .take(max.min(4))
                .collect();
            batch.reverse();
            return (batch, true);
        }
    }
    (Vec::new(), false)
}

/// A provider that lacked parts but has served none for this long is taken as not fetching
/// (a member that does not want this image): it owns no region.
const IDLE_AFTER: Duration = Duration::from_secs(20);

/// Where in a part list of length `n` the fetcher `id` starts for image `image`.
fn offset(id: &EndpointId, image: &Hash, n: usize) -> usize {
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    h.update(image.as_bytes());
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    (u64::from_le_bytes(x) % n as u64) as usize
}

/// The cached connection if it is still open, else a new one.
async fn usable(
    endpoint: &iroh::Endpoint,
    addr: EndpointAddr,
    conn: Option<Connection>,
    opts: &FetchOptions,
) -> Result<Connection, String> {
    match conn {
        Some(c) if c.close_reason().is_none() => Ok(c),
        _ => match tokio::time::timeout(
            opts.connect_timeout,
            endpoint.connect(addr, iroh_blobs::ALPN),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err("connect timed out".into()),
        },
    }
}

/// Fetches a run of parts from one provider in one request (iroh-blobs `GetMany`). Each
/// part is BLAKE3-verified as it arrives (16 KiB groups), held in memory (at most
/// `batch_part_max`) and added to the store complete, so a small part costs no partial
/// file, outboard file or fsync on disk. Returns the connection if still usable and the
/// parts settled, a prefix of `hashes`.
async fn fetch_batch(
    endpoint: &iroh::Endpoint,
    store: &iroh_blobs::api::Store,
    addr: EndpointAddr,
    conn: Option<Connection>,
    hashes: Vec<Hash>,
    counter: &AtomicU64,
    opts: &FetchOptions,
) -> (Option<Connection>, Vec<(Hash, Outcome)>) {
    use iroh_blobs::get::fsm::{self, BlobContentNext, DecodeError, EndBlobNext};
    use iroh_blobs::protocol::{ChunkRangesSeq, GetManyRequest};

    let conn = match usable(endpoint, addr, conn, opts).await {
        Ok(c) => c,
        Err(why) => return (None, vec![(hashes[0], Outcome::Failed(why))]),
    };
    let mut done: Vec<(Hash, Outcome)> = Vec::with_capacity(hashes.len());
    let work = async {
        let request = GetManyRequest {
            hashes: hashes.clone(),
            ranges: ChunkRangesSeq::all(),
        };
        let mut next = match fsm::start_get_many(conn.clone(), request, Default::default()).await {
            Ok(Ok(child)) => child,
            Ok(Err(_closing)) => return,
            Err(e) => {
                done.push((hashes[0], Outcome::Failed(format!("request: {e}"))));
                return;
            }
        };
        loop {
            let Some(&hash) = hashes.get(next.offset() as usize) else {
                return;
            };
            let (mut content, size) = match next.next(hash).next().await {
                Ok(x) => x,
                // The provider resets the stream at a part it does not have (and would end
                // it, in older versions).
                Err(e)
                    if conn.close_reason().is_none()
                        && (matches!(e, fsm::AtBlobHeaderNextError::NotFound { .. })
                            || lacked(&e)) =>
                {
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
                                    DecodeError::ParentHashMismatch { .. }
                                    | DecodeError::LeafHashMismatch { .. } => {
                                        Outcome::Corrupt(e.to_string())
                                    }
                                    DecodeError::ChunkNotFound { .. }
                                    | DecodeError::LeafNotFound { .. }
                                    | DecodeError::ParentNotFound { .. }
                                        if conn.close_reason().is_none() =>
                                    {
                                        Outcome::Lacked
                                    }
                                    _ if conn.close_reason().is_none() && lacked(&e) => {
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
                Ok(tt) => {
                    Outcome::Corrupt(format!("received data hashes to {}", tt.hash().fmt_short()))
                }
                Err(e) => Outcome::Failed(local_store_failure(&e)),
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
    if tokio::time::timeout(opts.request_timeout, work)
        .await
        .is_err()
    {
        let at = hashes.get(done.len()).copied();
        if let Some(h) = at {
            done.push((
                h,
                Outcome::Failed(format!(
                    "no complete answer within {:?}",
                    opts.request_timeout
                )),
            ));
        }
    }
    let keep = done.iter().all(|(_, o)| {
        matches!(
            o,
            Outcome::Complete { .. } | Outcome::Lacked | Outcome::TooLarge
        )
    });
    (keep.then_some(conn), done)
}

/// Whether an error means "the provider does not have (all of) this part": a provider
/// resets the stream with `ERR_INTERNAL` where it cannot export data, i.e. at a part it
/// does not have or at the end of what it has of a part it is still fetching. Walks the
/// error's sources, through `io::Error` wrappers, to the QUIC read error.
fn lacked(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<iroh::endpoint::ReadError>() {
            return matches!(r, iroh::endpoint::ReadError::Reset(code) if *code == iroh_blobs::protocol::ERR_INTERNAL);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            cur = Some(inner);
            continue;
        }
        cur = err.source();
    }
    false
}

/// A local store error as a failure reason. Its `Display` hides the I/O error inside, so
/// the `Debug` form (which names `StorageFull`) is kept for the disk-full check.
fn local_store_failure(e: &impl std::fmt::Debug) -> String {
    format!("local store: {e:?}")
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
    let mut stream = Box::pin(
        store
            .remote()
            .fetch(conn.clone(), HashAndFormat::raw(hash))
            .stream(),
    );
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
        Err(_) => Outcome::Failed(format!(
            "no complete answer within {:?}",
            opts.request_timeout
        )),
        Ok(Ok(bytes)) => match store.blobs().status(hash).await {
            Ok(BlobStatus::Complete { .. }) => Outcome::Complete { bytes },
            Ok(_) => Outcome::Lacked,
            Err(e) => Outcome::Failed(local_store_failure(&e)),
        },
        Ok(Err(e)) => {
            let dbg = format!("{e} {e:?}");
            let lower = dbg.to_lowercase();
            if lower.contains("hashmismatch") || lower.contains("hash mismatch") {
                Outcome::Corrupt(e.to_string())
            } else if conn.close_reason().is_some() {
                Outcome::Failed(format!("connection closed: {e}"))
            } else if dbg.contains("NotFound") || lacked(&e) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(r: std::ops::Range<usize>) -> BTreeSet<usize> {
        r.collect()
    }

    #[test]
    fn alone_everything_is_ours_from_our_offset() {
        let need = set(0..100);
        let (b, stolen) = pick_for_seed(&need, &HashSet::new(), 100, 90, &[], 16, false);
        assert_eq!(
            b,
            (90..100).collect::<Vec<_>>(),
            "ascending from our offset, not past the end"
        );
        assert!(!stolen);
        let need: BTreeSet<usize> = (0..10).collect();
        let (b, _) = pick_for_seed(&need, &HashSet::new(), 100, 90, &[], 4, false);
        assert_eq!(b, vec![0, 1, 2, 3], "wraps around to the start");
    }

    #[test]
    fn own_region_first_then_steal_from_the_back_only_when_allowed() {
        // Regions: me [0,25), others at 25, 50, 75.
        let mut need = set(0..100);
        let (b, stolen) = pick_for_seed(&need, &HashSet::new(), 100, 0, &[25, 50, 75], 16, true);
        assert_eq!((b, stolen), ((0..16).collect(), false));
        for i in 0..25 {
            need.remove(&i);
        }
        for i in 25..40 {
            need.remove(&i);
        }
        let (b, _) = pick_for_seed(&need, &HashSet::new(), 100, 0, &[25, 50, 75], 16, false);
        assert!(
            b.is_empty(),
            "own region done and stealing not allowed: nothing"
        );
        // Regions 50 and 75 have 25 left each, 25 has 10: the first with most left, from its back.
        let (b, stolen) = pick_for_seed(&need, &HashSet::new(), 100, 0, &[25, 50, 75], 16, true);
        assert!(stolen);
        assert!(
            b == vec![71, 72, 73, 74] || b == vec![96, 97, 98, 99],
            "{b:?}"
        );
    }

    #[test]
    fn a_large_part_goes_alone() {
        let need = set(0..10);
        let large: HashSet<usize> = [3].into_iter().collect();
        assert_eq!(pick_from(&need, &large, 0, 16), vec![0, 1, 2]);
        assert_eq!(pick_from(&need, &large, 3, 16), vec![3]);
        let (b, _) = pick_for_seed(&need, &large, 10, 3, &[], 16, false);
        assert_eq!(b, vec![3]);
    }

    #[test]
    fn offsets_spread_and_are_stable() {
        let image = Hash::new(b"image");
        let ids: Vec<EndpointId> = (0..8u8)
            .map(|i| iroh::SecretKey::from_bytes(&[i + 1; 32]).public())
            .collect();
        let a: Vec<usize> = ids.iter().map(|id| offset(id, &image, 1000)).collect();
        let b: Vec<usize> = ids.iter().map(|id| offset(id, &image, 1000)).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<HashSet<_>>().len() > 4, "{a:?}");
    }
}
