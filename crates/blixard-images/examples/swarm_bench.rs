//! Benchmark: swarm download. One publisher and N fetchers, each in its own network
//! namespace, each link limited by `tc tbf`; time until every fetcher holds the image,
//! (a) fetching from the publisher and from each other, (b) from the publisher only,
//! against the single-link time (size / link rate). Needs root, `ip` and `tc`.
//!
//! ```text
//! cargo build --release -p blixard-images --example swarm_bench
//! target/release/examples/swarm_bench [--fetchers 8] [--mib 256] [--mbit 100] [--skip-origin]
//! ```
//! `--mbit 0` shapes nothing: the time is then what the machine's CPU allows.
//! `BENCH_LOG=FILTER` (e.g. `iroh_blobs=warn,blixard_images=warn`): the processes log to
//! stderr. `BENCH_MISSING_RETRY_MS`: the fetchers' `missing_retry` (default 100).
//! Namespaces `bxsw-*` and the address range 10.77.0.0/24 are used and removed afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use blixard_images::{BundleSpec, ImageStore, ImageStoreOptions, Progress, ALPN, HAVE_ALPN};
use iroh::endpoint::presets;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey};

const NS: &str = "bxsw";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `BENCH_LOG=warn` (an env filter): the children log to stderr.
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    match args.get(1).map(String::as_str) {
        Some("publish") => return child_publish(&args[2..]),
        Some("fetch") => return child_fetch(&args[2..]),
        _ => {}
    }
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let fetchers = flag("--fetchers", 8) as usize;
    let mib = flag("--mib", 256);
    let mbit = flag("--mbit", 100);
    let skip_origin = args.iter().any(|a| a == "--skip-origin");
    let work = tempfile::Builder::new()
        .prefix("blixard-swarm-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    teardown(fetchers);
    setup(fetchers, mbit);
    // Every fetcher must receive the whole image (disk + 8 MiB kernel + 2 MiB initrd).
    let single = ((mib + 10) << 20) as f64 * 8.0 / (mbit.max(1) as f64 * 1e6);
    println!("{fetchers} fetchers + 1 publisher, each in its own netns; every link {mbit} Mbit/s (tc tbf, both directions)");
    println!("image: {mib} MiB random disk + 10 MiB kernel/initrd; single-link time {single:.1} s");

    let mut publisher = Proc::spawn(
        0,
        &[
            "publish",
            &work.path().join("pub").to_string_lossy(),
            &ip(0),
            &mib.to_string(),
        ],
    );
    let ready = publisher.line();
    let mut it = ready.split_whitespace().skip(1);
    let pub_peer = it.next().unwrap().to_string();
    let hash = it.next().unwrap().to_string();
    println!("published {hash}");

    let swarm = round(&work.path().join("swarm"), fetchers, &hash, &pub_peer, true);
    report("swarm (publisher + each other)", &swarm, single);
    if !skip_origin {
        let origin = round(
            &work.path().join("origin"),
            fetchers,
            &hash,
            &pub_peer,
            false,
        );
        report("one origin (publisher only)", &origin, single);
        let s = max(&swarm);
        let o = max(&origin);
        println!(
            "swarm / single link = {:.2} (goal <= 1.3); origin / swarm = {:.1}x (goal >= 4)",
            s / single,
            o / s
        );
    }
    drop(publisher);
    teardown(fetchers);
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn report(what: &str, times: &[f64], single: f64) {
    let mut t = times.to_vec();
    t.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{what}: all {} done after {:.1} s ({:.2}x single link); first {:.1} s, median {:.1} s",
        t.len(),
        max(&t),
        max(&t) / single,
        t[0],
        t[t.len() / 2]
    );
}

/// Starts `n` fresh fetchers, tells them all to go at once, returns each one's time.
fn round(dir: &Path, n: usize, hash: &str, pub_peer: &str, swarm: bool) -> Vec<f64> {
    let mut procs: Vec<Proc> = (1..=n)
        .map(|i| {
            Proc::spawn(
                i,
                &[
                    "fetch",
                    &dir.join(format!("f{i}")).to_string_lossy(),
                    &ip(i),
                ],
            )
        })
        .collect();
    let peers: Vec<String> = procs
        .iter_mut()
        .map(|p| p.line().split_whitespace().nth(1).unwrap().to_string())
        .collect();
    for (i, p) in procs.iter_mut().enumerate() {
        let mut providers = vec![pub_peer.to_string()];
        if swarm {
            providers.extend(
                peers
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, s)| s.clone()),
            );
        }
        writeln!(p.stdin, "go {hash} {}", providers.join(",")).unwrap();
        p.stdin.flush().unwrap();
    }
    let mut times = Vec::new();
    for (i, p) in procs.iter_mut().enumerate() {
        let done = p.line();
        // "done SECS BYTES from=..."
        let secs: f64 = done.split_whitespace().nth(1).unwrap().parse().unwrap();
        println!("  fetcher {}: {done}", i + 1);
        times.push(secs);
    }
    times
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(i: usize, args: &[&str]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns(i)])
            .arg(std::env::current_exe().unwrap())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Proc {
            child,
            stdin,
            stdout,
        }
    }
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        assert!(!s.is_empty(), "child exited early");
        s.trim().to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Closing stdin ends a child's serving; then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ns(i: usize) -> String {
    format!("{NS}-{i}")
}
fn ip(i: usize) -> String {
    format!("10.77.0.{}", i + 1)
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

/// A bridge namespace with one veth pair per node; tbf on both ends of every pair, so each
/// node's uplink and downlink are limited.
fn setup(fetchers: usize, mbit: u64) {
    let br = format!("{NS}-br");
    sh(&["ip", "netns", "add", &br]);
    sh(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &br, "link", "set", "br0", "up"]);
    let rate = format!("{mbit}mbit");
    let burst = std::env::var("BENCH_TBF_BURST").unwrap_or_else(|_| "512kb".into());
    let latency = std::env::var("BENCH_TBF_LATENCY").unwrap_or_else(|_| "300ms".into());
    for i in 0..=fetchers {
        let n = ns(i);
        sh(&["ip", "netns", "add", &n]);
        let (a, b) = (format!("bxa{i}"), format!("bxb{i}"));
        sh(&[
            "ip", "link", "add", &a, "netns", &n, "type", "veth", "peer", "name", &b, "netns", &br,
        ]);
        sh(&[
            "ip",
            "-n",
            &n,
            "addr",
            "add",
            &format!("{}/24", ip(i)),
            "dev",
            &a,
        ]);
        sh(&["ip", "-n", &n, "link", "set", &a, "up"]);
        sh(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &br, "link", "set", &b, "master", "br0"]);
        sh(&["ip", "-n", &br, "link", "set", &b, "up"]);
        for (space, dev) in [(&n, &a), (&br, &b)] {
            if mbit == 0 {
                continue;
            }
            sh(&[
                "tc", "-n", space, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate,
                "burst", &burst, "latency", &latency,
            ]);
        }
    }
}

fn teardown(fetchers: usize) {
    for i in 0..=fetchers {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns(i)])
            .stderr(Stdio::null())
            .status();
    }
    let _ = Command::new("ip")
        .args(["netns", "del", &format!("{NS}-br")])
        .stderr(Stdio::null())
        .status();
}

async fn endpoint(ip: &str) -> Endpoint {
    Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::generate())
        .relay_mode(RelayMode::Disabled)
        .alpns(vec![ALPN.to_vec(), HAVE_ALPN.to_vec()])
        .clear_ip_transports()
        .bind_addr(format!("{ip}:0").parse::<SocketAddr>().unwrap())
        .unwrap()
        .bind()
        .await
        .unwrap()
}

/// `ID@ADDR` of an endpoint.
fn peer(ep: &Endpoint) -> String {
    format!("{}@{}", ep.id(), ep.bound_sockets()[0])
}

fn parse_peer(s: &str) -> EndpointAddr {
    let (id, addr) = s.split_once('@').unwrap();
    let id: EndpointId = id.parse().unwrap();
    EndpointAddr::new(id).with_ip_addr(addr.parse().unwrap())
}

fn wait_for_eof() {
    let mut s = String::new();
    while std::io::stdin()
        .read_line(&mut s)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
}

/// The image store of a publisher or fetcher in `dir`, served on an endpoint bound to `ip`.
async fn serve(dir: &Path, ip: &str) -> (Endpoint, ImageStore, Router) {
    let ep = endpoint(ip).await;
    let mut opts = ImageStoreOptions::new(dir.join("store"));
    if let Some(ms) = std::env::var("BENCH_MISSING_RETRY_MS").ok().and_then(|v| v.parse().ok()) {
        opts.fetch.missing_retry = std::time::Duration::from_millis(ms);
    }
    let store = ImageStore::open(ep.clone(), opts).await.unwrap();
    let router = Router::builder(ep.clone())
        .accept(ALPN, store.protocol_handler())
        .accept(HAVE_ALPN, store.have_handler())
        .spawn();
    (ep, store, router)
}

fn child_publish(args: &[String]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = PathBuf::from(&args[0]);
        std::fs::create_dir_all(&dir).unwrap();
        let mib: u64 = args[2].parse().unwrap();
        common::random_file(&dir.join("disk.img"), mib << 20, 0x9E37_79B9_7F4A_7C15).unwrap();
        let kib: u64 = std::env::var("BENCH_KERNEL_KIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192);
        common::random_file(&dir.join("kernel"), kib << 10, 3).unwrap();
        common::random_file(&dir.join("initrd"), (kib / 4) << 10, 5).unwrap();
        let (ep, store, router) = serve(&dir, &args[1]).await;
        let spec = BundleSpec {
            kernel: dir.join("kernel"),
            initrd: dir.join("initrd"),
            disk: Some(dir.join("disk.img")),
            cmdline: String::new(),
        };
        let img = store.add_bundle(&spec, &|_p: Progress| {}).await.unwrap();
        println!("ready {} {}", peer(&ep), img.hash);
        tokio::task::spawn_blocking(wait_for_eof).await.unwrap();
        let _ = router.shutdown().await;
        store.shutdown().await;
    });
}

fn child_fetch(args: &[String]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = PathBuf::from(&args[0]);
        let (ep, store, router) = serve(&dir, &args[1]).await;
        println!("ready {}", peer(&ep));
        let go = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            std::io::stdin().read_line(&mut s).unwrap();
            s
        })
        .await
        .unwrap();
        let mut it = go.split_whitespace().skip(1);
        let hash: blixard_images::Hash = it.next().unwrap().parse().unwrap();
        let providers: Vec<EndpointAddr> = it.next().unwrap().split(',').map(parse_peer).collect();
        let t = Instant::now();
        // MiB held at the end of each second (`tl=`), to see where a run loses time.
        let timeline = std::sync::Mutex::new(Vec::<u64>::new());
        let stats = store
            .fetch(hash, providers, &|p: Progress| {
                let sec = t.elapsed().as_secs() as usize;
                let mut tl = timeline.lock().unwrap();
                let last = tl.last().copied().unwrap_or(0);
                while tl.len() <= sec {
                    tl.push(last);
                }
                tl[sec] = p.done >> 20;
            })
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let tl: Vec<String> = timeline.into_inner().unwrap().iter().map(u64::to_string).collect();
        let from: Vec<String> = stats
            .providers
            .iter()
            .map(|p| {
                format!(
                    "{}:{}MiB{}",
                    p.id.fmt_short(),
                    p.bytes >> 20,
                    p.dropped
                        .as_ref()
                        .map(|d| format!("(dropped: {d})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        println!(
            "done {secs:.2} {} from={} tl={}",
            stats.bytes_transferred,
            from.join(","),
            tl.join(",")
        );
        // Keep serving the others until the parent is done.
        tokio::task::spawn_blocking(wait_for_eof).await.unwrap();
        let _ = router.shutdown().await;
        store.shutdown().await;
    });
}
