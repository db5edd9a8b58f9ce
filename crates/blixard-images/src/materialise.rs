//! Turning a fetched image into something a VM backend can run.
//!
//! Work happens in `materialised/<hash>.tmp-<random>`, which is renamed to
//! `materialised/<hash>` when every part is written and verified; the completion marker
//! is written last. A directory without the marker is partial and is removed (at open, and
//! before a retry).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iroh_blobs::Hash;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, info_span, Instrument};

use crate::error::{is_disk_full, MaterialiseError};
use crate::manifest::{Bundle, Image, Manifest, NixClosure, StorePathEntry, MAX_HASH_SEQ_SIZE, MAX_MANIFEST_SIZE};
use crate::nix::{self, NixOptions};
use crate::store::{ImageStore, Progress};

pub(crate) const MARKER: &str = ".complete";

/// Where a materialised image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Materialised {
    /// Imported into a Nix store (verified); `gc_root` keeps it from Nix's collector while
    /// the image is materialised.
    NixStore { entry: String, gc_root: PathBuf },
    /// Unpacked into `root/nix/store/…` (no Nix on this host). Store paths inside refer to
    /// `/nix/store/…`, so the runner must see `root/nix` at `/nix` (bind mount / namespace).
    StoreLayout { root: PathBuf, entry: PathBuf },
    /// Kernel, initrd and reassembled disk files.
    Bundle { kernel: PathBuf, initrd: PathBuf, disk: Option<PathBuf>, cmdline: String },
}

pub(crate) async fn remove_dir(p: &Path) -> std::io::Result<()> {
    match tokio::fs::symlink_metadata(p).await {
        Ok(md) if md.is_dir() => tokio::fs::remove_dir_all(p).await,
        Ok(_) => tokio::fs::remove_file(p).await,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl ImageStore {
    /// Materialises a fetched image (idempotent; concurrent calls for one image serialise).
    pub async fn materialise(&self, hash: Hash, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<Materialised, MaterialiseError> {
        let span = info_span!("image_materialise", image = %hash.fmt_short());
        self.materialise_impl(hash, progress).instrument(span).await
    }

    async fn materialise_impl(&self, hash: Hash, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<Materialised, MaterialiseError> {
        let _op = self.inner.op_lock.read().await;
        if !self.is_complete(hash).await {
            return Err(MaterialiseError::NotFetched(hash));
        }
        let store_err = |detail: String| MaterialiseError::Store { hash, detail };
        let root = self.read_root(hash).await.map_err(store_err)?;
        let mbytes = self.read_small(root[0], MAX_MANIFEST_SIZE).await.map_err(store_err)?;
        let manifest = Manifest::decode(&mbytes).map_err(|source| MaterialiseError::Manifest { hash, source })?;
        let lock = {
            let mut m = self.inner.mat_locks.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(hash).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))).clone()
        };
        let _g = lock.lock().await;
        let final_dir = self.mat_path(&hash);
        let use_nix = !self.inner.opts.nix.disable_import && self.inner.opts.nix.nix_store().is_some();
        if final_dir.join(MARKER).exists() {
            return Ok(self.describe(&final_dir, &manifest, use_nix));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source: std::io::Error| {
                if is_disk_full(&source) {
                    MaterialiseError::DiskFull { hash, dir: path.clone() }
                } else {
                    MaterialiseError::Io { path: path.clone(), source }
                }
            }
        };
        remove_dir(&final_dir).await.map_err(io(&final_dir))?;
        let tmp = self.inner.mat_dir.join(format!("{}.tmp-{:016x}", hash.to_hex(), rand::random::<u64>()));
        tokio::fs::create_dir_all(&tmp).await.map_err(io(&tmp))?;
        let res = async {
            match manifest.image() {
                Image::Bundle(b) => self.write_bundle(hash, b, &tmp, progress).await?,
                Image::NixClosure(c) if use_nix => self.import_closure(hash, c, &tmp, progress).await?,
                Image::NixClosure(c) => self.unpack_closure(hash, c, &tmp, progress).await?,
            }
            tokio::fs::rename(&tmp, &final_dir).await.map_err(io(&final_dir))?;
            if let (Image::NixClosure(c), true) = (manifest.image(), use_nix) {
                self.add_gc_root(&final_dir, &c.entry).await?;
            }
            let mut f = tokio::fs::File::create(final_dir.join(MARKER)).await.map_err(io(&final_dir))?;
            f.write_all(b"complete\n").await.map_err(io(&final_dir))?;
            f.sync_all().await.map_err(io(&final_dir))?;
            Ok::<_, MaterialiseError>(())
        }
        .await;
        if let Err(e) = res {
            let _ = remove_dir(&tmp).await;
            let _ = remove_dir(&final_dir).await;
            return Err(e);
        }
        info!(dir = %final_dir.display(), "image materialised");
        Ok(self.describe(&final_dir, &manifest, use_nix))
    }

    /// Where a materialised image is, if it is complete.
    pub async fn materialised(&self, hash: Hash) -> Option<Materialised> {
        let dir = self.mat_path(&hash);
        if !dir.join(MARKER).exists() {
            return None;
        }
        let manifest = self.manifest(hash).await.ok()?;
        let use_nix = dir.join("gcroot").symlink_metadata().is_ok();
        Some(self.describe(&dir, &manifest, use_nix))
    }

    fn describe(&self, dir: &Path, m: &Manifest, use_nix: bool) -> Materialised {
        match m.image() {
            Image::Bundle(b) => Materialised::Bundle {
                kernel: dir.join("kernel"),
                initrd: dir.join("initrd"),
                disk: b.disk.as_ref().map(|_| dir.join("disk.img")),
                cmdline: b.cmdline.clone(),
            },
            Image::NixClosure(c) if use_nix => Materialised::NixStore { entry: c.entry.clone(), gc_root: dir.join("gcroot") },
            Image::NixClosure(c) => Materialised::StoreLayout {
                root: dir.to_path_buf(),
                entry: dir.join(c.entry.trim_start_matches('/')),
            },
        }
    }

    /// Exports a blob to `target` and checks the file's BLAKE3 hash: small parts are
    /// stored without an fsync of their own (see fetch), so what reaches the VM is
    /// checked once more here.
    async fn export_blob(&self, hash: Hash, blob: Hash, target: &Path) -> Result<(), MaterialiseError> {
        self.inner.store.blobs().export(blob, target).finish().await.map_err(|e| {
            let detail = e.to_string();
            if crate::error::is_disk_full_msg(&detail) {
                MaterialiseError::DiskFull { hash, dir: target.parent().unwrap_or(target).to_path_buf() }
            } else {
                MaterialiseError::Store { hash, detail: format!("exporting {blob} to {}: {detail}", target.display()) }
            }
        })?;
        let path = target.to_path_buf();
        let got = tokio::task::spawn_blocking(move || -> std::io::Result<blake3::Hash> {
            let mut h = blake3::Hasher::new();
            h.update_reader(std::fs::File::open(&path)?)?;
            Ok(h.finalize())
        })
        .await
        .map_err(|e| MaterialiseError::Store { hash, detail: format!("hashing {}: {e}", target.display()) })?
        .map_err(|source| MaterialiseError::Io { path: target.to_path_buf(), source })?;
        if Hash::from(got) != blob {
            return Err(damaged(hash, blob));
        }
        Ok(())
    }

    async fn write_bundle(&self, hash: Hash, b: &Bundle, dir: &Path, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<(), MaterialiseError> {
        let total = b.kernel.size + b.initrd.size + b.disk.as_ref().map_or(0, |d| d.size);
        let mut done = 0;
        self.export_blob(hash, b.kernel.blob, &dir.join("kernel")).await?;
        done += b.kernel.size;
        progress(Progress { done, total });
        self.export_blob(hash, b.initrd.blob, &dir.join("initrd")).await?;
        done += b.initrd.size;
        progress(Progress { done, total });
        let io = |p: PathBuf| move |source: std::io::Error| {
            if is_disk_full(&source) {
                MaterialiseError::DiskFull { hash, dir: p.clone() }
            } else {
                MaterialiseError::Io { path: p.clone(), source }
            }
        };
        tokio::fs::write(dir.join("cmdline"), b.cmdline.as_bytes()).await.map_err(io(dir.join("cmdline")))?;
        if let Some(d) = &b.disk {
            let path = dir.join("disk.img");
            let seq_bytes = self
                .read_small(d.chunks, MAX_HASH_SEQ_SIZE)
                .await
                .map_err(|detail| MaterialiseError::Store { hash, detail })?;
            let seq = iroh_blobs::hashseq::HashSeq::new(seq_bytes)
                .ok_or_else(|| MaterialiseError::Store { hash, detail: "chunk list is not a hash sequence".into() })?;
            let f = tokio::fs::File::create(&path).await.map_err(io(path.clone()))?;
            let mut w = tokio::io::BufWriter::with_capacity(1 << 20, f);
            let mut written = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            for chunk in seq.iter() {
                let mut r = self.inner.store.blobs().reader(chunk);
                let mut hasher = blake3::Hasher::new();
                loop {
                    let n = r.read(&mut buf).await.map_err(|e| MaterialiseError::Store { hash, detail: format!("reading chunk {chunk}: {e}") })?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    w.write_all(&buf[..n]).await.map_err(io(path.clone()))?;
                    written += n as u64;
                }
                if Hash::from(hasher.finalize()) != chunk {
                    return Err(damaged(hash, chunk));
                }
                progress(Progress { done: done + written, total });
            }
            w.flush().await.map_err(io(path.clone()))?;
            w.get_ref().sync_all().await.map_err(io(path.clone()))?;
            if written != d.size {
                return Err(MaterialiseError::Store { hash, detail: format!("reassembled disk is {written} bytes, manifest says {}", d.size) });
            }
        }
        Ok(())
    }

    /// Exports a NAR blob to `tmp_file` and checks its SHA-256 and size against the manifest.
    async fn verified_nar(&self, hash: Hash, p: &StorePathEntry, tmp_file: &Path) -> Result<(), MaterialiseError> {
        self.export_blob(hash, p.blob, tmp_file).await?;
        let file = tmp_file.to_path_buf();
        let (sha, size) = tokio::task::spawn_blocking(move || -> std::io::Result<([u8; 32], u64)> {
            let mut f = std::fs::File::open(&file)?;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let k = std::io::Read::read(&mut f, &mut buf)?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
            Ok((h.finalize().into(), n))
        })
        .await
        .map_err(|e| MaterialiseError::Store { hash, detail: e.to_string() })?
        .map_err(|source| MaterialiseError::Io { path: tmp_file.to_path_buf(), source })?;
        if sha != p.nar_hash || size != p.nar_size {
            return Err(MaterialiseError::NarHashMismatch {
                path: p.store_path.clone(),
                expected: nix::nix32_encode(&p.nar_hash),
                got: nix::nix32_encode(&sha),
                expected_size: p.nar_size,
                got_size: size,
            });
        }
        Ok(())
    }

    fn ordered(c: &NixClosure) -> Result<Vec<StorePathEntry>, MaterialiseError> {
        let infos = c
            .paths
            .iter()
            .map(|p| nix::PathInfo { path: p.store_path.clone(), nar_hash: p.nar_hash, nar_size: p.nar_size, references: p.references.clone() })
            .collect();
        let sorted = nix::topo_sort(infos).map_err(|detail| MaterialiseError::Store { hash: Hash::EMPTY, detail })?;
        let by: std::collections::HashMap<&str, &StorePathEntry> = c.paths.iter().map(|p| (p.store_path.as_str(), p)).collect();
        Ok(sorted.iter().filter_map(|i| by.get(i.path.as_str()).map(|p| (*p).clone())).collect())
    }

    /// Verified import into the Nix store: each NAR is checked (SHA-256 and size against the
    /// manifest) *before* it is written into one `nix-store --import` stream (the
    /// `nix-store --export` format, references first); afterwards the store's own record
    /// of every imported path is compared with the manifest.
    async fn import_closure(&self, hash: Hash, c: &NixClosure, dir: &Path, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<(), MaterialiseError> {
        let nixo: &NixOptions = &self.inner.opts.nix;
        let bin = nixo.nix_store().ok_or_else(|| MaterialiseError::Store { hash, detail: "nix-store disappeared".into() })?;
        let store = nixo.target_store.as_deref();
        let paths = Self::ordered(c)?;
        // Which paths are already valid there?
        let mut args: Vec<String> = store.map(|s| vec!["--store".into(), s.into()]).unwrap_or_default();
        args.extend(["--check-validity".into(), "--print-invalid".into()]);
        args.extend(paths.iter().map(|p| p.store_path.clone()));
        let invalid: std::collections::HashSet<String> =
            nix::run_nix_store(nixo, &bin, &args).await?.lines().map(|l| l.trim().to_string()).collect();
        let todo: Vec<&StorePathEntry> = paths.iter().filter(|p| invalid.contains(&p.store_path)).collect();
        let total: u64 = todo.iter().map(|p| p.nar_size).sum();
        info!(paths = paths.len(), to_import = todo.len(), bytes = total, "importing closure into the Nix store");
        if todo.is_empty() {
            return Ok(());
        }
        let mut cmd = nixo.command(&bin);
        if let Some(s) = store {
            cmd.args(["--store", s]);
        }
        let mut child = cmd
            .arg("--import")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|source| nix::NixCommandError::Spawn { bin: bin.clone(), source })?;
        let mut stdin = child.stdin.take().ok_or_else(|| MaterialiseError::Store { hash, detail: "no stdin".into() })?;
        let nar_file = dir.join(".nar");
        let mut done = 0;
        let mut write_res: Result<(), MaterialiseError> = Ok(());
        for p in &todo {
            if let Err(e) = self.verified_nar(hash, p, &nar_file).await {
                write_res = Err(e);
                break;
            }
            let pipe_err = |e: std::io::Error| MaterialiseError::Store { hash, detail: format!("writing to nix-store --import: {e}") };
            let step = async {
                stdin.write_all(&nix::export_header()).await.map_err(pipe_err)?;
                let mut f = tokio::fs::File::open(&nar_file).await.map_err(|source| MaterialiseError::Io { path: nar_file.clone(), source })?;
                tokio::io::copy(&mut f, &mut stdin).await.map_err(pipe_err)?;
                stdin.write_all(&nix::export_trailer(&p.store_path, &p.references)).await.map_err(pipe_err)?;
                Ok::<_, MaterialiseError>(())
            };
            if let Err(e) = step.await {
                write_res = Err(e);
                break;
            }
            done += p.nar_size;
            progress(Progress { done, total });
        }
        let _ = tokio::fs::remove_file(&nar_file).await;
        if write_res.is_ok() {
            if let Err(e) = stdin.write_all(&nix::export_end()).await {
                write_res = Err(MaterialiseError::Store { hash, detail: format!("writing to nix-store --import: {e}") });
            }
        }
        drop(stdin);
        let out = child.wait_with_output().await.map_err(|source| nix::NixCommandError::Spawn { bin: bin.clone(), source })?;
        // A verification failure aborts the stream: paths before it were verified and are
        // fine to keep; the bad one is never sent.
        write_res?;
        if !out.status.success() {
            return Err(nix::NixCommandError::Failed {
                args: "--import".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().chars().take(2000).collect(),
            }
            .into());
        }
        let imported: Vec<String> = todo.iter().map(|p| p.store_path.clone()).collect();
        let infos = nix::dump_db(nixo, &bin, store, &imported).await?;
        for p in &todo {
            let ok = infos.iter().any(|i| i.path == p.store_path && i.nar_hash == p.nar_hash && i.nar_size == p.nar_size);
            if !ok {
                return Err(MaterialiseError::ImportMismatch { path: p.store_path.clone() });
            }
        }
        Ok(())
    }

    async fn add_gc_root(&self, dir: &Path, entry: &str) -> Result<(), MaterialiseError> {
        let nixo = &self.inner.opts.nix;
        let Some(bin) = nixo.nix_store() else { return Ok(()) };
        let mut args: Vec<String> = nixo.target_store.as_ref().map(|s| vec!["--store".into(), s.clone()]).unwrap_or_default();
        args.extend([
            "--add-root".into(),
            dir.join("gcroot").to_string_lossy().to_string(),
            "--realise".into(),
            entry.to_string(),
        ]);
        nix::run_nix_store(nixo, &bin, &args).await?;
        Ok(())
    }

    /// No Nix: unpack every verified NAR into `dir/nix/store/<name>`.
    async fn unpack_closure(&self, hash: Hash, c: &NixClosure, dir: &Path, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<(), MaterialiseError> {
        let store_dir = dir.join(nix::STORE_DIR.trim_start_matches('/'));
        tokio::fs::create_dir_all(&store_dir).await.map_err(|source| MaterialiseError::Io { path: store_dir.clone(), source })?;
        let total: u64 = c.paths.iter().map(|p| p.nar_size).sum();
        let mut done = 0;
        let nar_file = dir.join(".nar");
        for p in Self::ordered(c)? {
            self.verified_nar(hash, &p, &nar_file).await?;
            // Validated by the manifest decoder: `/nix/store/<hash>-<name>`, no `/` in the base.
            if nix::store_path_name(&p.store_path).is_none() {
                return Err(MaterialiseError::Store { hash, detail: format!("{} is not a store path", p.store_path) });
            }
            let target = store_dir.join(p.store_path.trim_start_matches(nix::STORE_DIR).trim_start_matches('/'));
            let file = nar_file.clone();
            let t2 = target.clone();
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&file).map_err(crate::nix::NarError::Read)?;
                nix::unpack_nar(std::io::BufReader::with_capacity(1 << 20, f), &t2)
            })
            .await
            .map_err(|e| MaterialiseError::Store { hash, detail: e.to_string() })?
            .map_err(|source| match &source {
                crate::nix::NarError::Io { source: io, .. } if is_disk_full(io) => MaterialiseError::DiskFull { hash, dir: store_dir.clone() },
                _ => MaterialiseError::Nar { path: p.store_path.clone(), source },
            })?;
            done += p.nar_size;
            progress(Progress { done, total });
        }
        let _ = tokio::fs::remove_file(&nar_file).await;
        Ok(())
    }
}

/// A stored part whose bytes no longer hash to its name (e.g. lost in a power cut before
/// they reached the disk).
fn damaged(hash: Hash, part: Hash) -> MaterialiseError {
    MaterialiseError::Store {
        hash,
        detail: format!("stored part {part} does not match its hash (its bytes were lost before reaching the disk); `blixard image gc` drops the image once no VM on this node uses it, and the next use fetches it again"),
    }
}
