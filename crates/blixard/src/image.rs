//! `blixard image ...`: push images to the mesh, list, inspect, remove, gc, pull.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use blixard_images::{BundleSpec, ImageStore, ImageStoreOptions, Progress};
use blixard_node::client::Client;
use blixard_types::rpc::{ClientRequest, ClientResponse};
use blixard_types::ticket::PeerAddr;

use crate::output;
use crate::progress::Bar;

#[derive(clap::Subcommand, Debug)]
pub enum ImageCmd {
    /// Push an image: a Nix store path (or `result` link) of a microvm.nix runner (its
    /// closure is pushed), a bundle directory (kernel, initrd.cpio.gz, disk.img, cmdline),
    /// or --kernel/--initrd [--disk] [--cmdline]. Prints the image hash.
    Push(PushArgs),
    /// The image catalogue.
    List,
    /// One image (name, hash or unique hash prefix).
    Info { reference: String },
    /// Remove an image from the catalogue and from every node (refused while a VM uses it).
    Rm { reference: String },
    /// Delete local image data the catalogue no longer lists, on every node.
    Gc,
    /// Fetch an image onto a node ahead of time.
    Pull {
        reference: String,
        #[arg(long)]
        node: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// Store path / `result` link of a runner, or a bundle directory.
    path: Option<PathBuf>,
    /// Name the image (the name then points at this version).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, conflicts_with = "path")]
    kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    disk: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
}

pub async fn run(cmd: ImageCmd, client: &Client, json: bool) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Push(args) => push(args, client, json).await,
        ImageCmd::List => {
            let ClientResponse::Images(list) = client.request(&ClientRequest::ImageList).await? else {
                bail!("unexpected answer")
            };
            if json {
                output::json(&list)
            } else {
                output::images(&list)
            }
        }
        ImageCmd::Info { reference } => {
            let ClientResponse::Image(i) = client.request(&ClientRequest::ImageInfo { reference }).await? else {
                bail!("unexpected answer")
            };
            if json {
                output::json(&i)
            } else {
                output::image(&i)
            }
        }
        ImageCmd::Rm { reference } => gc_output(client.request(&ClientRequest::ImageRemove { reference }).await?, json),
        ImageCmd::Gc => gc_output(client.request(&ClientRequest::ImageGc { node: None }).await?, json),
        ImageCmd::Pull { reference, node } => {
            let ClientResponse::Pulled(p) = client.request(&ClientRequest::ImagePull { reference, node }).await? else {
                bail!("unexpected answer")
            };
            if json {
                output::json(&p)
            } else {
                output::line(&format!(
                    "{} on {}: {} transferred in {:.1}s ({} of {} parts were already there)",
                    &p.image.hash[..12],
                    p.node.short(),
                    crate::progress::human(p.bytes_transferred),
                    p.elapsed_ms as f64 / 1000.0,
                    p.parts_already_local,
                    p.parts
                ))
            }
        }
    }
}

fn gc_output(resp: ClientResponse, json: bool) -> anyhow::Result<()> {
    let ClientResponse::Gc(reports) = resp else { bail!("unexpected answer {resp:?}") };
    if json {
        return output::json(&reports);
    }
    for r in &reports {
        match &r.error {
            None => output::line(&format!(
                "{}: {} image(s) removed, blobs {} -> {}",
                r.node.short(),
                r.images_removed,
                r.blobs_before,
                r.blobs_after
            ))?,
            Some(e) => output::line(&format!("{}: failed: {e}", r.node.short()))?,
        }
    }
    Ok(())
}

/// Packs the image into a store of this CLI, serves it on the CLI's endpoint to the
/// cluster's members only, and asks a node to fetch it (which then records it).
async fn push(args: PushArgs, client: &Client, json: bool) -> anyhow::Result<()> {
    if let Some(n) = &args.name {
        blixard_types::image::validate_image_name(n).map_err(anyhow::Error::msg)?;
    }
    let members = match client.request(&ClientRequest::Status).await? {
        ClientResponse::Status(s) => s.members.into_iter().map(|m| m.id).collect::<Vec<_>>(),
        other => bail!("unexpected answer {other:?}"),
    };
    let dir = push_dir()?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let store = ImageStore::open(client.endpoint().clone(), ImageStoreOptions::new(&dir))
        .await
        .with_context(|| format!("cannot open a temporary image store in {}", dir.display()))?;
    let bar = Arc::new(Mutex::new(Bar::new("packing")));
    let on_progress = {
        let bar = bar.clone();
        move |p: Progress| bar.lock().unwrap_or_else(|e| e.into_inner()).update(p.done, p.total)
    };
    let image = match (&args.path, &args.kernel) {
        (Some(p), None) if p.join("kernel").is_file() => store.add_bundle(&bundle_dir(p)?, &on_progress).await?,
        (Some(p), None) => store.add_closure(p, &on_progress).await?,
        (None, Some(kernel)) => {
            let spec = BundleSpec {
                kernel: absolute(kernel)?,
                initrd: absolute(args.initrd.as_ref().context("--initrd is required with --kernel")?)?,
                disk: args.disk.as_deref().map(absolute).transpose()?,
                cmdline: args.cmdline.clone().unwrap_or_else(|| "console=ttyS0 panic=-1".into()),
            };
            store.add_bundle(&spec, &on_progress).await?
        }
        _ => bail!("give a PATH (store path, `result` link or bundle directory) or --kernel/--initrd"),
    };
    bar.lock().unwrap_or_else(|e| e.into_inner()).finish(image.size);

    // Serve to members only: the gate checks the key of every connection.
    let allow: blixard_mesh::auth::Authorizer = Arc::new(move |k| members.contains(k));
    let (handler, sent) = store.protocol_handler_counting();
    let router = iroh::protocol::Router::builder(client.endpoint().clone())
        .accept(blixard_images::ALPN, blixard_mesh::auth::Gate::new("blobs", allow, handler))
        .spawn();
    let me = blixard_mesh::node_id(&client.endpoint().id());
    let req = ClientRequest::ImagePush {
        hash: image.hash.to_hex().to_string(),
        name: args.name.clone(),
        provider: PeerAddr { id: me, addrs: client.dialable_addrs() },
    };
    let mut upload = Bar::new("uploading");
    let total = image.size;
    let request = client.request_timeout(&req, Duration::from_secs(24 * 3600));
    tokio::pin!(request);
    let resp = loop {
        tokio::select! {
            r = &mut request => break r?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => upload.update(sent.load(Ordering::Relaxed), total),
        }
    };
    upload.finish(sent.load(Ordering::Relaxed).min(total));
    let _ = router.shutdown().await;
    let ClientResponse::Image(info) = resp else { bail!("unexpected answer {resp:?}") };
    if json {
        output::json(&info)
    } else {
        let name = info.names.first().map(|n| format!(" ({n})")).unwrap_or_default();
        output::line(&format!("{}{name}", info.hash))
    }
}

/// A bundle directory as `images/test-guest/build.sh` makes it.
fn bundle_dir(dir: &Path) -> anyhow::Result<BundleSpec> {
    let dir = absolute(dir)?;
    let initrd = dir.join("initrd.cpio.gz");
    if !initrd.is_file() {
        bail!("{} has a kernel but no initrd.cpio.gz; a bundle dir holds kernel, initrd.cpio.gz, optional disk.img and cmdline", dir.display());
    }
    let disk = Some(dir.join("disk.img")).filter(|p| p.is_file());
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "console=ttyS0 panic=-1".into());
    Ok(BundleSpec { kernel: dir.join("kernel"), initrd, disk, cmdline })
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("invalid path {}", p.display()))
}

/// A fresh directory for the push's temporary store, under the user's cache dir (not
/// /tmp, which is often a small tmpfs).
fn push_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; set XDG_CACHE_HOME")?).join(".cache"),
    };
    let dir = base.join("blixard").join(format!("push-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
