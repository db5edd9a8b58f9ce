//! `blixard-faults schedules`: runs K random fault schedules on real node processes in
//! network namespaces and prints a summary. Needs root, iproute2 and nftables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blixard_faults::{net, run_schedule, Plant, ScheduleOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Fault schedules on real Blixard processes in network namespaces")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run fault schedules and check every history for linearizability.
    Schedules {
        /// How many schedules.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Seed of the first schedule (the nemesis's choices follow it).
        #[arg(long, default_value_t = 1)]
        start_seed: u64,
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 3)]
        clients: usize,
        /// Seconds of faults per schedule.
        #[arg(long, default_value_t = 15)]
        fault_secs: u64,
        /// Label keys the clients write.
        #[arg(long, default_value_t = 4)]
        keys: usize,
        /// Plant a bug into each recorded history, to see the checker fail.
        #[arg(long, value_enum)]
        plant: Option<Plant>,
        /// Pause nodes instead of killing them.
        #[arg(long)]
        no_kills: bool,
        /// The `blixard` binary (default: beside this one).
        #[arg(long)]
        blixard: Option<PathBuf>,
        /// Keep each schedule's data dirs and logs (always kept when a schedule fails).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let Cmd::Schedules { count, start_seed, nodes, clients, fault_secs, keys, plant, no_kills, blixard, keep } = Cli::parse().cmd;
    if nodes < 3 {
        bail!("--nodes must be at least 3 (a majority must survive a fault)");
    }
    net::prerequisites().map_err(|why| anyhow::anyhow!("cannot run schedules: {why}"))?;
    let bin = match blixard {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("blixard"),
    };
    if !bin.is_file() {
        bail!("no blixard binary at {} (build it: cargo build --release -p blixard, or pass --blixard)", bin.display());
    }
    let started = Instant::now();
    let mut totals = Totals::default();
    for seed in start_seed..start_seed + count {
        let dir = tempfile::Builder::new().prefix(&format!("blixard-faults-{seed}-")).tempdir().context("temp dir")?;
        let opts = ScheduleOptions { seed, nodes, clients, faults_for: Duration::from_secs(fault_secs), keys, plant, kills: !no_kills };
        let replay = format!(
            "blixard-faults schedules --count 1 --start-seed {seed} --nodes {nodes} --clients {clients} --fault-secs {fault_secs} --keys {keys}{}",
            if no_kills { " --no-kills" } else { "" }
        );
        match run_schedule(&bin, dir.path(), &opts) {
            Ok(r) => {
                let faults: Vec<String> = r.faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "schedule {seed}: {} ops ({} acked writes, {} reads, {} unknown), faults {}, {} violations, {} acked-lost{}, {:.0} s",
                    r.operations,
                    r.writes_acked,
                    r.reads,
                    r.unknown,
                    faults.join(" "),
                    r.violations.len(),
                    r.acked_lost,
                    if r.undecided.is_empty() { String::new() } else { format!(", {} undecided", r.undecided.len()) },
                    r.wall.as_secs_f64()
                );
                let failed = !r.violations.is_empty() || r.acked_lost > 0;
                for v in r.violations.iter().chain(&r.undecided) {
                    // The whole key's history goes to a file; the head says what happened.
                    let file = dir.path().join("violation.txt");
                    let _ = std::fs::write(&file, v);
                    for line in v.lines().take(8) {
                        println!("  {line}");
                    }
                    println!("  (all of it: {})", file.display());
                }
                if failed {
                    if plant.is_none() {
                        println!("  replay: {replay}");
                    }
                    println!("  logs kept in {}", dir.path().display());
                    let _ = dir.keep();
                } else if keep {
                    println!("  kept: {}", dir.path().display());
                    let _ = dir.keep();
                }
                totals.add(&r, failed);
            }
            Err(e) => {
                println!("schedule {seed}: could not run: {e}\n  replay: {replay}; logs kept in {}", dir.path().display());
                let _ = dir.keep();
                totals.errors += 1;
            }
        }
    }
    let faults: Vec<String> = totals.faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("schedules:   {count} ({} could not run), {nodes} nodes, {clients} clients, {fault_secs} s of faults each", totals.errors);
    println!("operations:  {} ({} acked writes, {} reads, {} unknown outcome)", totals.ops, totals.acked, totals.reads, totals.unknown);
    println!("faults:      {}", faults.join(" "));
    println!("violations:  {} schedules; acked-lost: {}; undecided: {}", totals.violating, totals.acked_lost, totals.undecided);
    println!("wall:        {:.0} s", started.elapsed().as_secs_f64());
    let ok = match plant {
        // Planted: every history that took the bug must have been caught.
        Some(_) => {
            println!("planted:     {} of {} histories took the bug; {} caught", totals.planted, count, totals.violating);
            totals.errors == 0 && totals.planted > 0 && totals.violating == totals.planted
        }
        None => totals.errors == 0 && totals.violating == 0 && totals.acked_lost == 0,
    };
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[derive(Default)]
struct Totals {
    ops: usize,
    acked: usize,
    reads: usize,
    unknown: usize,
    faults: BTreeMap<&'static str, usize>,
    violating: usize,
    acked_lost: usize,
    undecided: usize,
    planted: usize,
    errors: usize,
}

impl Totals {
    fn add(&mut self, r: &blixard_faults::ScheduleReport, failed: bool) {
        self.ops += r.operations;
        self.acked += r.writes_acked;
        self.reads += r.reads;
        self.unknown += r.unknown;
        for (k, v) in &r.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.violating += usize::from(failed);
        self.acked_lost += r.acked_lost;
        self.undecided += r.undecided.len();
        self.planted += usize::from(r.planted == Some(true));
    }
}
