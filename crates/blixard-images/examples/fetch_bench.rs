//! Benchmark: fetch of a large bundle image A→B on loopback vs `cp` of the same disk file,
//! plus the peak RSS of the fetching process (a separate process).
//!
//! ```text
//! cargo run --release -p blixard-images --example fetch_bench -- [SIZE_MIB] [WORK_DIR]
//! ```
//! Defaults: 1024 MiB in a temp dir under /var/tmp. Prints one line per measurement.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blixard_images::{BundleSpec, ImageStore, ImageStoreOptions, Materialised, Progress, ALPN};
use iroh::endpoint::presets;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey};

/// The transport's ceiling: one QUIC stream A→B over the same endpoints, no store.
const STREAM_ALPN: &[u8] = b"blixard/bench-stream/0";

async fn endpoint() -> Endpoint {
    Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::generate())
        .relay_mode(RelayMode::Disabled)
        .alpns(vec![ALPN.to_vec(), STREAM_ALPN.to_vec()])
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0".parse::<SocketAddr>().unwrap())
        .unwrap()
        .bind()
        .await
        .unwrap()
}

/// Sends the number of bytes the client asks for (8 bytes, little endian) on one stream.
#[derive(Debug, Clone)]
struct Source;

impl iroh::protocol::ProtocolHandler for Source {
    async fn accept(&self, conn: iroh::endpoint::Connection) -> Result<(), iroh::protocol::AcceptError> {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut want = [0u8; 8];
        recv.read_exact(&mut want).await.map_err(iroh::protocol::AcceptError::from_err)?;
        let mut left = u64::from_le_bytes(want);
        let buf = vec![0xA5u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            send.write_all(&buf[..n]).await.map_err(iroh::protocol::AcceptError::from_err)?;
            left -= n as u64;
        }
        send.finish()?;
        conn.closed().await;
        Ok(())
    }
}

/// `BENCH_INLINE_KIB`: blobs up to this size live in the store's database.
fn inline(o: &mut ImageStoreOptions) {
    if let Some(k) = std::env::var("BENCH_INLINE_KIB").ok().and_then(|v| v.parse::<u64>().ok()) {
        o.inline_max = k * 1024;
    }
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`
/// (fields 14 and 15, in clock ticks of 1/100 s on Linux).
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("fetch") {
        return fetch_child(&args[2..]).await;
    }
    if args.get(1).map(String::as_str) == Some("stream") {
        return stream_child(&args[2..]).await;
    }
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let base = args.get(2).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let work = tempfile::Builder::new().prefix("blixard-fetch-bench").tempdir_in(&base).unwrap();
    let w = work.path();
    let size = mib << 20;
    let disk = w.join("disk.img");
    common::random_file(&disk, size, 0x9E37_79B9_7F4A_7C15).unwrap();
    std::fs::write(w.join("kernel"), vec![1u8; 8 << 20]).unwrap();
    std::fs::write(w.join("initrd"), vec![2u8; 2 << 20]).unwrap();

    // Warm-up of fresh memory (see notes): a cp whose result is discarded.
    let cp = |dst: &Path| {
        let t = Instant::now();
        let st = std::process::Command::new("cp").arg(&disk).arg(dst).status().unwrap();
        assert!(st.success());
        let st = std::process::Command::new("sync").arg(dst).status().unwrap();
        assert!(st.success());
        t.elapsed().as_secs_f64()
    };
    cp(&w.join("warmup.img"));
    std::fs::remove_file(w.join("warmup.img")).unwrap();
    let cp_s = cp(&w.join("copy.img"));
    std::fs::remove_file(w.join("copy.img")).unwrap();

    let ep = endpoint().await;
    let mut aopts = ImageStoreOptions::new(w.join("a"));
    if let Some(avg) = std::env::var("BENCH_CHUNK_AVG_KIB").ok().and_then(|v| v.parse::<u32>().ok()) {
        aopts.chunking = blixard_images::ChunkParams { min: avg * 1024 / 4, avg: avg * 1024, max: avg * 1024 * 4 };
    }
    inline(&mut aopts);
    let chunking = aopts.chunking;
    let a = ImageStore::open(ep.clone(), aopts).await.unwrap();
    let router = Router::builder(ep.clone()).accept(ALPN, a.protocol_handler()).accept(STREAM_ALPN, Source).spawn();
    let t = Instant::now();
    let spec = BundleSpec { kernel: w.join("kernel"), initrd: w.join("initrd"), disk: Some(disk.clone()), cmdline: "console=ttyS0".into() };
    let img = a.add_bundle(&spec, &|_p: Progress| {}).await.unwrap();
    let add_s = t.elapsed().as_secs_f64();
    let chunks = match a.manifest(img.hash).await.unwrap().image() {
        blixard_images::manifest::Image::Bundle(b) => b.disk.as_ref().map_or(0, |d| d.chunk_count),
        _ => 0,
    };
    let addrs: Vec<String> = ep.bound_sockets().iter().map(|s| s.to_string()).collect();

    let cpu0 = cpu_s();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["stream", &ep.id().to_string(), &addrs.join(","), &size.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "stream child failed: {}", String::from_utf8_lossy(&out.stderr));
    let stream_send_cpu = cpu_s() - cpu0;
    let mut it = String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse::<f64>().unwrap()).collect::<Vec<_>>().into_iter();
    let (stream_s, stream_recv_cpu) = (it.next().unwrap(), it.next().unwrap());

    let cpu0 = cpu_s();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["fetch", &ep.id().to_string(), &addrs.join(","), &img.hash.to_string(), &w.join("b").to_string_lossy()])
        .output()
        .unwrap();
    let child = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "fetch child failed: {child} {}", String::from_utf8_lossy(&out.stderr));
    let field = |k: &str| -> f64 {
        child.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{k}="))).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    // The provider's CPU over the child's whole life (it serves nothing after the fetch).
    let fetch_send_cpu = cpu_s() - cpu0;
    let fetch_s = field("fetch_s");
    let fetch_recv_cpu = field("fetch_cpu_s");
    let mat_s = field("materialise_s");
    let rss_fetch = field("rss_after_fetch_mib");
    let rss_all = field("rss_peak_mib");
    let mb = size as f64 / 1e6;
    println!(
        "image: {mib} MiB random disk + 10 MiB kernel/initrd, {chunks} chunks (FastCDC {}/{}/{} KiB)",
        chunking.min / 1024,
        chunking.avg / 1024,
        chunking.max / 1024
    );
    println!("add (chunk + store) on A: {add_s:.2} s ({:.0} MB/s)", mb / add_s);
    println!("cp of the disk file:      {cp_s:.2} s ({:.0} MB/s)", mb / cp_s);
    println!("QUIC stream A->B, no store (the transport's ceiling): {stream_s:.2} s ({:.0} MB/s), ratio to cp = {:.2}", mb / stream_s, cp_s / stream_s);
    println!("fetch A->B (loopback):    {fetch_s:.2} s ({:.0} MB/s), ratio fetch/cp throughput = {:.2}", mb / fetch_s, cp_s / fetch_s);
    println!(
        "CPU seconds, sender + receiver: QUIC stream {stream_send_cpu:.2} + {stream_recv_cpu:.2}, fetch {fetch_send_cpu:.2} + {fetch_recv_cpu:.2} (2 cores here)"
    );
    println!("materialise on B (reassemble disk + fsync): {mat_s:.2} s ({:.0} MB/s)", mb / mat_s);
    println!("peak RSS of the fetching process: {rss_fetch:.0} MiB after fetch, {rss_all:.0} MiB after materialise (budget 128 MiB)");
    let _ = router.shutdown().await;
    a.shutdown().await;
}

fn provider_addr(args: &[String]) -> EndpointAddr {
    let id: EndpointId = args[0].parse().unwrap();
    let mut addr = EndpointAddr::new(id);
    for s in args[1].split(',') {
        addr = addr.with_ip_addr(s.parse().unwrap());
    }
    addr
}

/// Reads SIZE bytes from A on one stream; prints the seconds it took.
async fn stream_child(args: &[String]) {
    let addr = provider_addr(args);
    let size: u64 = args[2].parse().unwrap();
    let ep = endpoint().await;
    let conn = ep.connect(addr, STREAM_ALPN).await.unwrap();
    let t = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&size.to_le_bytes()).await.unwrap();
    send.finish().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while let Some(n) = recv.read(&mut buf).await.unwrap() {
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, size);
    conn.close(0u32.into(), b"done");
    println!("{secs:.3} {:.3}", cpu_s());
    ep.close().await;
}

async fn fetch_child(args: &[String]) {
    let addr = provider_addr(args);
    let hash: blixard_images::Hash = args[2].parse().unwrap();
    let ep = endpoint().await;
    let mut opts = ImageStoreOptions::new(&args[3]);
    if let Some(n) = std::env::var("BENCH_PER_PROVIDER").ok().and_then(|v| v.parse().ok()) {
        opts.fetch.per_provider = n;
    }
    if let Some(n) = std::env::var("BENCH_BATCH").ok().and_then(|v| v.parse().ok()) {
        opts.fetch.batch = n;
    }
    if let Some(n) = std::env::var("BENCH_PART_MAX").ok().and_then(|v| v.parse().ok()) {
        opts.fetch.batch_part_max = n;
    }
    inline(&mut opts);
    let b = ImageStore::open(ep.clone(), opts).await.unwrap();
    let t = Instant::now();
    let cpu0 = cpu_s();
    let stats = b.fetch(hash, vec![addr], &|_p: Progress| {}).await.unwrap();
    let fetch_s = t.elapsed().as_secs_f64();
    let fetch_cpu = cpu_s() - cpu0;
    let rss_fetch = vm_hwm_kib() as f64 / 1024.0;
    let t = Instant::now();
    let m = b.materialise(hash, &|_p: Progress| {}).await.unwrap();
    let mat_s = t.elapsed().as_secs_f64();
    let Materialised::Bundle { disk, .. } = m else { panic!() };
    assert!(disk.is_some());
    println!(
        "fetch_s={fetch_s:.3} fetch_cpu_s={fetch_cpu:.3} materialise_s={mat_s:.3} bytes={} rss_after_fetch_mib={rss_fetch:.1} rss_peak_mib={:.1}",
        stats.bytes_transferred,
        vm_hwm_kib() as f64 / 1024.0
    );
    b.shutdown().await;
    ep.close().await;
}
