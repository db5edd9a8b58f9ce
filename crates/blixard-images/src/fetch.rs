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
//! Who holds what: every fetcher serves its have-state (`have.rs`) and subscribes to every
//! provider's, so a fellow fetcher is asked only for parts it holds (the rarest first) and a
//! seed only for parts no fellow holds (this node's region first). Each part is announced
//! as soon as it is stored, so a fellow passes it on while its request is still running.
//!
//! Failures: a part whose request fails or times out goes back for another provider; a
//! provider that sends data that does not verify is dropped at once; one that fails
//! repeatedly is dropped; one that lacks a part anyway (a provider without have-state, or
//! a race with its gc) is paused briefly, doubling on repeats.

use std::collections::{BTreeSet, HashMap, HashSet};
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
use crate::have::{HaveBits, HaveEvent};
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
                    let (have_tx, have_rx) = watch::channel(None);
                    self.inner.haves.lock().unwrap_or_else(|e| e.into_inner()).insert(hash, have_rx);
                    let me = self.clone();
                    let span = info_span!("image_fetch", image = %hash.fmt_short());
                    tokio::spawn(
                        async move {
                            let res = me.fetch_inner(hash, providers, &tx, have_tx).await;
                            if let Err(e) = &res {
                                warn!("fetch failed: {e}");
                            }
                            me.inner
                                .fetches
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&hash);
                            me.inner.haves.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
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
        have_tx: watch::Sender<Option<HaveBits>>,
    ) -> Result<FetchStats, FetchError> {
        let _op = self.inner.op_lock.read().await;
        let start = Instant::now();
        self.inner
            .gc
            .protected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash);
        let res = self.fetch_phases(hash, providers, tx, have_tx, start).await;
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
        have_tx: watch::Sender<Option<HaveBits>>,
        start: Instant,
    ) -> Result<FetchStats, FetchError> {
        let bad = |reason: String| FetchError::BadImage { hash, reason };
        let mut swarm = Swarm::new(self.clone(), hash, providers, tx.clone(), have_tx);
        // 1. Root, manifest and chunk list (small), then validate before pinning.
        swarm.fetch_set(vec![hash], false).await?;
        let root = self.read_root(hash).await.map_err(bad)?;
        swarm.fetch_set(vec![root[0]], false).await?;
        let mbytes = self
            .read_small(root[0], MAX_MANIFEST_SIZE)
            .await
            .map_err(bad)?;
        let manifest =
            Manifest::decode(&mbytes).map_err(|source| FetchError::Manifest { hash, source })?;
        let mut expected: HashSet<Hash> = manifest.direct_parts().into_iter().collect();
        if let Image::Bundle(b) = manifest.image() {
            if let Some(d) = &b.disk {
                swarm.fetch_set(vec![d.chunks], false).await?;
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
        swarm.fetch_set(parts, true).await?;
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

/// What a provider holds of the parts being fetched, as far as this node knows.
#[derive(Debug, Clone)]
enum Have {
    /// Its have subscription has not answered yet.
    Pending,
    /// No have information (it does not speak the have protocol, or the subscription
    /// failed, or the set being fetched is not the image's parts): treated as a seed, and
    /// paused when it lacks something.
    Unknown,
    /// Holds the whole image.
    All,
    /// Neither holds nor fetches the image: not asked.
    Nothing,
    /// Fetching; holds these parts.
    Bits(HaveBits),
}

struct ProviderState {
    addr: EndpointAddr,
    conn: Option<Connection>,
    inflight: usize,
    have: Have,
    /// Not asked again before this (it lacked a part); `pause` is the current length.
    paused_until: Instant,
    pause: Duration,
    failures: u32,
    lacked: u32,
    dropped: Option<String>,
    bytes: u64,
    parts: u64,
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
    /// This node's have-state of the image's parts, served to fellow fetchers.
    have_tx: watch::Sender<Option<HaveBits>>,
    transferred: Arc<AtomicU64>,
    local_done: u64,
    total: u64,
    already_local: usize,
}

/// A part in flight: the provider first asked, when, and how many requests carry it (2 in
/// the end game).
struct Flight {
    provider: usize,
    since: Instant,
    requests: u8,
}

/// One request carrying part `i` has ended; true if the part must be asked for again (no
/// request carries it any more and it was not stored).
fn settle(flight: &mut HashMap<usize, Flight>, got: &HashSet<usize>, i: usize) -> bool {
    if let Some(f) = flight.get_mut(&i) {
        f.requests = f.requests.saturating_sub(1);
        if f.requests == 0 {
            flight.remove(&i);
        }
    }
    !got.contains(&i) && !flight.contains_key(&i)
}

/// How long a part is in flight before the end game asks another provider for it too.
const ENDGAME_AFTER: Duration = Duration::from_secs(1);

/// Parts per request while fellow fetchers are about (4 disk chunks: about 512 KiB).
const SWARM_BATCH: usize = 4;

/// How long the first requests to seeds wait for every have subscription to answer, so
/// that fetchers starting together know each other before splitting the work.
const HAVE_WAIT: Duration = Duration::from_secs(1);

impl Swarm {
    fn new(
        images: ImageStore,
        hash: Hash,
        mut addrs: Vec<EndpointAddr>,
        tx: watch::Sender<FetchState>,
        have_tx: watch::Sender<Option<HaveBits>>,
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
                have: Have::Unknown,
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
            have_tx,
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
                let why = match (&p.dropped, &p.have) {
                    (Some(d), _) => d.as_str(),
                    (None, Have::Nothing) => "neither holds nor fetches the image",
                    (None, _) => "lacked parts",
                };
                format!("{}: {why}", p.addr.id.fmt_short())
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
    /// With `share` (the image's parts, in the root's order), this node serves its have-state
    /// to fellow fetchers and subscribes to every provider's: a fellow fetcher is asked only
    /// for parts it holds, the rarest first (at first what it just got from a seed, which
    /// nobody else has yet); a seed is asked only for parts no fellow holds, this node's
    /// region first. Regions are equal splits of the parts among this node and the fellow fetchers,
    /// in id order, so every fetcher computes the same ones without talking. Without `share`
    /// (the root, manifest and chunk list), every provider is asked as a seed.
    async fn fetch_set(&mut self, parts: Vec<Hash>, share: bool) -> Result<(), FetchError> {
        let hash = self.hash;
        let store = self.images.inner.store.clone();
        let n = parts.len();
        let mut need: BTreeSet<usize> = BTreeSet::new();
        let mut mine = HaveBits::new(n as u32);
        for (i, h) in parts.iter().enumerate() {
            match store.blobs().status(*h).await {
                Ok(BlobStatus::Complete { size }) => {
                    self.already_local += 1;
                    self.local_done += size;
                    mine.set(i as u32);
                }
                Ok(_) => {
                    need.insert(i);
                }
                Err(e) => {
                    return Err(FetchError::Store {
                        hash,
                        detail: e.to_string(),
                    })
                }
            }
        }
        if share {
            self.have_tx.send_replace(Some(mine));
        }
        if need.is_empty() {
            return Ok(());
        }
        if self.providers.is_empty() {
            return Err(FetchError::NoProviders(hash));
        }
        let opts = self.images.inner.opts.fetch.clone();
        let endpoint = self.images.inner.endpoint.clone();
        self.connect_all(&endpoint, &opts).await;
        let me = endpoint.id();
        // Have subscriptions, for the life of this call.
        let (have_events, mut have_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut subs = JoinSet::new();
        for (i, p) in self.providers.iter_mut().enumerate() {
            // Requests of an earlier set were ended with it.
            p.inflight = 0;
            p.have = Have::Unknown;
            // One that could not be dialled just now is not waited for (it stays a seed to
            // try, and is dropped if it keeps failing).
            if share && p.dropped.is_none() && p.conn.is_some() {
                p.have = Have::Pending;
                subs.spawn(crate::have::subscribe(
                    endpoint.clone(),
                    p.addr.clone(),
                    i,
                    hash,
                    n as u32,
                    opts.connect_timeout,
                    have_events.clone(),
                ));
            }
        }
        drop(have_events);
        let started = Instant::now();
        // Parts found too large to receive in memory: fetched one per request, streaming.
        let mut large: HashSet<usize> = HashSet::new();
        let mut tasks: JoinSet<BatchResult> = JoinSet::new();
        // First parts of requests to seeds for other fetchers' regions, in flight.
        let mut steals: HashSet<usize> = HashSet::new();
        // The same for requests to seeds for our own region.
        let mut own_requests: HashSet<usize> = HashSet::new();
        // Parts in requests now, and parts stored by this call.
        let mut flight: HashMap<usize, Flight> = HashMap::new();
        let mut got: HashSet<usize> = HashSet::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        let mut last_progress = Instant::now();
        let mut last_bytes = self.transferred.load(Ordering::Relaxed);
        let max_pause = opts.missing_retry * 8;
        loop {
            let now = Instant::now();
            // Fellow fetchers: with this node, in id order, they split the parts into
            // regions.
            let mut ring: Vec<EndpointId> = self
                .providers
                .iter()
                .filter(|q| q.dropped.is_none() && matches!(q.have, Have::Bits(_)))
                .map(|q| q.addr.id)
                .collect();
            ring.push(me);
            ring.sort_unstable();
            let region_of = |id: &EndpointId| -> std::ops::Range<usize> {
                if ring.len() == 1 {
                    // Alone (so far): start at a place of our own, so that fetchers that do
                    // not know each other yet do not all ask a seed for the same parts.
                    let o = offset(id, &hash, n);
                    return o..o + n;
                }
                let k = ring.iter().position(|x| x == id).unwrap_or(0);
                k * n / ring.len()..(k + 1) * n / ring.len()
            };
            let waiting = share
                && now.duration_since(started) < HAVE_WAIT
                && self.providers.iter().any(|q| q.dropped.is_none() && matches!(q.have, Have::Pending));
            // With fellows about, fewer and shorter requests per provider: parts queued behind
            // a busy uplink wait while another holder might be idle, and a seed's uplink is
            // not split among more streams than needed, so each part arrives (and can be
            // passed on) sooner.
            let swarming = ring.len() > 1;
            let slots = if swarming { opts.per_provider.min(2) } else { opts.per_provider };
            let max_batch = if swarming { opts.batch.min(SWARM_BATCH) } else { opts.batch };
            // End game: once nothing is left to hand out, a part in flight for a while on one
            // provider is asked of another too, and the first answer wins. A slow or stalled
            // provider then holds up the end by at most `ENDGAME_AFTER`, not a timeout.
            let mut endgame: Vec<usize> = if need.is_empty() {
                let mut v: Vec<usize> = flight
                    .iter()
                    // Not a part already stored by an earlier duplicate whose first request is
                    // still out: that one is only waited out, not asked for again.
                    .filter(|(i, f)| {
                        f.requests == 1 && !got.contains(*i) && now.duration_since(f.since) >= ENDGAME_AFTER
                    })
                    .map(|(i, _)| *i)
                    .collect();
                v.sort_unstable();
                v
            } else {
                Vec::new()
            };
            // Hand out runs of parts to providers with free slots, least busy first.
            let mut idle: HashSet<usize> = HashSet::new();
            while !need.is_empty() || !endgame.is_empty() {
                let Some(p) = (0..self.providers.len())
                    .filter(|i| {
                        let pr = &self.providers[*i];
                        pr.dropped.is_none()
                            && !idle.contains(i)
                            && pr.inflight < slots
                            && pr.paused_until <= now
                            && match pr.have {
                                Have::Bits(_) => true,
                                Have::All | Have::Unknown => !waiting,
                                Have::Pending | Have::Nothing => false,
                            }
                    })
                    .min_by_key(|i| (self.providers[*i].inflight, self.providers[*i].failures))
                else {
                    break;
                };
                let fellows: Vec<&HaveBits> = self
                    .providers
                    .iter()
                    .filter(|q| q.dropped.is_none())
                    .filter_map(|q| match &q.have {
                        Have::Bits(b) => Some(b),
                        _ => None,
                    })
                    .collect();
                let wanted = Wanted { need: &need, large: &large, n };
                let (batch, stolen) = if need.is_empty() {
                    let holds = |i: usize| match &self.providers[p].have {
                        Have::Bits(b) => b.has(i),
                        _ => true,
                    };
                    (pick_endgame(&mut endgame, &flight, &large, p, holds, max_batch), false)
                } else if let Have::Bits(theirs) = &self.providers[p].have {
                    (pick_from_fellow(&wanted, theirs, &fellows, max_batch), false)
                } else {
                    let others: Vec<std::ops::Range<usize>> =
                        ring.iter().filter(|id| **id != me).map(&region_of).collect();
                    // Help with others' regions only once ours is done, one request at a
                    // time: a seed's uplink is the scarcest thing here.
                    let may_steal = steals.is_empty() && own_requests.is_empty();
                    match pick_from_seed(&wanted, &fellows, region_of(&me), &others, max_batch, may_steal) {
                        // Every part still needed is held by a fellow: the seed's uplink is
                        // no longer needed to bring parts in, so it helps with the rarest
                        // like a fellow (one request at a time).
                        (b, _) if b.is_empty() && may_steal && swarming => {
                            let all = HaveBits::full(n as u32);
                            (pick_from_fellow(&wanted, &all, &fellows, max_batch), true)
                        }
                        picked => picked,
                    }
                };
                if batch.is_empty() {
                    // Nothing for this provider now; others may still have work.
                    idle.insert(p);
                    continue;
                }
                let duplicate = need.is_empty();
                if stolen {
                    steals.insert(batch[0]);
                } else if !duplicate && !matches!(self.providers[p].have, Have::Bits(_)) {
                    own_requests.insert(batch[0]);
                }
                for i in &batch {
                    need.remove(i);
                    let f = flight.entry(*i).or_insert(Flight { provider: p, since: now, requests: 0 });
                    f.requests += 1;
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
                // Each part is announced to fellow fetchers as soon as it is stored, not when
                // the whole request ends: they forward it meanwhile.
                let have_tx = share.then(|| self.have_tx.clone());
                let indices = batch.clone();
                let stored = move |k: usize| {
                    if let (Some(tx), Some(&i)) = (&have_tx, indices.get(k)) {
                        tx.send_modify(|b| {
                            if let Some(b) = b {
                                b.set(i as u32);
                            }
                        });
                    }
                };
                tasks.spawn(async move {
                    let (conn, done) = if single {
                        let (conn, outcome) =
                            fetch_one(&endpoint, &store, addr, conn, hashes[0], &counter, &opts)
                                .await;
                        if matches!(outcome, Outcome::Complete { .. }) {
                            stored(0);
                        }
                        (conn, vec![(hashes[0], outcome)])
                    } else {
                        let report = Report { bytes: &counter, stored: &stored };
                        fetch_batch(&endpoint, &store, addr, conn, hashes, report, &opts).await
                    };
                    (p, conn, done, batch)
                });
            }
            // Done when nothing is left to ask for and every part still in a request was
            // stored by another (the end game's losers are dropped below).
            if need.is_empty() && flight.keys().all(|i| got.contains(i)) {
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
                    if conn.is_some() {
                        prov.conn = conn;
                    }
                    steals.remove(&batch[0]);
                    own_requests.remove(&batch[0]);
                    // The batch's hashes are in `batch`'s order: settled first, then untouched.
                    let mut idx = batch.into_iter();
                    // A part settles here once per request that carried it; it goes back to
                    // `need` only when no request has it any more and it was not stored.
                    let mut back = Vec::new();
                    for (h, outcome) in done {
                        let Some(i) = idx.next() else { break };
                        debug_assert_eq!(parts[i], h);
                        if matches!(outcome, Outcome::Complete { .. }) {
                            got.insert(i);
                        }
                        if settle(&mut flight, &got, i) {
                            back.push(i);
                        }
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
                            }
                            Outcome::Lacked => {
                                prov.lacked += 1;
                                debug!(provider = %prov.addr.id.fmt_short(), part = %h.fmt_short(), "provider lacks part");
                                prov.pause = (prov.pause * 2).clamp(opts.missing_retry, max_pause);
                                prov.paused_until = Instant::now() + prov.pause;
                            }
                            Outcome::Corrupt(why) => {
                                warn!(provider = %prov.addr.id.fmt_short(), part = %h.fmt_short(), "dropping provider: sent data that does not verify ({why})");
                                prov.dropped = Some(format!("sent corrupt data for {}", h.fmt_short()));
                                prov.conn = None;
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
                            }
                        }
                    }
                    // Parts the request never reached go back as they were.
                    for i in idx {
                        if settle(&mut flight, &got, i) {
                            back.push(i);
                        }
                    }
                    need.extend(back);
                    self.publish();
                }
                Some((p, ev)) = have_rx.recv() => {
                    let prov = &mut self.providers[p];
                    match ev {
                        HaveEvent::All => prov.have = Have::All,
                        HaveEvent::None => prov.have = Have::Nothing,
                        HaveEvent::Bits(b) => prov.have = Have::Bits(b),
                        HaveEvent::Parts(added) => {
                            if let Have::Bits(b) = &mut prov.have {
                                for i in added {
                                    b.set(i);
                                }
                            }
                        }
                        HaveEvent::Unknown(why) => {
                            debug!(provider = %prov.addr.id.fmt_short(), "no have information: {why}");
                            // What it had is stale; as a seed it is paused where it lacks.
                            prov.have = Have::Unknown;
                        }
                    }
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
        tasks.shutdown().await;
        subs.shutdown().await;
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

/// End game: up to `max` parts of `endgame` (in flight on one request each) that provider
/// `p` holds and was not the first asked for, taken out of `endgame`. A large part streams
/// into a partial file, so it never gets a second writer.
fn pick_endgame(
    endgame: &mut Vec<usize>,
    flight: &HashMap<usize, Flight>,
    large: &HashSet<usize>,
    p: usize,
    holds: impl Fn(usize) -> bool,
    max: usize,
) -> Vec<usize> {
    let mut batch = Vec::new();
    endgame.retain(|i| {
        let take = batch.len() < max
            && flight.get(i).is_some_and(|f| f.provider != p)
            && holds(*i)
            && !large.contains(i);
        if take {
            batch.push(*i);
        }
        !take
    });
    batch
}

/// What this node still needs of a part list of length `n`, and which of those parts are
/// too large to receive in memory.
#[derive(Clone, Copy)]
struct Wanted<'a> {
    need: &'a BTreeSet<usize>,
    large: &'a HashSet<usize>,
    n: usize,
}

/// Up to `max` needed parts for which `ok` holds, from `start` to `end` (indices taken
/// modulo `n`, so a region may wrap), ascending within each run; a large part goes alone.
fn pick_run(w: &Wanted, region: std::ops::Range<usize>, max: usize, ok: impl Fn(usize) -> bool) -> Vec<usize> {
    let Wanted { need, large, n } = *w;
    let mut batch = Vec::new();
    for seg in segments(region, n) {
        for i in need.range(seg).copied().filter(|i| ok(*i)) {
            if large.contains(&i) {
                if batch.is_empty() {
                    return vec![i];
                }
                return batch;
            }
            batch.push(i);
            if batch.len() >= max {
                return batch;
            }
        }
        if !batch.is_empty() {
            return batch;
        }
    }
    batch
}

/// `region` (its end may pass `n`, meaning it wraps) as at most two ascending ranges.
fn segments(region: std::ops::Range<usize>, n: usize) -> Vec<std::ops::Range<usize>> {
    let (s, e) = (region.start.min(n), region.end);
    let mut v = Vec::with_capacity(2);
    if e <= n {
        v.push(s..e);
    } else {
        v.push(s..n);
        v.push(0..(e - n).min(s));
    }
    v
}

/// What to ask a fellow fetcher for: parts it holds, the rarest first (held by the fewest
/// fellows: at first what it just got from a seed, which nobody else has; later whatever
/// spreads the load over every holder), ascending among equals.
fn pick_from_fellow(w: &Wanted, theirs: &HaveBits, fellows: &[&HaveBits], max: usize) -> Vec<usize> {
    let holders = |i: usize| fellows.iter().filter(|b| b.has(i)).count();
    let Some(rarest) = w.need.iter().filter(|i| theirs.has(**i)).map(|i| holders(*i)).min() else {
        return Vec::new();
    };
    pick_run(w, 0..w.n, max, |i| theirs.has(i) && holders(i) == rarest)
}

/// What to ask a seed for, and whether it is for another's region: parts no fellow holds,
/// this node's region first, from its front. Once that is done or in flight, and if
/// `may_steal`, it helps with the region that has most left, from its back (its owner works
/// from the front).
fn pick_from_seed(
    w: &Wanted,
    fellows: &[&HaveBits],
    mine: std::ops::Range<usize>,
    others: &[std::ops::Range<usize>],
    max: usize,
    may_steal: bool,
) -> (Vec<usize>, bool) {
    let Wanted { need, large, n } = *w;
    let nobody_else = |i: usize| !fellows.iter().any(|b| b.has(i));
    let batch = pick_run(w, mine, max, nobody_else);
    if !batch.is_empty() || !may_steal {
        return (batch, false);
    }
    let left = |r: &std::ops::Range<usize>| {
        segments(r.clone(), n)
            .into_iter()
            .map(|seg| need.range(seg).filter(|i| nobody_else(**i)).count())
            .sum::<usize>()
    };
    let Some(r) = others.iter().filter(|r| left(r) > 0).max_by_key(|r| left(r)) else {
        return (Vec::new(), false);
    };
    for seg in segments(r.clone(), n).into_iter().rev() {
        if let Some(last) = need.range(seg.clone()).rev().copied().find(|i| nobody_else(*i)) {
            if large.contains(&last) {
                return (vec![last], true);
            }
            // Small: the owner may still get there first.
            let mut batch: Vec<usize> = need
                .range(seg.start..=last)
                .rev()
                .copied()
                .filter(|i| nobody_else(*i))
                .take_while(|i| !large.contains(i))
                .take(max.min(4))
                .collect();
            batch.reverse();
            return (batch, true);
        }
    }
    (Vec::new(), false)
}

/// Where in a part list of length `n` the fetcher `id` starts for image `image` while it
/// knows of no fellow fetcher.
fn offset(id: &EndpointId, image: &Hash, n: usize) -> usize {
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    h.update(image.as_bytes());
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    (u64::from_le_bytes(x) % n.max(1) as u64) as usize
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
        _ => dial(endpoint, addr, iroh_blobs::ALPN, opts.connect_timeout).await,
    }
}

/// A new connection to `addr` on `alpn`, given up after `timeout`.
pub(crate) async fn dial(
    endpoint: &iroh::Endpoint,
    addr: EndpointAddr,
    alpn: &[u8],
    timeout: Duration,
) -> Result<Connection, String> {
    match tokio::time::timeout(timeout, endpoint.connect(addr, alpn)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Where a request reports what it received: payload bytes as they arrive, and the index
/// (in the request) of each part once it is stored.
#[derive(Clone, Copy)]
struct Report<'a> {
    bytes: &'a AtomicU64,
    stored: &'a (dyn Fn(usize) + Send + Sync),
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
    report: Report<'_>,
    opts: &FetchOptions,
) -> (Option<Connection>, Vec<(Hash, Outcome)>) {
    let Report { bytes: counter, stored } = report;
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
            if !stop {
                stored(done.len());
            }
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

    fn w<'a>(need: &'a BTreeSet<usize>, large: &'a HashSet<usize>, n: usize) -> Wanted<'a> {
        Wanted { need, large, n }
    }

    fn bits(n: u32, held: impl IntoIterator<Item = u32>) -> HaveBits {
        let mut b = HaveBits::new(n);
        for i in held {
            b.set(i);
        }
        b
    }

    #[test]
    fn alone_everything_is_ours_from_our_offset() {
        let none = HashSet::new();
        let need = set(0..100);
        let (b, stolen) = pick_from_seed(&w(&need, &none, 100), &[], 90..190, &[], 16, false);
        assert_eq!(b, (90..100).collect::<Vec<_>>(), "ascending from our offset, not past the end");
        assert!(!stolen);
        let need: BTreeSet<usize> = (0..10).collect();
        let (b, _) = pick_from_seed(&w(&need, &none, 100), &[], 90..190, &[], 4, false);
        assert_eq!(b, vec![0, 1, 2, 3], "wraps around to the start");
    }

    #[test]
    fn a_seed_is_asked_only_for_what_no_fellow_holds() {
        let none = HashSet::new();
        // Regions: me [0,25), others [25,50), [50,75), [75,100).
        let others = [25..50, 50..75, 75..100];
        let mut need = set(0..100);
        let fellow = bits(100, [0, 1, 2, 5]);
        let (b, stolen) = pick_from_seed(&w(&need, &none, 100), &[&fellow], 0..25, &others, 4, true);
        assert_eq!((b, stolen), (vec![3, 4, 6, 7], false));
        for i in 0..40 {
            need.remove(&i);
        }
        let (b, _) = pick_from_seed(&w(&need, &none, 100), &[&fellow], 0..25, &others, 16, false);
        assert!(b.is_empty(), "own region done and stealing not allowed: nothing");
        // Regions 2 and 3 have 25 left each, region 1 has 10: the first with most left, from
        // its back, skipping what a fellow holds.
        let fellow = bits(100, [74, 99]);
        let (b, stolen) = pick_from_seed(&w(&need, &none, 100), &[&fellow], 0..25, &others, 16, true);
        assert!(stolen);
        assert!(b == vec![70, 71, 72, 73] || b == vec![95, 96, 97, 98], "{b:?}");
    }

    #[test]
    fn a_fellow_is_asked_for_what_it_holds_the_rarest_first() {
        let none = HashSet::new();
        let need = set(0..100);
        let theirs = bits(100, [3, 4, 60, 61, 62, 90]);
        let other = bits(100, [3, 4, 90]);
        let fellows = [&theirs, &other];
        assert_eq!(pick_from_fellow(&w(&need, &none, 100), &theirs, &fellows, 16), vec![60, 61, 62]);
        assert_eq!(pick_from_fellow(&w(&need, &none, 100), &theirs, &fellows, 2), vec![60, 61]);
        let need: BTreeSet<usize> = [3, 4, 90].into_iter().collect();
        assert_eq!(pick_from_fellow(&w(&need, &none, 100), &theirs, &fellows, 16), vec![3, 4, 90]);
        assert!(pick_from_fellow(&w(&set(5..60), &none, 100), &theirs, &fellows, 16).is_empty());
    }

    #[test]
    fn the_end_game_asks_another_holder_for_small_parts_only() {
        let since = Instant::now();
        let flight: HashMap<usize, Flight> =
            [(1, 0), (2, 0), (3, 1), (4, 0), (5, 0)].into_iter().map(|(i, p)| (i, Flight { provider: p, since, requests: 1 })).collect();
        let large: HashSet<usize> = [4].into_iter().collect();
        let mut endgame = vec![1, 2, 3, 4, 5];
        // Provider 1 holds all but part 5; part 3 is already in flight on it.
        let b = pick_endgame(&mut endgame, &flight, &large, 1, |i| i != 5, 16);
        assert_eq!(b, vec![1, 2]);
        assert_eq!(endgame, vec![3, 4, 5], "what was taken is out");
        let b = pick_endgame(&mut endgame, &flight, &large, 2, |_| true, 1);
        assert_eq!((b, endgame), (vec![3], vec![4, 5]));
    }

    #[test]
    fn a_large_part_goes_alone() {
        let need = set(0..10);
        let large: HashSet<usize> = [3].into_iter().collect();
        let all = |_| true;
        assert_eq!(pick_run(&w(&need, &large, 10), 0..10, 16, all), vec![0, 1, 2]);
        assert_eq!(pick_run(&w(&need, &large, 10), 3..13, 16, all), vec![3]);
        let (b, _) = pick_from_seed(&w(&need, &large, 10), &[], 3..13, &[], 16, false);
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
