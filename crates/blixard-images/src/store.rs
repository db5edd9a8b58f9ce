//! The image store: an iroh-blobs `FsStore` in the node's data dir, images pinned by tags,
//! push (add), list/info, remove and gc.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use iroh::Endpoint;
use iroh_blobs::api::blobs::{AddBytesOptions, AddPathOptions, ImportMode};
use iroh_blobs::api::TempTag;
use iroh_blobs::api::proto::AddProgressItem;
use iroh_blobs::hashseq::HashSeq;
use iroh_blobs::store::fs::options::Options as FsOptions;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::{GcConfig, ProtectOutcome};
use iroh_blobs::{BlobFormat, BlobsProtocol, Hash, HashAndFormat};
use n0_future::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, info, info_span, Instrument};

use crate::error::{is_disk_full, is_disk_full_msg, AddError, GcError, InfoError, OpenError};
use crate::fetch::{FetchOptions, FetchState};
use crate::manifest::{
    Bundle, ChunkedFile, FilePart, Image, Manifest, ManifestV1, NixClosure, StorePathEntry,
    MAX_HASH_SEQ_SIZE, MAX_MANIFEST_SIZE,
};
use crate::nix::{self, NixOptions};

/// The ALPN the blobs protocol is served on (wrap the handler in the member `Gate`).
pub const ALPN: &[u8] = iroh_blobs::ALPN;

const TAG_PREFIX: &str = "blixard/image/";

pub(crate) fn tag_name(hash: &Hash) -> String {
    format!("{TAG_PREFIX}{}", hash.to_hex())
}

/// A reference to an image: the hash of its root hash sequence and its total size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    /// Root hash sequence: child 0 is the manifest, then every distinct part.
    pub hash: Hash,
    /// Bytes of all blobs of the image (root, manifest, distinct parts).
    pub size: u64,
}

/// Progress of an add, fetch or materialise: bytes done of bytes total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// Content-defined chunking parameters for root disks (FastCDC 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    /// 32 KiB / 128 KiB / 512 KiB: a 1 GiB disk is ~8k chunks.
    fn default() -> Self {
        Self { min: 32 * 1024, avg: 128 * 1024, max: 512 * 1024 }
    }
}

/// How to open an [`ImageStore`].
#[derive(Debug, Clone)]
pub struct ImageStoreOptions {
    /// Directory of the store (e.g. `DATA_DIR/images`): `blobs/` and `materialised/` below it.
    pub dir: PathBuf,
    pub nix: NixOptions,
    pub chunking: ChunkParams,
    pub fetch: FetchOptions,
    /// How often the blob collector looks for a requested gc run.
    pub gc_poll: Duration,
    /// Blobs (and outboards) up to this size are kept inside the store's database instead
    /// of one file each (iroh-blobs default: 16 KiB).
    pub inline_max: u64,
}

impl ImageStoreOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            nix: NixOptions::default(),
            chunking: ChunkParams::default(),
            fetch: FetchOptions::default(),
            gc_poll: Duration::from_millis(200),
            inline_max: 16 * 1024,
        }
    }
}

/// What a bundle is made of.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: Option<PathBuf>,
    pub cmdline: String,
}

/// An image held locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    pub hash: Hash,
    /// All blobs present and verified.
    pub complete: bool,
    /// Materialised (files on disk / imported into Nix) with a completion marker.
    pub materialised: bool,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    pub images_removed: usize,
    pub materialised_removed: usize,
    pub blobs_before: usize,
    pub blobs_after: usize,
}

/// Lets `gc()` trigger the store's periodic collector on demand.
#[derive(Debug)]
pub(crate) struct GcControl {
    requested: AtomicU64,
    running: Mutex<Option<u64>>,
    finished: watch::Sender<u64>,
    /// Roots of fetches in progress (extra protection while their tag is not set yet).
    pub(crate) protected: Mutex<HashSet<Hash>>,
}

impl GcControl {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            requested: AtomicU64::new(0),
            running: Mutex::new(None),
            finished: watch::Sender::new(0),
            protected: Mutex::new(HashSet::new()),
        })
    }

    /// Called by the store before each periodic run.
    fn before_run(&self, live: &mut HashSet<Hash>) -> ProtectOutcome {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = running.take() {
            self.finished.send_replace(done);
        }
        let wanted = self.requested.load(Ordering::SeqCst);
        if wanted > *self.finished.borrow() {
            live.extend(self.protected.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
            *running = Some(wanted);
            ProtectOutcome::Continue
        } else {
            ProtectOutcome::Abort
        }
    }

    async fn run(&self, timeout: Duration) -> Result<(), GcError> {
        let target = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.finished.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|f| *f >= target))
            .await
            .map_err(|_| GcError::Stalled(timeout))?
            .map_err(|_| GcError::Stalled(timeout))?;
        Ok(())
    }
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) mat_dir: PathBuf,
    pub(crate) store: FsStore,
    pub(crate) endpoint: Endpoint,
    pub(crate) opts: ImageStoreOptions,
    pub(crate) gc: Arc<GcControl>,
    pub(crate) fetches: Mutex<HashMap<Hash, watch::Receiver<FetchState>>>,
    /// The have-state of fetches in progress, served on [`crate::HAVE_ALPN`].
    pub(crate) haves: Mutex<HashMap<Hash, crate::have::HaveWatch>>,
    /// Adds, fetches and materialisations hold it shared; gc exclusively.
    pub(crate) op_lock: tokio::sync::RwLock<()>,
    pub(crate) mat_locks: Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
}

/// The node's image store. Cheap to clone.
#[derive(Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore").field("dir", &self.inner.dir).finish()
    }
}

impl ImageStore {
    /// Opens (or creates) the store in `opts.dir`. `endpoint` is used to fetch from peers.
    pub async fn open(endpoint: Endpoint, opts: ImageStoreOptions) -> Result<Self, OpenError> {
        let dir = opts.dir.clone();
        let blobs_dir = dir.join("blobs");
        let mat_dir = dir.join("materialised");
        for d in [&blobs_dir, &mat_dir] {
            tokio::fs::create_dir_all(d).await.map_err(|source| OpenError::Io { dir: d.clone(), source })?;
        }
        let blobs_dir = tokio::fs::canonicalize(&blobs_dir)
            .await
            .map_err(|source| OpenError::Io { dir: blobs_dir.clone(), source })?;
        // Room for the store's own database to delete things when the disk is full (its
        // commits need free pages too); given back while collecting after a full disk.
        let _ = reserve_space(&dir).await;
        let gc = GcControl::new();
        let cb_gc = gc.clone();
        let mut fs_opts = FsOptions::new(&blobs_dir);
        fs_opts.inline = iroh_blobs::store::fs::options::InlineOptions {
            max_data_inlined: opts.inline_max,
            max_outboard_inlined: opts.inline_max,
        };
        fs_opts.gc = Some(GcConfig {
            interval: opts.gc_poll,
            add_protected: Some(Arc::new(move |live: &mut HashSet<Hash>| {
                let outcome = cb_gc.before_run(live);
                Box::pin(async move { outcome }) as Pin<Box<dyn std::future::Future<Output = ProtectOutcome> + Send + Sync>>
            })),
        });
        let store = FsStore::load_with_opts(blobs_dir.join("blobs.db"), fs_opts)
            .await
            .map_err(|e| OpenError::Store { dir: blobs_dir.clone(), detail: e.to_string() })?;
        let mat_dir = tokio::fs::canonicalize(&mat_dir).await.map_err(|source| OpenError::Io { dir: mat_dir.clone(), source })?;
        let me = Self {
            inner: Arc::new(Inner {
                dir,
                mat_dir,
                store,
                endpoint,
                opts,
                gc,
                fetches: Mutex::new(HashMap::new()),
                haves: Mutex::new(HashMap::new()),
                op_lock: tokio::sync::RwLock::new(()),
                mat_locks: Mutex::new(HashMap::new()),
            }),
        };
        me.clean_partial_materialisations().await;
        Ok(me)
    }

    /// The protocol handler serving this store's blobs on [`ALPN`]. Wrap it in the member
    /// `Gate` and add it to the node's router. Note: the router's shutdown also shuts the
    /// store down.
    pub fn protocol_handler(&self) -> BlobsProtocol {
        BlobsProtocol::new(&self.inner.store, None)
    }

    /// The protocol handler telling fellow fetchers which parts of an image this node holds
    /// while it fetches it, on [`crate::HAVE_ALPN`]. Wrap it in the member `Gate` too.
    pub fn have_handler(&self) -> crate::have::HaveProtocol {
        crate::have::HaveProtocol::new(self.clone())
    }

    /// The have-state of a fetch of `hash` in progress.
    pub(crate) fn have_watch(&self, hash: Hash) -> Option<crate::have::HaveWatch> {
        self.inner.haves.lock().unwrap_or_else(|e| e.into_inner()).get(&hash).cloned()
    }

    /// [`Self::protocol_handler`] that also counts the payload bytes it sends (a push's
    /// progress, seen from the pushing side).
    pub fn protocol_handler_counting(&self) -> (BlobsProtocol, Arc<AtomicU64>) {
        use iroh_blobs::provider::events::{EventMask, EventSender, ProviderMessage, ThrottleMode};
        let sent = Arc::new(AtomicU64::new(0));
        let mask = EventMask { throttle: ThrottleMode::Intercept, ..EventMask::DEFAULT };
        let (events, mut rx) = EventSender::channel(64, mask);
        let counter = sent.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                // Throttle is asked once per sent chunk with its size; never throttle.
                if let ProviderMessage::Throttle(m) = msg {
                    counter.fetch_add(m.inner.size, Ordering::Relaxed);
                    let _ = m.tx.send(Ok(())).await;
                }
            }
        });
        (BlobsProtocol::new(&self.inner.store, Some(events)), sent)
    }

    /// The underlying iroh-blobs store (for tests and tools).
    pub fn blobs(&self) -> &iroh_blobs::api::Store {
        &self.inner.store
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Flushes and closes the blob store. Call before exit.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.store.shutdown().await {
            debug!("image store shutdown: {e}");
        }
    }

    fn store_err(&self, what: &str, e: impl std::fmt::Display) -> AddError {
        let detail = e.to_string();
        if is_disk_full_msg(&detail) {
            AddError::DiskFull { what: what.to_string(), dir: self.inner.dir.clone() }
        } else {
            AddError::Store { what: what.to_string(), detail }
        }
    }

    // ------------------------------------------------------------------------------------
    // Add (push)

    /// Packs the Nix closure of `path` (a store path or a link to one, e.g. `result`): every
    /// store path becomes one NAR blob (streamed from `nix-store --dump`, its SHA-256
    /// checked against the Nix database), the manifest names them, the image is pinned.
    pub async fn add_closure(&self, path: &Path, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<ImageRef, AddError> {
        let span = info_span!("image_add_closure", path = %path.display());
        self.add_closure_impl(path, progress).instrument(span).await
    }

    async fn add_closure_impl(&self, path: &Path, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<ImageRef, AddError> {
        let _op = self.inner.op_lock.read().await;
        let nixo = &self.inner.opts.nix;
        let bin = nixo.nix_store().ok_or(AddError::NixNotFound)?;
        let entry = nix::resolve_store_path(path).ok_or_else(|| AddError::NotAStorePath(path.to_path_buf()))?;
        let infos = nix::query_closure(nixo, &bin, None, &entry)
            .await
            .map_err(|source| AddError::Closure { path: entry.clone(), source })?;
        let total: u64 = infos.iter().map(|i| i.nar_size).sum();
        info!(entry = %entry, paths = infos.len(), nar_bytes = total, "packing closure");
        let done = Arc::new(AtomicU64::new(0));
        progress(Progress { done: 0, total });
        let mut tags = Vec::new();
        let mut entries = Vec::with_capacity(infos.len());
        for i in infos {
            let (tt, sha, size) = self.add_nar(nixo, &bin, &i.path, &done, total, progress).await?;
            if sha != i.nar_hash || size != i.nar_size {
                return Err(AddError::NarHashMismatch {
                    path: i.path,
                    expected: nix::nix32_encode(&i.nar_hash),
                    got: nix::nix32_encode(&sha),
                });
            }
            entries.push(StorePathEntry {
                store_path: i.path,
                nar_hash: i.nar_hash,
                nar_size: i.nar_size,
                references: i.references,
                blob: tt.hash(),
            });
            tags.push(tt);
        }
        let image = Image::NixClosure(NixClosure { entry, paths: entries });
        self.finish_image(image, total, Vec::new(), tags).await
    }

    async fn add_nar(
        &self,
        nixo: &NixOptions,
        bin: &Path,
        store_path: &str,
        done: &Arc<AtomicU64>,
        total: u64,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(TempTag, [u8; 32], u64), AddError> {
        let dump_err = |detail: String| AddError::Dump { path: store_path.to_string(), detail };
        let mut child = nixo
            .command(bin)
            .arg("--dump")
            .arg(store_path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| dump_err(format!("cannot run {}: {e}", bin.display())))?;
        let stdout = child.stdout.take().ok_or_else(|| dump_err("no stdout".into()))?;
        let (hash_tx, hash_rx) = tokio::sync::oneshot::channel::<([u8; 32], u64)>();
        let counter = done.clone();
        struct St {
            r: tokio::process::ChildStdout,
            sha: sha2::Sha256,
            size: u64,
            tx: Option<tokio::sync::oneshot::Sender<([u8; 32], u64)>>,
            counter: Arc<AtomicU64>,
        }
        let st = St { r: stdout, sha: sha2::Sha256::new(), size: 0, tx: Some(hash_tx), counter };
        // Streams the NAR in 256 KiB pieces: never more than a few pieces in memory.
        let stream = n0_future::stream::unfold(st, |mut st| async move {
            st.tx.as_ref()?;
            let mut buf = vec![0u8; 256 * 1024];
            match st.r.read(&mut buf).await {
                Ok(0) => {
                    let sha: [u8; 32] = st.sha.clone().finalize().into();
                    if let Some(tx) = st.tx.take() {
                        let _ = tx.send((sha, st.size));
                    }
                    None
                }
                Ok(n) => {
                    buf.truncate(n);
                    st.sha.update(&buf);
                    st.size += n as u64;
                    st.counter.fetch_add(n as u64, Ordering::Relaxed);
                    Some((Ok(Bytes::from(buf)), st))
                }
                Err(e) => {
                    st.tx = None;
                    Some((Err(e), st))
                }
            }
        });
        let mut items = Box::pin(self.inner.store.add_stream(stream).await.stream().await);
        let mut tt = None;
        while let Some(item) = items.next().await {
            match item {
                AddProgressItem::Done(t) => tt = Some(t),
                AddProgressItem::Error(e) => {
                    let _ = child.kill().await;
                    if is_disk_full(&e) {
                        return Err(AddError::DiskFull { what: store_path.into(), dir: self.inner.dir.clone() });
                    }
                    return Err(self.store_err(store_path, e));
                }
                _ => progress(Progress { done: done.load(Ordering::Relaxed), total }),
            }
        }
        let out = child.wait_with_output().await.map_err(|e| dump_err(e.to_string()))?;
        if !out.status.success() {
            return Err(dump_err(format!(
                "nix-store --dump exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let tt = tt.ok_or_else(|| dump_err("blob store did not finish the import".into()))?;
        let (sha, size) = hash_rx.await.map_err(|_| dump_err("NAR stream ended early".into()))?;
        progress(Progress { done: done.load(Ordering::Relaxed), total });
        Ok((tt, sha, size))
    }

    /// Packs a kernel, an initrd, an optional root disk (split by FastCDC into chunks) and a
    /// kernel command line.
    pub async fn add_bundle(&self, spec: &BundleSpec, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<ImageRef, AddError> {
        let span = info_span!("image_add_bundle", kernel = %spec.kernel.display());
        self.add_bundle_impl(spec, progress).instrument(span).await
    }

    async fn add_bundle_impl(&self, spec: &BundleSpec, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<ImageRef, AddError> {
        let _op = self.inner.op_lock.read().await;
        let mut sizes = Vec::new();
        let mut files = vec![&spec.kernel, &spec.initrd];
        files.extend(spec.disk.iter());
        let mut abs = Vec::new();
        for f in files {
            let md = tokio::fs::metadata(f).await.map_err(|source| AddError::Read { path: f.clone(), source })?;
            if !md.is_file() {
                return Err(AddError::NotAFile(f.clone()));
            }
            sizes.push(md.len());
            abs.push(tokio::fs::canonicalize(f).await.map_err(|source| AddError::Read { path: f.clone(), source })?);
        }
        let total: u64 = sizes.iter().sum();
        let done = Arc::new(AtomicU64::new(0));
        progress(Progress { done: 0, total });
        let mut tags = Vec::new();
        let kernel = self.add_file(&abs[0], &done, total, progress).await?;
        let initrd = self.add_file(&abs[1], &done, total, progress).await?;
        let kernel_part = FilePart { blob: kernel.hash(), size: sizes[0] };
        let initrd_part = FilePart { blob: initrd.hash(), size: sizes[1] };
        tags.push(kernel);
        tags.push(initrd);
        let mut chunk_hashes = Vec::new();
        let mut disk = None;
        let mut parts_size = sizes[0] + sizes[1];
        if let Some(d) = abs.get(2) {
            let (cf, unique, unique_size, chunk_tags) = self.add_chunked(d, &done, total, progress).await?;
            parts_size += unique_size;
            chunk_hashes = unique;
            tags.extend(chunk_tags);
            disk = Some(cf);
        }
        let image = Image::Bundle(Bundle { kernel: kernel_part, initrd: initrd_part, disk, cmdline: spec.cmdline.clone() });
        self.finish_image(image, parts_size, chunk_hashes, tags).await
    }

    async fn add_file(
        &self,
        path: &Path,
        done: &Arc<AtomicU64>,
        total: u64,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<TempTag, AddError> {
        let base = done.load(Ordering::Relaxed);
        let mut items = Box::pin(
            self.inner
                .store
                .add_path_with_opts(AddPathOptions { path: path.to_path_buf(), mode: ImportMode::Copy, format: BlobFormat::Raw })
                .stream()
                .await,
        );
        let what = path.display().to_string();
        while let Some(item) = items.next().await {
            match item {
                AddProgressItem::CopyProgress(o) => progress(Progress { done: base + o, total }),
                AddProgressItem::Size(s) => {
                    done.store(base + s, Ordering::Relaxed);
                }
                AddProgressItem::Done(t) => {
                    progress(Progress { done: done.load(Ordering::Relaxed), total });
                    return Ok(t);
                }
                AddProgressItem::Error(e) => {
                    if is_disk_full(&e) {
                        return Err(AddError::DiskFull { what, dir: self.inner.dir.clone() });
                    }
                    return Err(AddError::Read { path: path.to_path_buf(), source: e });
                }
                _ => {}
            }
        }
        Err(self.store_err(&what, "import ended without a result"))
    }

    /// Splits a file with FastCDC (on a blocking thread, one chunk in memory at a time) and
    /// adds every chunk as a blob; returns the chunk list and the distinct chunks.
    async fn add_chunked(
        &self,
        path: &Path,
        done: &Arc<AtomicU64>,
        total: u64,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(ChunkedFile, Vec<Hash>, u64, Vec<TempTag>), AddError> {
        let p = self.inner.opts.chunking;
        let file = std::fs::File::open(path).map_err(|source| AddError::Read { path: path.to_path_buf(), source })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
        let reader = tokio::task::spawn_blocking(move || {
            let cdc = fastcdc::v2020::StreamCDC::new(
                std::io::BufReader::with_capacity(1 << 20, file),
                p.min as usize,
                p.avg as usize,
                p.max as usize,
            );
            for c in cdc {
                let item = c.map(|c| c.data).map_err(std::io::Error::from);
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    break;
                }
            }
        });
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        let mut unique_size = 0u64;
        let mut tags = Vec::new();
        let mut size = 0u64;
        while let Some(chunk) = rx.recv().await {
            let data = chunk.map_err(|source| AddError::Read { path: path.to_path_buf(), source })?;
            let len = data.len() as u64;
            let tt = self
                .inner
                .store
                .add_bytes(Bytes::from(data))
                .temp_tag()
                .await
                .map_err(|e| self.store_err(&path.display().to_string(), e))?;
            let h = tt.hash();
            order.push(h);
            size += len;
            if seen.insert(h) {
                unique.push(h);
                unique_size += len;
                tags.push(tt);
            }
            let d = done.fetch_add(len, Ordering::Relaxed) + len;
            progress(Progress { done: d, total });
        }
        let _ = reader.await;
        let seq: HashSeq = order.iter().copied().collect();
        let chunk_count = order.len() as u64;
        let seq_tt = self
            .inner
            .store
            .add_bytes(Bytes::from(seq))
            .temp_tag()
            .await
            .map_err(|e| self.store_err("chunk list", e))?;
        let cf = ChunkedFile { chunks: seq_tt.hash(), size, chunk_count };
        tags.push(seq_tt);
        Ok((cf, unique, unique_size, tags))
    }

    /// Stores the manifest and the root hash sequence, then pins the image with its tag.
    async fn finish_image(&self, image: Image, parts_size: u64, chunks: Vec<Hash>, _tags: Vec<TempTag>) -> Result<ImageRef, AddError> {
        let manifest = Manifest::V1(ManifestV1 { image, parts_size });
        let bytes = manifest.encode();
        let mlen = bytes.len() as u64;
        let mtt = self.inner.store.add_bytes(bytes).temp_tag().await.map_err(|e| self.store_err("manifest", e))?;
        let mut children = vec![mtt.hash()];
        let mut seen: BTreeSet<Hash> = children.iter().copied().collect();
        let mut extra = 0u64;
        for h in manifest.direct_parts().into_iter().chain(chunks) {
            if seen.insert(h) {
                children.push(h);
            }
        }
        if let Image::Bundle(Bundle { disk: Some(d), .. }) = manifest.image() {
            extra += d.chunk_count * 32;
        }
        let root: HashSeq = children.iter().copied().collect();
        let root_len = (children.len() * 32) as u64;
        let rtt = self
            .inner
            .store
            .add_bytes_with_opts(AddBytesOptions { data: root.into(), format: BlobFormat::HashSeq })
            .temp_tag()
            .await
            .map_err(|e| self.store_err("image root", e))?;
        let hash = rtt.hash();
        self.inner
            .store
            .tags()
            .set(tag_name(&hash), HashAndFormat::hash_seq(hash))
            .await
            .map_err(|e| self.store_err("image tag", e))?;
        let size = parts_size + mlen + root_len + extra;
        info!(image = %hash, size, parts = children.len() - 1, "image added");
        Ok(ImageRef { hash, size })
    }

    // ------------------------------------------------------------------------------------
    // Info

    /// Reads and validates the root hash sequence of a locally complete-enough image.
    pub(crate) async fn read_root(&self, hash: Hash) -> Result<Vec<Hash>, String> {
        let b = self.read_small(hash, MAX_HASH_SEQ_SIZE).await?;
        let seq = HashSeq::new(b).ok_or("root is not a hash sequence")?;
        let v: Vec<Hash> = seq.iter().collect();
        if v.is_empty() {
            return Err("root hash sequence is empty".into());
        }
        Ok(v)
    }

    pub(crate) async fn read_small(&self, hash: Hash, max: u64) -> Result<Bytes, String> {
        match self.inner.store.blobs().status(hash).await.map_err(|e| e.to_string())? {
            iroh_blobs::api::proto::BlobStatus::Complete { size } if size <= max => {}
            iroh_blobs::api::proto::BlobStatus::Complete { size } => return Err(format!("blob {hash} is {size} bytes, over the {max} limit")),
            _ => return Err(format!("blob {hash} is not complete locally")),
        }
        self.inner.store.blobs().get_bytes(hash).await.map_err(|e| e.to_string())
    }

    /// The manifest of a local image.
    pub async fn manifest(&self, hash: Hash) -> Result<Manifest, InfoError> {
        let root = self.read_root(hash).await.map_err(|reason| InfoError::BadImage { hash, reason })?;
        let b = self
            .read_small(root[0], MAX_MANIFEST_SIZE)
            .await
            .map_err(|reason| InfoError::BadImage { hash, reason })?;
        Manifest::decode(&b).map_err(|source| InfoError::Manifest { hash, source })
    }

    /// True when the image's root and every part are present and verified.
    pub async fn is_complete(&self, hash: Hash) -> bool {
        match self.inner.store.remote().local(HashAndFormat::hash_seq(hash)).await {
            Ok(l) => l.is_complete(),
            Err(_) => false,
        }
    }

    /// Images pinned in this store.
    pub async fn list(&self) -> Result<Vec<LocalImage>, InfoError> {
        let mut out = Vec::new();
        for hash in self.pinned().await.map_err(InfoError::Store)? {
            let complete = self.is_complete(hash).await;
            let materialised = self.mat_path(&hash).join(crate::materialise::MARKER).exists();
            out.push(LocalImage { hash, complete, materialised });
        }
        Ok(out)
    }

    pub(crate) async fn pinned(&self) -> Result<Vec<Hash>, String> {
        let mut tags = self.inner.store.tags().list_prefix(TAG_PREFIX).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(t) = tags.next().await {
            let t = t.map_err(|e| e.to_string())?;
            out.push(t.hash);
        }
        Ok(out)
    }

    pub(crate) fn mat_path(&self, hash: &Hash) -> PathBuf {
        self.inner.mat_dir.join(hash.to_hex())
    }

    // ------------------------------------------------------------------------------------
    // Lifetime

    /// Pins an image (e.g. one fetched by someone else's request) so gc keeps it.
    pub async fn pin(&self, hash: Hash) -> Result<(), GcError> {
        self.inner
            .store
            .tags()
            .set(tag_name(&hash), HashAndFormat::hash_seq(hash))
            .await
            .map_err(|e| GcError::Store(e.to_string()))
    }

    /// Unpins an image, deletes its materialised copy and collects its blobs (blobs shared
    /// with other pinned images stay). Whether a VM still uses it is the caller's check.
    pub async fn remove(&self, hash: Hash) -> Result<GcStats, GcError> {
        let keep: Vec<Hash> = self.pinned().await.map_err(GcError::Store)?.into_iter().filter(|h| *h != hash).collect();
        self.gc(&keep).await
    }

    /// Deletes every pinned image not in `keep`, every materialised copy not in `keep`, and
    /// all blobs no longer referenced by a kept image.
    pub async fn gc(&self, keep: &[Hash]) -> Result<GcStats, GcError> {
        let span = info_span!("image_gc", keep = keep.len());
        async {
            let _excl = self.inner.op_lock.write().await;
            let keep: HashSet<Hash> = keep.iter().copied().collect();
            let mut stats = GcStats { blobs_before: self.count_blobs().await?, ..Default::default() };
            for h in self.pinned().await.map_err(GcError::Store)? {
                if !keep.contains(&h) {
                    self.inner.store.tags().delete(tag_name(&h)).await.map_err(|e| GcError::Store(e.to_string()))?;
                    stats.images_removed += 1;
                }
            }
            let mut rd = tokio::fs::read_dir(&self.inner.mat_dir)
                .await
                .map_err(|source| GcError::Io { path: self.inner.mat_dir.clone(), source })?;
            while let Ok(Some(e)) = rd.next_entry().await {
                let name = e.file_name().to_string_lossy().to_string();
                let hex = name.split('.').next().unwrap_or_default();
                let kept = Hash::from_str_hex(hex).is_some_and(|h| keep.contains(&h)) && !name.contains(".tmp");
                if !kept {
                    crate::materialise::remove_dir(&e.path()).await.map_err(|source| GcError::Io { path: e.path(), source })?;
                    stats.materialised_removed += 1;
                }
            }
            self.inner.gc.run(Duration::from_secs(300)).await?;
            stats.blobs_after = self.count_blobs().await?;
            info!(?stats, "gc done");
            Ok(stats)
        }
        .instrument(span)
        .await
    }

    /// Runs the blob collector once without unpinning anything.
    pub(crate) async fn collect_blobs(&self) -> Result<(), GcError> {
        self.inner.gc.run(Duration::from_secs(300)).await
    }

    pub async fn count_blobs(&self) -> Result<usize, GcError> {
        let hashes = self.inner.store.blobs().list().hashes().await.map_err(|e| GcError::Store(e.to_string()))?;
        Ok(hashes.len())
    }

    async fn clean_partial_materialisations(&self) {
        let Ok(mut rd) = tokio::fs::read_dir(&self.inner.mat_dir).await else { return };
        while let Ok(Some(e)) = rd.next_entry().await {
            let p = e.path();
            let partial = p.to_string_lossy().contains(".tmp") || !p.join(crate::materialise::MARKER).exists();
            if partial {
                info!(path = %p.display(), "removing partial materialisation");
                let _ = crate::materialise::remove_dir(&p).await;
            }
        }
    }
}

/// Parses a 64-character hex image hash.
pub(crate) trait HashHex: Sized {
    fn from_str_hex(s: &str) -> Option<Self>;
}

impl HashHex for Hash {
    fn from_str_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Hash::from_bytes(out))
    }
}

/// Space kept free for the store's database (see `ImageStore::open`).
pub(crate) const RESERVE_BYTES: u64 = 8 << 20;

fn reserve_path(dir: &Path) -> PathBuf {
    dir.join("reserve")
}

/// Creates the reserve file if it is missing; fails quietly on a full disk (it is retried
/// after the next collection).
pub(crate) async fn reserve_space(dir: &Path) -> std::io::Result<()> {
    let p = reserve_path(dir);
    if tokio::fs::metadata(&p).await.is_ok_and(|m| m.len() == RESERVE_BYTES) {
        return Ok(());
    }
    let tmp = dir.join("reserve.tmp");
    let res = async {
        // Written, not just sized: a sparse file would reserve nothing.
        tokio::fs::write(&tmp, vec![0u8; RESERVE_BYTES as usize]).await?;
        tokio::fs::rename(&tmp, &p).await
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    res
}

/// Gives the reserve back to the filesystem.
pub(crate) async fn release_space(dir: &Path) {
    let _ = tokio::fs::remove_file(reserve_path(dir)).await;
}
