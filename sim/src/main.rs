//! `blixard-sim`: runs many seeds of the deterministic cluster simulation in parallel and
//! prints a summary, or replays one seed with its full trace.
//!
//! ## Usage
//! `cargo run --release -p blixard-sim -- --seeds 1000 --jobs 2`
//! `cargo run --release -p blixard-sim -- --seed 42`
//! `cargo run --release -p blixard-sim -- --c1m` (10,000 nodes, 1,000,000 VMs)

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blixard_sim::world::Counters;
use blixard_sim::{run_seed, Bug, Profile, Report, SimOptions};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a Blixard cluster with fault injection")]
struct Opt {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of the range.
    #[arg(long, default_value_t = 0)]
    start_seed: u64,
    /// Replay one seed, printing its whole event trace.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 5)]
    nodes: u64,
    /// Parallel runs (threads, each with its own single-threaded runtime).
    #[arg(long, default_value_t = 2)]
    jobs: u64,
    /// Simulated length of the safety phase (faults on), ms.
    #[arg(long, default_value_t = 20_000)]
    safety_ms: u64,
    /// Simulated time within which the healed cluster must converge, ms.
    #[arg(long, default_value_t = 30_000)]
    liveness_ms: u64,
    /// Fault profile of the safety phase.
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    faults: Profile,
    /// Build a snapshot every this many entries.
    #[arg(long, default_value_t = 100)]
    snapshot_every: u64,
    /// VMs created at the start (0: Raft only, without placer, executor and gossip).
    #[arg(long, default_value_t = 6)]
    vms: u64,
    /// The nodes' placement grace, ms (production default: 10 000).
    #[arg(long, default_value_t = 2_000)]
    grace_ms: u64,
    /// Plant a bug (to see the checkers fail).
    #[arg(long, value_enum)]
    bug: Option<Bug>,
    /// Run the C1M scale run instead of seeds: `--c1m-nodes` nodes, `--c1m-vms` VMs.
    #[arg(long)]
    c1m: bool,
    #[arg(long, default_value_t = 10_000)]
    c1m_nodes: usize,
    #[arg(long, default_value_t = 1_000_000)]
    c1m_vms: usize,
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

fn c1m(opt: &Opt) -> ExitCode {
    let o = blixard_sim::c1m::C1mOptions {
        nodes: opt.c1m_nodes,
        vms: opt.c1m_vms,
        ..Default::default()
    };
    let t = Instant::now();
    match blixard_sim::c1m::run_c1m(&o) {
        Ok(r) => {
            println!(
                "C1M: {} nodes, {} VMs through {} Raft servers (openraft, redb log, state machine), placed by plan_placements (scheduler sampling 64)",
                r.nodes, r.vms, r.servers
            );
            let phase = |p: &blixard_sim::c1m::Phase| {
                format!("{:.1} s wall, {:.1} s simulated", p.wall.as_secs_f64(), p.sim.as_secs_f64())
            };
            println!("  join {} nodes: {}", r.nodes, phase(&r.join));
            println!("  create {} VMs: {}", r.vms, phase(&r.create));
            println!(
                "  place: {} placed in {} rounds, {}, {:.0} placements/s; {} unplaceable",
                r.placed,
                r.rounds,
                phase(&r.place),
                r.placements_per_s(),
                r.unplaceable
            );
            println!(
                "  {} log entries; every server's state {}",
                r.entries,
                &r.state_hash[..16]
            );
            println!(
                "  most VMs on one node: {}; nodes over capacity: {}",
                r.max_vms_on_a_node, r.capacity_violations
            );
            println!(
                "  wall {:.1} s in all; peak RSS {:.0} MiB",
                t.elapsed().as_secs_f64(),
                vm_hwm_mib()
            );
            if r.capacity_violations == 0 && r.unplaceable == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("C1M failed: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn options(opt: &Opt, seed: u64) -> SimOptions {
    let mut o = SimOptions::new(seed);
    o.faults = opt.faults.plan();
    o.snapshot_every = opt.snapshot_every;
    o.nodes = opt.nodes;
    o.safety_ms = opt.safety_ms;
    o.liveness_ms = opt.liveness_ms;
    o.bug = opt.bug;
    o.vms = opt.vms;
    o.grace_ms = opt.grace_ms;
    o
}

fn print_failure(r: &Report, o: &SimOptions) {
    eprintln!(
        "seed {} FAILED ({} violations):",
        r.seed,
        r.violations.len()
    );
    for v in &r.violations {
        eprintln!("  - {v}");
    }
    eprintln!("  replay: {}", o.replay_command());
}

fn main() -> ExitCode {
    let opt = Opt::parse();
    if opt.c1m {
        return c1m(&opt);
    }
    if opt.nodes == 0 || opt.nodes > 200 {
        eprintln!("--nodes must be 1-200");
        return ExitCode::from(2);
    }
    if let Some(seed) = opt.seed {
        let mut o = options(&opt, seed);
        o.keep_trace = true;
        let r = run_seed(&o);
        for line in &r.trace {
            println!("{line}");
        }
        println!(
            "seed {seed}: simulated {}, {} events, trace {}, acked writes {}, committed entries {}, wall {:.2}s",
            blixard_sim::fmt_ms(r.sim_ms),
            r.events,
            r.trace_hash,
            r.acked,
            r.committed,
            r.wall.as_secs_f64()
        );
        println!("faults and events: {}", r.counters);
        if r.violations.is_empty() {
            println!("no violations");
            return ExitCode::SUCCESS;
        }
        print_failure(&r, &o);
        return ExitCode::FAILURE;
    }

    let wall = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let results: Arc<Mutex<Vec<Report>>> = Arc::default();
    let jobs = opt.jobs.clamp(1, 64);
    let opt = Arc::new(opt);
    let threads: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, results, opt) = (next.clone(), results.clone(), opt.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opt.seeds {
                    return;
                }
                let o = options(&opt, opt.start_seed + i);
                let r = run_seed(&o);
                if !r.violations.is_empty() {
                    print_failure(&r, &o);
                }
                results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            eprintln!("a worker thread panicked");
        }
    }
    let results = results.lock().unwrap_or_else(|p| p.into_inner());
    let mut counters = Counters::default();
    let mut sim_ms = 0u64;
    let mut failed: Vec<u64> = Vec::new();
    let (mut acked, mut events) = (0usize, 0u64);
    for r in results.iter() {
        counters.merge(&r.counters);
        sim_ms += r.sim_ms;
        acked += r.acked;
        events += r.events;
        if !r.violations.is_empty() {
            failed.push(r.seed);
        }
    }
    failed.sort_unstable();
    let wall = wall.elapsed().as_secs_f64();
    let hours = sim_ms as f64 / 3_600_000.0;
    println!(
        "seeds:           {} ({}..{}), {} nodes, {} jobs",
        results.len(),
        opt.start_seed,
        opt.start_seed + opt.seeds,
        opt.nodes,
        jobs
    );
    println!(
        "simulated:       {hours:.2} h ({:.0} simulated s per wall s)",
        sim_ms as f64 / 1000.0 / wall.max(1e-9)
    );
    println!(
        "wall:            {wall:.1} s ({:.2} seeds/s)",
        results.len() as f64 / wall.max(1e-9)
    );
    println!("events:          {events}; acknowledged writes {acked}");
    println!("faults/events:   {counters}");
    println!(
        "violations:      {} seeds failed {:?}",
        failed.len(),
        failed
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
