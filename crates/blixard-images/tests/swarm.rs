#![allow(clippy::unwrap_used)]
//! Real endpoints on loopback, real FsStores: push, swarm fetch, failure, corruption,
//! dedup across disk versions, gc.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_images::{BundleSpec, FetchError, Materialised, Progress};
use common::*;

async fn bundle_on(n: &Node, disk_len: usize, seed: u64) -> (blixard_images::ImageRef, BundleSpec) {
    let src = n.dir.path();
    let spec = BundleSpec {
        kernel: write(src, &format!("kernel{seed}"), &pseudo_random(1 << 20, seed + 1)),
        initrd: write(src, &format!("initrd{seed}"), &pseudo_random(300_000, seed + 2)),
        disk: Some(write(src, &format!("disk{seed}.img"), &pseudo_random(disk_len, seed + 3))),
        cmdline: "console=ttyS0 panic=-1".into(),
    };
    let last = AtomicU64::new(0);
    let r = n
        .images
        .add_bundle(&spec, &|p: Progress| {
            assert!(p.done <= p.total);
            last.store(p.done, Ordering::Relaxed);
        })
        .await
        .unwrap();
    assert_eq!(last.load(Ordering::Relaxed), (1 << 20) + 300_000 + disk_len as u64, "add progress reaches the total");
    (r, spec)
}

fn assert_bundle_files(m: &Materialised, spec: &BundleSpec) {
    let Materialised::Bundle { kernel, initrd, disk, cmdline } = m else { panic!("not a bundle: {m:?}") };
    assert_eq!(std::fs::read(kernel).unwrap(), std::fs::read(&spec.kernel).unwrap());
    assert_eq!(std::fs::read(initrd).unwrap(), std::fs::read(&spec.initrd).unwrap());
    let disk = disk.as_ref().unwrap();
    assert!(std::fs::read(disk).unwrap() == std::fs::read(spec.disk.as_ref().unwrap()).unwrap(), "disk bytes differ");
    assert_eq!(cmdline, &spec.cmdline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_on_a_fetch_on_b_then_on_c_from_a_and_b() {
    let a = node().await;
    let b = node().await;
    let c = node_with(|o| o.fetch.per_provider = 2).await;
    let (img, spec) = bundle_on(&a, 8 << 20, 10).await;

    let last = Arc::new(AtomicU64::new(0));
    let l2 = last.clone();
    let sb = b.images.fetch(img.hash, vec![a.addr()], &move |p: Progress| l2.store(p.done, Ordering::Relaxed)).await.unwrap();
    assert!(sb.bytes_transferred >= 8 << 20, "{sb:?}");
    assert!(last.load(Ordering::Relaxed) > 0);
    assert!(b.images.is_complete(img.hash).await);
    let m = b.images.materialise(img.hash, &noop).await.unwrap();
    assert_bundle_files(&m, &spec);

    let sc = c.images.fetch(img.hash, vec![a.addr(), b.addr()], &noop).await.unwrap();
    eprintln!("C fetched from A and B: {:?}", sc.providers);
    assert_eq!(sc.providers.len(), 2);
    for p in &sc.providers {
        assert!(p.parts > 0 && p.bytes > 0, "both providers must serve parts: {:?}", sc.providers);
        assert!(p.dropped.is_none());
    }
    assert_bundle_files(&c.images.materialise(img.hash, &noop).await.unwrap(), &spec);
    // Idempotent, and listed.
    assert_bundle_files(&c.images.materialise(img.hash, &noop).await.unwrap(), &spec);
    let list = c.images.list().await.unwrap();
    assert!(list.iter().any(|i| i.hash == img.hash && i.complete && i.materialised));
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_share_one_download() {
    let a = node().await;
    let b = node().await;
    let (img, _) = bundle_on(&a, 4 << 20, 20).await;
    let (r1, r2) = tokio::join!(
        b.images.fetch(img.hash, vec![a.addr()], &noop),
        b.images.fetch(img.hash, vec![a.addr()], &noop)
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert!(r1.joined != r2.joined, "exactly one call joins the other: {} {}", r1.joined, r2.joined);
    assert_eq!(r1.bytes_transferred, r2.bytes_transferred, "one download, shared result");
    // A fetch of a complete image transfers nothing.
    let r3 = b.images.fetch(img.hash, vec![a.addr()], &noop).await.unwrap();
    assert_eq!(r3.bytes_transferred, 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_share_moves_to_the_others() {
    let a = node().await;
    let d = node().await;
    let c = node_with(|o| {
        o.fetch.per_provider = 2;
        o.fetch.request_timeout = Duration::from_secs(5);
        o.fetch.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let (img, spec) = bundle_on(&a, 48 << 20, 30).await;
    d.images.fetch(img.hash, vec![a.addr()], &noop).await.unwrap();
    // A dead address too: never reachable.
    let dead = {
        let ep = endpoint(vec![]).await;
        let ad = addr(&ep);
        ep.close().await;
        ad
    };
    let d_addr = d.addr();
    let killed = Arc::new(AtomicU64::new(0));
    let d_router = d.router.clone();
    let k2 = killed.clone();
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let killer = tokio::spawn(async move {
        if kill_rx.recv().await.is_some() {
            d_router.endpoint().close().await;
            k2.store(1, Ordering::SeqCst);
        }
    });
    let sent = std::sync::atomic::AtomicBool::new(false);
    let stats = c
        .images
        .fetch(img.hash, vec![a.addr(), d_addr.clone(), dead.clone()], &|p: Progress| {
            if p.total > 0 && p.done * 5 > p.total && !sent.swap(true, Ordering::SeqCst) {
                let _ = kill_tx.send(());
            }
        })
        .await
        .unwrap();
    killer.await.unwrap();
    assert_eq!(killed.load(Ordering::SeqCst), 1, "provider D was killed mid-transfer");
    eprintln!("providers after a kill: {:?}", stats.providers);
    let pa = stats.providers.iter().find(|p| p.id == a.addr().id).unwrap();
    let pdead = stats.providers.iter().find(|p| p.id == dead.id).unwrap();
    assert!(pa.parts > 0);
    assert_eq!(pdead.parts, 0);
    assert!(pdead.dropped.is_some(), "unreachable provider is dropped: {pdead:?}");
    assert_bundle_files(&c.images.materialise(img.hash, &noop).await.unwrap(), &spec);
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_provider_is_dropped_and_parts_refetched() {
    let a = node().await;
    let c = node_with(|o| o.fetch.per_provider = 2).await;
    let (img, spec) = bundle_on(&a, 8 << 20, 40).await;
    let pep = endpoint(vec![blixard_images::ALPN.to_vec()]).await;
    let proxy = CorruptingProxy { ep: pep.clone(), upstream: a.addr(), stall: false };
    let prouter = iroh::protocol::Router::builder(pep.clone()).accept(blixard_images::ALPN, proxy).spawn();
    let stats = c.images.fetch(img.hash, vec![addr(&pep), a.addr()], &noop).await.unwrap();
    eprintln!("providers with a corrupting one: {:?}", stats.providers);
    let bad = stats.providers.iter().find(|p| p.id == pep.id()).unwrap();
    assert!(bad.dropped.as_deref().is_some_and(|d| d.contains("corrupt")), "{bad:?}");
    assert_bundle_files(&c.images.materialise(img.hash, &noop).await.unwrap(), &spec);
    let _ = prouter.shutdown().await;
    a.stop().await;
    c.stop().await;
}

/// A provider that stops answering holds up the end of a fetch by about a second (the end
/// game asks another provider for its parts too), not by the 60 s request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_does_not_hold_up_the_end() {
    let a = node().await;
    let c = node_with(|o| o.fetch.request_timeout = Duration::from_secs(60)).await;
    let (img, spec) = bundle_on(&a, 8 << 20, 41).await;
    let pep = endpoint(vec![blixard_images::ALPN.to_vec()]).await;
    let proxy = CorruptingProxy { ep: pep.clone(), upstream: a.addr(), stall: true };
    let prouter = iroh::protocol::Router::builder(pep.clone()).accept(blixard_images::ALPN, proxy).spawn();
    let stats = tokio::time::timeout(
        Duration::from_secs(40),
        c.images.fetch(img.hash, vec![addr(&pep), a.addr()], &noop),
    )
    .await
    .expect("the fetch waited for the stalled provider's timeout")
    .unwrap();
    eprintln!("providers with a stalled one: {:?} in {:?}", stats.providers, stats.elapsed);
    let stalled = stats.providers.iter().find(|p| p.id == pep.id()).unwrap();
    assert_eq!(stalled.parts, 0, "{stalled:?}");
    // Every part was received once: a part already stored is not asked for again while its
    // first request is still out.
    let once = node().await;
    let plain = once.images.fetch(img.hash, vec![a.addr()], &noop).await.unwrap();
    assert_eq!(stats.bytes_transferred, plain.bytes_transferred);
    once.stop().await;
    assert_bundle_files(&c.images.materialise(img.hash, &noop).await.unwrap(), &spec);
    let _ = prouter.shutdown().await;
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_disk_version_shares_chunks() {
    let a = node().await;
    let b = node().await;
    let len = 64usize << 20;
    let v1 = pseudo_random(len, 50);
    let mut v2 = v1.clone();
    // Change 1% of the bytes, in 4 regions.
    let region = len / 100 / 4;
    for k in 0..4 {
        let start = (k * 2 + 1) * len / 9;
        for x in &mut v2[start..start + region] {
            *x = x.wrapping_add(1);
        }
    }
    let dir = a.dir.path();
    let mk = |name: &str, disk: &[u8]| BundleSpec {
        kernel: write(dir, &format!("{name}-k"), b"kernel"),
        initrd: write(dir, &format!("{name}-i"), b"initrd"),
        disk: Some(write(dir, &format!("{name}.img"), disk)),
        cmdline: String::new(),
    };
    let s1 = mk("v1", &v1);
    let s2 = mk("v2", &v2);
    let i1 = a.images.add_bundle(&s1, &noop).await.unwrap();
    let i2 = a.images.add_bundle(&s2, &noop).await.unwrap();
    let chunks = |m: blixard_images::Manifest| match m.image() {
        blixard_images::manifest::Image::Bundle(b) => b.disk.clone().unwrap(),
        _ => panic!(),
    };
    let d1 = chunks(a.images.manifest(i1.hash).await.unwrap());
    let d2 = chunks(a.images.manifest(i2.hash).await.unwrap());
    let list = |h| {
        let a = &a;
        async move {
            let b = a.images.blobs().get_bytes(h).await.unwrap();
            iroh_blobs::hashseq::HashSeq::new(b).unwrap().iter().collect::<std::collections::HashSet<_>>()
        }
    };
    let (c1, c2) = (list(d1.chunks).await, list(d2.chunks).await);
    let shared = c1.intersection(&c2).count();
    eprintln!("disk v1: {} chunks, v2: {} chunks, shared {shared}", c1.len(), c2.len());
    assert!(shared * 10 >= c2.len() * 9, "at least 90% of chunks shared");

    b.images.fetch(i1.hash, vec![a.addr()], &noop).await.unwrap();
    let st = b.images.fetch(i2.hash, vec![a.addr()], &noop).await.unwrap();
    let pct = st.bytes_transferred as f64 * 100.0 / len as f64;
    eprintln!("second version: transferred {} bytes = {pct:.2}% of the disk", st.bytes_transferred);
    assert!(pct <= 3.0, "transferred {pct:.2}% > 3%");
    let m = b.images.materialise(i2.hash, &noop).await.unwrap();
    let Materialised::Bundle { disk, .. } = m else { panic!() };
    assert!(std::fs::read(disk.unwrap()).unwrap() == v2);

    // gc keeps v2 only: v2's chunks stay, v1's own chunks go.
    let before = b.images.count_blobs().await.unwrap();
    let gs = b.images.gc(&[i2.hash]).await.unwrap();
    assert_eq!(gs.images_removed, 1);
    assert!(gs.blobs_after < before, "{gs:?}");
    assert!(b.images.is_complete(i2.hash).await);
    assert!(!b.images.is_complete(i1.hash).await);
    assert!(b.images.materialised(i2.hash).await.is_some());
    // remove: nothing of it stays.
    b.images.remove(i2.hash).await.unwrap();
    assert!(!b.images.is_complete(i2.hash).await);
    assert!(b.images.materialised(i2.hash).await.is_none());
    assert_eq!(b.images.count_blobs().await.unwrap(), 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_clear_errors() {
    let a = node().await;
    let b = node_with(|o| {
        o.fetch.missing_give_up = Duration::from_millis(300);
        o.fetch.missing_retry = Duration::from_millis(100);
    })
    .await;
    // Not a store path.
    let e = a.images.add_closure(a.dir.path(), &noop).await.unwrap_err();
    assert!(matches!(e, blixard_images::AddError::NotAStorePath(_) | blixard_images::AddError::NixNotFound), "{e}");
    // Missing file.
    let spec = BundleSpec { kernel: a.dir.path().join("nope"), initrd: a.dir.path().join("nope"), disk: None, cmdline: String::new() };
    let e = a.images.add_bundle(&spec, &noop).await.unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // No providers / unknown image.
    let unknown = blixard_images::Hash::new(b"no such image");
    assert!(matches!(b.images.fetch(unknown, vec![], &noop).await, Err(FetchError::NoProviders(_))));
    let e = b.images.fetch(unknown, vec![a.addr()], &noop).await.unwrap_err();
    assert!(matches!(e, FetchError::Unavailable { .. }), "{e}");
    eprintln!("unknown image: {e}");
    // Not an image: a plain blob, and a hash sequence whose manifest is garbage.
    let plain = a.images.blobs().add_slice(b"hello").await.unwrap();
    let e = b.images.fetch(plain.hash, vec![a.addr()], &noop).await.unwrap_err();
    assert!(matches!(e, FetchError::BadImage { .. }), "{e}");
    let garbage = a.images.blobs().add_slice(b"\x00\x07garbage").await.unwrap();
    let root: iroh_blobs::hashseq::HashSeq = [garbage.hash].into_iter().collect();
    let root = a.images.blobs().add_bytes(bytes_of(root)).await.unwrap();
    let e = b.images.fetch(root.hash, vec![a.addr()], &noop).await.unwrap_err();
    assert!(matches!(e, FetchError::Manifest { .. }), "{e}");
    eprintln!("tampered: {e}");
    // Materialising something not fetched.
    assert!(matches!(b.images.materialise(unknown, &noop).await, Err(blixard_images::MaterialiseError::NotFetched(_))));
    a.stop().await;
    b.stop().await;
}

fn bytes_of(h: iroh_blobs::hashseq::HashSeq) -> bytes::Bytes {
    h.into()
}

/// A fetched part written without its own fsync is checked again when materialised: bytes
/// that no longer match their hash (here overwritten on disk) stop the materialise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_part_is_caught_when_materialising() {
    let a = node().await;
    let b = node().await;
    let (img, _spec) = bundle_on(&a, 4 << 20, 40).await;
    b.images.fetch(img.hash, vec![a.addr()], &noop).await.unwrap();
    // Overwrite the start of one chunk's data file in place (same inode the store reads).
    let data = b.dir.path().join("images/blobs/data");
    let victim = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .filter(|p| std::fs::metadata(p).unwrap().len() < 1 << 20) // a disk chunk, not the kernel
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&victim).unwrap();
        f.write_all(&[0xAA; 64]).unwrap();
    }
    let err = b.images.materialise(img.hash, &noop).await.unwrap_err().to_string();
    assert!(err.contains("does not match its hash"), "{err}");
    a.stop().await;
    b.stop().await;
}

/// Fetchers that start together pass parts on to each other: the publisher sends less than
/// two copies for four fetchers (about one, measured), and every fetcher gets parts from
/// a fellow fetcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchers_starting_together_share_the_work() {
    let a = node().await;
    let (img, spec) = bundle_on(&a, 32 << 20, 60).await;
    let fetchers = vec![node().await, node().await, node().await, node().await];
    let addrs: Vec<_> = fetchers.iter().map(|f| f.addr()).collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in fetchers.iter().enumerate() {
        let mut providers = vec![a.addr()];
        providers.extend(
            addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, x)| x.clone()),
        );
        let images = f.images.clone();
        set.spawn(async move { (i, images.fetch(img.hash, providers, &noop).await.unwrap()) });
    }
    let mut stats = set.join_all().await;
    stats.sort_by_key(|(i, _)| *i);
    let stats: Vec<_> = stats.into_iter().map(|(_, s)| s).collect();
    let image = (32u64 << 20) + (1 << 20) + 300_000;
    let from_publisher: u64 = stats
        .iter()
        .flat_map(|s| s.providers.iter())
        .filter(|p| p.id == a.addr().id)
        .map(|p| p.bytes)
        .sum();
    for (f, s) in fetchers.iter().zip(&stats) {
        let from_peers: u64 = s
            .providers
            .iter()
            .filter(|p| p.id != a.addr().id)
            .map(|p| p.bytes)
            .sum();
        eprintln!(
            "fetcher: {} bytes from peers, {:?}",
            from_peers, s.providers
        );
        assert!(
            from_peers > 0,
            "every fetcher gets parts from a fellow fetcher"
        );
        assert_bundle_files(&f.images.materialise(img.hash, &noop).await.unwrap(), &spec);
    }
    eprintln!("publisher sent {from_publisher} bytes for 4 fetchers of a {image}-byte image");
    // Fetchers tell each other what they hold, so the publisher is asked for about one copy
    // (less what fetchers finishing early take from it at the end).
    assert!(
        from_publisher < image * 3 / 2,
        "publisher sent {from_publisher} bytes, 4 copies would be {}",
        4 * image
    );
    for f in fetchers {
        f.stop().await;
    }
    a.stop().await;
}

/// A disk that fills up during a fetch: the fetch fails with `DiskFull` naming the
/// directory, and the partial image is collected (the space comes back). Needs root for a
/// small tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_fetch_fails_cleanly_and_frees_the_space() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(!require_real(), "cannot mount a tmpfs (needs root)");
        eprintln!("SKIPPED a_full_disk_mid_fetch_fails_cleanly_and_frees_the_space: cannot mount a tmpfs (needs root)");
        return;
    }
    // Unmounted however the test ends.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let used = |p: &std::path::Path| {
        let out = std::process::Command::new("df").args(["--output=used", "-B1"]).arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()).unwrap()
    };
    let a = node().await;
    let (img, _) = bundle_on(&a, 48 << 20, 70).await;
    let dir = tempfile::tempdir_in(mnt.path()).unwrap();
    let b = {
        let ep = endpoint(vec![blixard_images::ALPN.to_vec()]).await;
        let images = blixard_images::ImageStore::open(ep.clone(), blixard_images::ImageStoreOptions::new(dir.path().join("images"))).await.unwrap();
        (ep, images)
    };
    let before = used(mnt.path());
    let err = b.1.fetch(img.hash, vec![a.addr()], &noop).await.unwrap_err();
    eprintln!("disk full: {err}");
    assert!(matches!(err, FetchError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()), "names the directory: {err}");
    assert!(err.to_string().contains("partial image was removed"), "{err}");
    let after = used(mnt.path());
    assert!(after < before + (4 << 20), "partial data collected: {before} bytes used before, {after} after");
    b.1.shutdown().await;
    b.0.close().await;
    a.stop().await;
}

/// The have protocol on the wire: a node holding an image answers `All`, one that neither
/// holds nor fetches it `None`, in Blixard's framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_have_protocol_answers_all_or_none() {
    use blixard_images::have::HaveMsg;
    let a = node().await;
    let (img, _) = bundle_on(&a, 1 << 20, 61).await;
    let client = common::endpoint(vec![]).await;
    let conn = client.connect(a.addr(), blixard_images::HAVE_ALPN).await.unwrap();
    let ask = |hash: blixard_images::Hash| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(hash.as_bytes()).await.unwrap();
            send.finish().unwrap();
            let body = blixard_mesh::rpc::read_frame_body(&mut recv, blixard_images::have::MAX_FRAME).await.unwrap();
            HaveMsg::decode(&body).unwrap()
        }
    };
    assert_eq!(ask(img.hash).await, HaveMsg::All);
    assert_eq!(ask(blixard_images::Hash::new(b"no such image")).await, HaveMsg::None);
    client.close().await;
    a.stop().await;
}
