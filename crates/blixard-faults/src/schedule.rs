//! One fault schedule: a fresh cluster in namespaces, clients recording a history of label
//! writes and linearizable reads while a seeded nemesis breaks the network and the
//! processes, then healing, final reads, and the checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard_history::{check, plant, Op, Operation, Outcome, Verdict};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::cluster::Cluster;
use crate::net::Net;
use crate::Error;

/// What one schedule runs.
#[derive(Clone, Debug)]
pub struct ScheduleOptions {
    pub seed: u64,
    pub nodes: usize,
    pub clients: usize,
    /// How long the nemesis runs.
    pub faults_for: Duration,
    /// Label keys the clients write (on node 0's record).
    pub keys: usize,
    pub plant: Option<Plant>,
    /// Whether the nemesis may `kill -9` nodes (else it pauses them instead).
    pub kills: bool,
}

impl ScheduleOptions {
    pub fn new(seed: u64) -> Self {
        Self { seed, nodes: 5, clients: 3, faults_for: Duration::from_secs(15), keys: 4, plant: None, kills: true }
    }
}

/// A bug planted into the recorded history, to show the checker catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Plant {
    /// One read returns a value that was overwritten before it began.
    StaleRead,
    /// One read misses an acknowledged write (sees the key absent).
    LostWrite,
}

/// What one schedule did and found.
#[derive(Debug, Default)]
pub struct ScheduleReport {
    pub seed: u64,
    pub operations: usize,
    pub writes_acked: usize,
    pub reads: usize,
    pub unknown: usize,
    pub faults: BTreeMap<&'static str, usize>,
    /// Linearizability violations (at most one per schedule: the checker stops at the first).
    pub violations: Vec<String>,
    /// Keys whose final value is none of the writes that could still be last.
    pub acked_lost: usize,
    /// Keys the checker could not decide within its budget.
    pub undecided: Vec<String>,
    /// Whether a bug was planted (and where), if asked.
    pub planted: Option<bool>,
    pub wall: Duration,
}

/// Runs one schedule with `bin` (the `blixard` binary) under `dir`.
pub fn run_schedule(bin: &Path, dir: &Path, opts: &ScheduleOptions) -> Result<ScheduleReport, Error> {
    let started = Instant::now();
    let net = Net::new(std::process::id().wrapping_add(opts.seed as u32), opts.nodes)?;
    let mut cluster = Cluster::start(bin, dir, net, opts.nodes)?;
    let target = cluster.ids[0].clone();
    let keys: Vec<String> = (0..opts.keys).map(|k| format!("k{k}")).collect();

    let epoch = Instant::now();
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let ticket = cluster.ticket.clone();
    let mut workers = Vec::new();
    for c in 0..opts.clients {
        let client = Client {
            id: c as u64,
            rng: StdRng::seed_from_u64(opts.seed ^ (0x5eed_0000 + c as u64)),
            target: target.clone(),
            keys: keys.clone(),
            epoch,
            history: history.clone(),
            cli: CliHandle::of(&cluster, &ticket),
        };
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || client.run(&stop)));
    }

    let mut report = ScheduleReport { seed: opts.seed, ..Default::default() };
    let nemesis = nemesis(&mut cluster, opts, &mut report.faults);
    // Heal everything, bring every node back, and let the cluster settle.
    for i in 0..opts.nodes {
        cluster.net.heal(i);
        cluster.pause(i, false);
    }
    for i in 0..opts.nodes {
        cluster.restart(i)?;
    }
    nemesis?;
    let healthy = cluster.wait_healthy(Duration::from_secs(60));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    healthy?;
    // Final reads, after every client stopped: every acknowledged write must show.
    let final_client = Client {
        id: 999,
        rng: StdRng::seed_from_u64(opts.seed),
        target,
        keys: keys.clone(),
        epoch,
        history: history.clone(),
        cli: CliHandle::of(&cluster, &ticket),
    };
    // The cluster is healthy, but a read can still meet a leader change: try for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !final_client.read() {
        if Instant::now() > deadline {
            return Err(Error::Timeout("a final read after healing (30 s)".into()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut history = std::mem::take(&mut *history.lock().unwrap_or_else(|p| p.into_inner()));
    report.operations = history.len();
    report.writes_acked = history.iter().filter(|o| o.outcome == Outcome::Written).count();
    report.reads = history.iter().filter(|o| matches!(o.outcome, Outcome::Read(_))).count();
    report.unknown = history.iter().filter(|o| o.outcome == Outcome::Unknown).count();
    report.planted = opts.plant.map(|p| match p {
        Plant::StaleRead => plant::stale_read(&mut history),
        Plant::LostWrite => plant::lost_write(&mut history),
    });
    report.acked_lost = acked_lost(&history);
    match check(&history, blixard_history::DEFAULT_BUDGET) {
        Verdict::Linearizable => {}
        v @ Verdict::TooComplex { .. } => report.undecided.push(v.to_string()),
        v => report.violations.push(v.to_string()),
    }
    report.wall = started.elapsed();
    Ok(report)
}

/// Keys whose last read (the final one) shows a value no write could have left last: every
/// write that returned before another acknowledged write to the key was invoked is
/// superseded; the final value must be one of the others.
fn acked_lost(history: &[Operation]) -> usize {
    let mut lost = 0;
    let mut keys: Vec<&str> = history.iter().map(|o| o.op.key()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let writes: Vec<&Operation> = history
            .iter()
            .filter(|o| o.op.key() == key && matches!(o.op, Op::Write { .. }) && o.outcome != Outcome::Failed)
            .collect();
        let Some(last_read) = history.iter().filter(|o| o.op.key() == key && matches!(o.outcome, Outcome::Read(_))).max_by_key(|o| o.call) else {
            continue;
        };
        let Outcome::Read(seen) = &last_read.outcome else { continue };
        let candidates: Vec<Option<&str>> = writes
            .iter()
            .filter(|w| {
                !writes.iter().any(|later| later.outcome == Outcome::Written && w.ret.is_some_and(|r| later.call > r))
            })
            .filter_map(|w| match &w.op {
                Op::Write { value, .. } => Some(Some(value.as_str())),
                Op::Read { .. } => None,
            })
            .collect();
        let acked_any = writes.iter().any(|w| w.outcome == Outcome::Written);
        if acked_any && !candidates.contains(&seen.as_deref()) {
            lost += 1;
        }
    }
    lost
}

/// The nemesis: one action every 0.5–2 s for `faults_for`. At most one network fault at a
/// time; at most a minority of nodes killed or paused at once.
fn nemesis(c: &mut Cluster, opts: &ScheduleOptions, faults: &mut BTreeMap<&'static str, usize>) -> Result<(), Error> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let end = Instant::now() + opts.faults_for;
    let n = opts.nodes;
    // Nodes down (killed or paused) and when they come back.
    let mut down: Vec<(usize, Instant)> = Vec::new();
    let mut net_fault = false;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2_000)));
        let now = Instant::now();
        for (i, _) in down.iter().filter(|(_, back)| *back <= now) {
            if c.is_paused(*i) {
                c.pause(*i, false);
            } else {
                c.restart(*i)?;
            }
        }
        down.retain(|(_, back)| *back > now);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        match rng.random_range(0..6) {
            0 | 1 if !net_fault => {
                // Partition: a random minority against the rest.
                let (minority, majority) = order.split_at(rng.random_range(1..=(n - 1) / 2));
                let one_way = rng.random_bool(0.5);
                for &m in minority {
                    c.net.drop_from(m, majority)?;
                }
                if !one_way {
                    for &m in majority {
                        c.net.drop_from(m, minority)?;
                    }
                }
                *faults.entry(if one_way { "partition_one_way" } else { "partition" }).or_default() += 1;
                net_fault = true;
            }
            2 if !net_fault => {
                c.net.limit(order[0], "1mbit")?;
                *faults.entry("rate_limit").or_default() += 1;
                net_fault = true;
            }
            3 | 4 if down.len() < (n - 1) / 2 => {
                let i = order[0];
                if down.iter().any(|(d, _)| *d == i) {
                    continue;
                }
                let back = now + Duration::from_millis(rng.random_range(500..4_000));
                if rng.random_bool(0.5) && opts.kills {
                    c.kill9(i);
                    *faults.entry("kill9").or_default() += 1;
                } else {
                    c.pause(i, true);
                    *faults.entry("pause").or_default() += 1;
                }
                down.push((i, back));
            }
            _ => {
                for i in 0..n {
                    c.net.heal(i);
                }
                net_fault = false;
            }
        }
    }
    Ok(())
}

/// What a client needs to run the CLI without holding the cluster.
#[derive(Clone)]
struct CliHandle {
    bin: std::path::PathBuf,
    ns: String,
    config: std::path::PathBuf,
    ticket: String,
}

impl CliHandle {
    fn of(c: &Cluster, ticket: &str) -> Self {
        Self { bin: c.bin.clone(), ns: c.net.clients_ns(), config: c.root.join("cli"), ticket: ticket.to_string() }
    }

    fn run(&self, args: &[&str]) -> Result<std::process::Output, Error> {
        crate::cluster::run_cli(&self.bin, &self.ns, &self.config, &["--ticket".to_string(), self.ticket.clone()], args)
    }
}

struct Client {
    id: u64,
    rng: StdRng,
    target: String,
    keys: Vec<String>,
    epoch: Instant,
    history: Arc<Mutex<Vec<Operation>>>,
    cli: CliHandle,
}

impl Client {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn record(&self, ops: impl IntoIterator<Item = Operation>) {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).extend(ops);
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if self.rng.random_bool(0.5) {
                seq += 1;
                let key = self.keys[self.rng.random_range(0..self.keys.len())].clone();
                self.write(&key, &format!("c{}n{seq}", self.id));
            } else {
                self.read();
            }
        }
    }

    fn write(&self, key: &str, value: &str) {
        let call = self.now();
        let res = self.cli.run(&["node", "label", &self.target, &format!("{key}={value}")]);
        let (ret, outcome) = match res {
            Ok(_) => (Some(self.now()), Outcome::Written),
            // A timeout, a lost connection, a leader change mid-write: it may have committed.
            Err(_) => (None, Outcome::Unknown),
        };
        self.record([Operation { client: self.id, op: Op::Write { key: key.into(), value: value.into() }, call, ret, outcome }]);
    }

    /// One linearizable read of every key (the cluster status, confirmed by the leader with
    /// a quorum). Returns whether it was answered.
    fn read(&self) -> bool {
        let call = self.now();
        let Ok(out) = self.cli.run(&["cluster", "status"]) else {
            // An unanswered read tells nothing.
            return false;
        };
        let ret = self.now();
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
        let Some(member) = status["members"].as_array().and_then(|ms| ms.iter().find(|m| m["id"] == self.target.as_str())) else {
            return false;
        };
        let labels = &member["labels"];
        self.record(self.keys.iter().map(|k| Operation {
            client: self.id,
            op: Op::Read { key: k.clone() },
            call,
            ret: Some(ret),
            outcome: Outcome::Read(labels[k].as_str().map(str::to_string)),
        }));
        true
    }
}
