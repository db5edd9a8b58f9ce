//! `blixard-bench`: committed writes/s and latency of a 3-node Blixard cluster next to a
//! 3-member etcd cluster, both on loopback with durable storage, in one run; plus the
//! node budgets (idle RSS, CLI latency, idle CPU).
//!
//! Both systems run as real processes in a temp dir, one after the other (never both at
//! once, so they do not compete for the cores). Every process is killed when the run
//! ends, fails, panics or is interrupted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use blixard_node::client::Client;
use blixard_types::Ticket;
use clap::Parser;
use serde::Serialize;

mod blixard;
mod etcd;
mod procs;
mod sched;
mod vm;
mod workload;

use workload::Stats;

const RSS_BUDGET_MIB: f64 = 64.0;
const CLI_BUDGET_MS: f64 = 50.0;
/// "Near 0%": below 1% of one core.
const IDLE_CPU_BUDGET_PCT: f64 = 1.0;

#[derive(Parser, Debug)]
#[command(name = "blixard-bench", about = "Committed writes: 3-node Blixard vs 3-member etcd on loopback, plus node budgets")]
struct Args {
    /// The blixard binary (default: `blixard` next to this executable).
    #[arg(long)]
    blixard: Option<PathBuf>,
    /// The etcd binary (3.4; Debian package etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Concurrent clients (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// How many Blixard client endpoints the workers share (1: all workers multiplex one
    /// QUIC connection, as one process using the client library would).
    #[arg(long, default_value_t = 1)]
    blixard_clients: usize,
    /// Runs of `blixard cluster status` for the CLI latency budget.
    #[arg(long, default_value_t = 20)]
    cli_runs: usize,
    /// Seconds over which idle CPU is measured.
    #[arg(long, default_value_t = 5.0)]
    idle_secs: f64,
    /// Skip etcd (Blixard figures and budgets only).
    #[arg(long)]
    skip_etcd: bool,
    /// VM boots per VM benchmark (warm and cold, each against bare qemu); 0 skips them.
    #[arg(long, default_value_t = 5)]
    vm_boots: usize,
    /// Skip the write benchmark (and etcd): budgets, VMs and the scheduler only.
    #[arg(long)]
    skip_writes: bool,
    /// Scheduler benchmark: nodes, VMs, and how many feasible nodes each placement scores.
    #[arg(long, default_value_t = 10_000)]
    sched_nodes: usize,
    #[arg(long, default_value_t = 100_000)]
    sched_vms: usize,
    #[arg(long, default_value_t = 64)]
    sched_sample: usize,
    /// One JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Budgets {
    idle_rss_mib: Vec<f64>,
    idle_rss_pass: bool,
    rss_after_load_mib: Vec<f64>,
    cli_status_median_ms: f64,
    cli_status_p90_ms: f64,
    cli_runs: usize,
    cli_pass: bool,
    idle_cpu_pct: Vec<f64>,
    idle_cpu_secs: f64,
    idle_cpu_pass: bool,
}

#[derive(Debug, Serialize)]
struct Ratio {
    concurrency: usize,
    throughput_blixard_over_etcd: f64,
    p50_blixard_over_etcd: f64,
    p99_blixard_over_etcd: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    blixard: String,
    etcd: Option<String>,
    blixard_entry: Vec<String>,
    etcd_entry: Option<String>,
    results: Vec<Stats>,
    ratios: Vec<Ratio>,
    budgets: Budgets,
    vms: Option<vm::VmStats>,
    scheduler: sched::SchedStats,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let r = procs::install_signal_handler(&rt).and_then(|()| run(&rt, &args));
    match r {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(rt: &tokio::runtime::Runtime, args: &Args) -> anyhow::Result<Report> {
    ensure!(args.duration > 0.0 && args.warmup >= 0.0, "--duration must be > 0 and --warmup >= 0");
    ensure!(!args.concurrency.is_empty() && args.concurrency.iter().all(|&c| (1..=4096).contains(&c)), "--concurrency must be 1..=4096");
    ensure!(args.blixard_clients >= 1, "--blixard-clients must be >= 1");
    let bin = match &args.blixard {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this executable")?.with_file_name("blixard"),
    };
    ensure!(
        bin.exists(),
        "blixard not found at {}: build it (cargo build --release -p blixard) or pass --blixard PATH",
        bin.display()
    );
    if !args.skip_etcd && !args.skip_writes {
        ensure!(args.etcd.exists(), "etcd not found at {}: apt-get install etcd-server (or pass --etcd PATH)", args.etcd.display());
    }
    // Dropped last (declared first): every process below is stopped before it goes.
    let root = tempfile::Builder::new().prefix("blixard-bench-").tempdir().context("cannot create a temp dir")?;
    procs::register_root(root.path());
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let mut results = Vec::new();

    // ---- Blixard ----
    eprintln!("starting a 3-node blixard cluster in {}", root.path().display());
    let mut cluster = blixard::start(&bin, root.path())?;
    let blixard_version = cluster.cli_stdout(&["--version"]).unwrap_or_default();
    eprintln!("  3 healthy voters: {}", cluster.ids.iter().map(|i| &i[..10]).collect::<Vec<_>>().join(", "));

    // Budgets first, while the nodes are idle.
    std::thread::sleep(Duration::from_secs(1));
    let pids = cluster.pids();
    let tck = procs::clk_tck() as f64;
    let before: Vec<u64> = pids.iter().map(|&p| procs::cpu_ticks(p)).collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.idle_secs));
    let after: Vec<u64> = pids.iter().map(|&p| procs::cpu_ticks(p)).collect::<anyhow::Result<_>>()?;
    let wall = t0.elapsed().as_secs_f64();
    let idle_cpu_pct: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a - b) as f64 / tck / wall * 100.0).collect();
    let idle_rss_mib: Vec<f64> = pids.iter().map(|&p| procs::rss_kib(p).map(|k| k as f64 / 1024.0)).collect::<anyhow::Result<_>>()?;
    eprintln!("  idle CPU {idle_cpu_pct:.2?} %, idle RSS {idle_rss_mib:.1?} MiB");

    cluster.cli_stdout(&["cluster", "status"])?; // authorises the CLI key; not timed
    let mut cli_ms = Vec::new();
    for _ in 0..args.cli_runs {
        let t = Instant::now();
        let out = cluster.cli(&["cluster", "status"])?;
        cli_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        ensure!(out.status.success(), "blixard cluster status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (cli_median, cli_p90) = workload::median_p90(cli_ms);
    eprintln!("  CLI cluster status: median {cli_median:.1} ms, p90 {cli_p90:.1} ms");

    let vms = if args.vm_boots > 0 {
        eprintln!("VMs: {} boots each, warm and cold, against bare qemu", args.vm_boots);
        let v = vm::run(rt, &cluster, root.path(), args.vm_boots)?;
        eprintln!("  warm {:.3}x, cold {:.3}x ({})", v.warm_ratio, v.cold_ratio, v.accelerator);
        Some(v)
    } else {
        None
    };

    let ticket_text = cluster.cli_stdout(&["cluster", "ticket", "--role", "client"])?;
    let ticket = Ticket::decode(&ticket_text).context("the client ticket does not decode")?;
    let status = cluster.status()?;
    let leader = status["leader"].as_str().unwrap_or_default().to_string();
    let entry = ticket.peers.first().map(|p| p.id.to_string()).unwrap_or_default();
    let entry_desc = format!(
        "client library, {} endpoint(s); requests enter at the ticket's first member {} ({})",
        args.blixard_clients,
        &entry[..entry.len().min(10)],
        if entry == leader { "the leader" } else { "a follower: forwarded to the leader" }
    );
    eprintln!("  {entry_desc}");
    let target = cluster.ids[0].clone();
    let key_dir = root.path().join("bench-client");
    let mut clients = Vec::new();
    for i in 0..args.blixard_clients {
        let key = blixard_mesh::identity::load_or_create(&key_dir.join(format!("client{i}.key")))?;
        clients.push(Arc::new(rt.block_on(Client::new(key, ticket.clone())).context("cannot start the blixard client")?));
    }
    for &c in args.concurrency.iter().filter(|_| !args.skip_writes) {
        cluster.procs.check_alive()?;
        eprintln!("blixard: {c} client(s), {:.0} s (+{:.1} s warm-up)", args.duration, args.warmup);
        let workers = (0..c)
            .map(|w| blixard::BlixardWorker { client: clients[w % clients.len()].clone(), node: target.clone(), key: format!("k{w}") })
            .collect();
        let s = rt.block_on(workload::run("blixard", workers, warmup, duration))?;
        eprintln!("  {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors", s.writes_per_s, s.p50_ms, s.p99_ms, s.errors);
        results.push(s);
    }
    let rss_after_load_mib: Vec<f64> =
        pids.iter().map(|&p| procs::rss_kib(p).map(|k| k as f64 / 1024.0)).collect::<anyhow::Result<_>>()?;
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            rt.block_on(c.close());
        }
    }
    cluster.procs.stop_all();
    drop(cluster);

    // ---- etcd ----
    let mut etcd_version = None;
    let mut etcd_entry = None;
    if !args.skip_etcd && !args.skip_writes {
        eprintln!("starting a 3-member etcd cluster");
        let mut ec = rt.block_on(etcd::start(&args.etcd, root.path()))?;
        let leader = rt.block_on(ec.leader_index()).ok().flatten();
        let desc = format!(
            "JSON gateway (POST /v3/kv/put), one keep-alive HTTP/1.1 connection per worker, worker w -> member w mod 3 (leader: member {})",
            leader.map(|l| l.to_string()).unwrap_or_else(|| "?".into())
        );
        eprintln!("  {} healthy; {desc}", ec.version);
        etcd_version = Some(ec.version.clone());
        etcd_entry = Some(desc);
        for &c in &args.concurrency {
            ec.procs.check_alive()?;
            eprintln!("etcd: {c} client(s), {:.0} s (+{:.1} s warm-up)", args.duration, args.warmup);
            let workers = (0..c)
                .map(|w| etcd::EtcdWorker { addr: ec.clients[w % ec.clients.len()], key: format!("k{w}"), conn: None })
                .collect();
            let s = rt.block_on(workload::run("etcd", workers, warmup, duration))?;
            eprintln!("  {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors", s.writes_per_s, s.p50_ms, s.p99_ms, s.errors);
            results.push(s);
        }
        ec.procs.stop_all();
    }

    let mut ratios = Vec::new();
    for &c in &args.concurrency {
        let b = results.iter().find(|s| s.system == "blixard" && s.concurrency == c);
        let e = results.iter().find(|s| s.system == "etcd" && s.concurrency == c);
        if let (Some(b), Some(e)) = (b, e) {
            ratios.push(Ratio {
                concurrency: c,
                throughput_blixard_over_etcd: b.writes_per_s / e.writes_per_s,
                p50_blixard_over_etcd: b.p50_ms / e.p50_ms,
                p99_blixard_over_etcd: b.p99_ms / e.p99_ms,
            });
        }
    }
    let budgets = Budgets {
        idle_rss_pass: idle_rss_mib.iter().all(|&m| m < RSS_BUDGET_MIB),
        idle_rss_mib,
        rss_after_load_mib,
        cli_pass: cli_median < CLI_BUDGET_MS,
        cli_status_median_ms: cli_median,
        cli_status_p90_ms: cli_p90,
        cli_runs: args.cli_runs,
        idle_cpu_pass: idle_cpu_pct.iter().all(|&p| p < IDLE_CPU_BUDGET_PCT),
        idle_cpu_pct,
        idle_cpu_secs: args.idle_secs,
    };
    eprintln!("scheduler: {} nodes, {} VMs", args.sched_nodes, args.sched_vms);
    let scheduler = sched::run(args.sched_nodes, args.sched_vms, args.sched_sample);
    Ok(Report {
        vms,
        scheduler,
        machine: machine(),
        blixard: blixard_version,
        etcd: etcd_version,
        blixard_entry: vec![entry_desc],
        etcd_entry,
        results,
        ratios,
        budgets,
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string())))
        .unwrap_or_else(|| "unknown OS".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} cores, {os}, Linux {}", kernel.trim())
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn list(v: &[f64], prec: usize) -> String {
    v.iter().map(|x| format!("{x:.prec$}")).collect::<Vec<_>>().join(" / ")
}

fn print_report(r: &Report) {
    println!("machine: {}", r.machine);
    println!("{}; {}", r.blixard, r.etcd.as_deref().unwrap_or("etcd skipped"));
    println!("durability: Blixard fsyncs its redb Raft log before acknowledging; etcd runs with defaults (WAL fsync'd before acknowledging)");
    println!("blixard client: {}", r.blixard_entry.join("; "));
    if let Some(e) = &r.etcd_entry {
        println!("etcd client: {e}");
    }
    println!();
    println!("{:<8} {:>7} {:>10} {:>9} {:>9} {:>7}", "system", "clients", "writes/s", "p50 ms", "p99 ms", "errors");
    for s in &r.results {
        println!(
            "{:<8} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>7}",
            s.system, s.concurrency, s.writes_per_s, s.p50_ms, s.p99_ms, s.errors
        );
        if let Some(e) = &s.first_error {
            println!("         first error: {e}");
        }
    }
    if !r.ratios.is_empty() {
        println!();
        for q in &r.ratios {
            println!(
                "ratio Blixard/etcd, {} client(s): throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
                q.concurrency, q.throughput_blixard_over_etcd, q.p50_blixard_over_etcd, q.p99_blixard_over_etcd
            );
        }
    }
    let b = &r.budgets;
    println!();
    println!(
        "budget idle RSS per node < {RSS_BUDGET_MIB} MiB: {} MiB  {}  (after the write runs: {} MiB)",
        list(&b.idle_rss_mib, 1),
        pass(b.idle_rss_pass),
        list(&b.rss_after_load_mib, 1)
    );
    println!(
        "budget `blixard cluster status` < {CLI_BUDGET_MS} ms (median of {}): median {:.1} ms, p90 {:.1} ms  {}",
        b.cli_runs,
        b.cli_status_median_ms,
        b.cli_status_p90_ms,
        pass(b.cli_pass)
    );
    println!(
        "budget idle CPU per node < {IDLE_CPU_BUDGET_PCT}% of a core (over {:.0} s): {} %  {}",
        b.idle_cpu_secs,
        list(&b.idle_cpu_pct, 2),
        pass(b.idle_cpu_pass)
    );
    if let Some(v) = &r.vms {
        println!();
        println!("VM boot to the console marker, {} boots each, accelerator {}, image {} bytes:", v.boots, v.accelerator, v.image_bytes);
        println!(
            "  warm: vm create --wait {:.3} s vs bare qemu {:.3} s (medians): {:.3}x  (goal <= 1.15x: {})",
            v.warm_median_s,
            v.bare_median_s,
            v.warm_ratio,
            pass(v.warm_ratio <= 1.15)
        );
        println!(
            "  cold: vm create --wait {:.3} s vs image pull {:.3} s + bare qemu (median {:.3} s): {:.3}x  (goal <= 1.2x: {})",
            v.cold_median_s,
            v.fetch_median_s,
            v.cold_baseline_median_s,
            v.cold_ratio,
            pass(v.cold_ratio <= 1.2)
        );
    }
    let s = &r.scheduler;
    println!();
    println!(
        "scheduler, {} nodes, {} VMs: {:.0} placements/s scoring <= {} feasible nodes ({} unplaced; goal >= 50000/s: {}); {:.0}/s scoring every node ({} VMs)",
        s.nodes,
        s.vms,
        s.sampled_per_s,
        s.sample,
        s.sampled_unplaced,
        pass(s.sampled_per_s >= 50_000.0),
        s.full_per_s,
        s.full_vms
    );
}
