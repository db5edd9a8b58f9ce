//! The shared, seeded world of one run: the fault settings, who is up, the links that are
//! cut, each node's clock and disk, the counters, the event trace and the invariant checkers.
//!
//! One `Mutex` guards it; it is only ever held for a few synchronous lines, never across an
//! `.await`, and everything runs on one thread, so the lock never blocks and never reorders.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use tokio::time::Instant;

use blixard_reconcile::liveness::Detector;

use crate::backend::{SimVm, VmFaults};
use crate::invariants::Invariants;
use crate::rng::SimRng;
use crate::Raft;

/// Per-message network faults, in force during the safety phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetFaults {
    /// Probability that a message (request or response) is lost.
    pub loss: f64,
    /// Probability that a request is delivered twice (the copy later: reordering).
    pub dup: f64,
    /// Probability that a message takes `spike_ms` instead of `base_ms`.
    pub spike: f64,
    pub base_ms: (u64, u64),
    pub spike_ms: (u64, u64),
}

impl NetFaults {
    /// A healthy LAN: 1–3 ms, nothing lost.
    pub const CALM: NetFaults = NetFaults {
        loss: 0.0,
        dup: 0.0,
        spike: 0.0,
        base_ms: (1, 3),
        spike_ms: (1, 3),
    };
    /// The default chaos.
    pub const CHAOS: NetFaults = NetFaults {
        loss: 0.05,
        dup: 0.03,
        spike: 0.05,
        base_ms: (1, 10),
        spike_ms: (50, 800),
    };
}

/// Named event counters (faults injected, messages, client outcomes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    pub fn bump(&mut self, kind: &'static str) {
        *self.0.entry(kind).or_default() += 1;
    }

    pub fn get(&self, kind: &str) -> u64 {
        self.0.get(kind).copied().unwrap_or(0)
    }

    pub fn merge(&mut self, other: &Counters) {
        for (k, v) in &other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// The event trace: every event is hashed; kept as text only when asked (replays).
#[derive(Debug)]
pub struct Trace {
    hasher: blake3::Hasher,
    lines: Option<Vec<String>>,
    pub events: u64,
}

impl Trace {
    pub fn new(keep: bool) -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            lines: keep.then(Vec::new),
            events: 0,
        }
    }

    pub fn push(&mut self, line: String) {
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        self.events += 1;
        if let Some(lines) = &mut self.lines {
            lines.push(line);
        }
    }

    pub fn hash(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }

    pub fn take_lines(&mut self) -> Vec<String> {
        self.lines.take().unwrap_or_default()
    }
}

/// Everything shared by the simulated nodes, network, nemesis and clients.
pub struct WorldState {
    /// Draws for the network and storage faults.
    pub rng: SimRng,
    pub net: NetFaults,
    /// Cut links `(from, to)`: a one-way partition cuts one direction.
    pub blocked: BTreeSet<(u64, u64)>,
    /// Running nodes.
    pub rafts: BTreeMap<u64, Raft>,
    /// Extra latency of each storage write, per node (ms range); absent = fast disk.
    pub slow_disk: BTreeMap<u64, (u64, u64)>,
    /// Each node's wall-clock offset from true simulated time (ms).
    pub clock_offset_ms: BTreeMap<u64, i64>,
    /// Per-link (next sequence number, highest delivered) to detect reordering.
    pub links: BTreeMap<(u64, u64), (u64, u64)>,
    pub counters: Counters,
    pub trace: Trace,
    pub checks: Invariants,
    pub violations: Vec<String>,
    /// Every node of the run, up or down.
    pub node_ids: Vec<u64>,
    /// Each node's VMs as its backend knows them (they outlive crashes of the node).
    pub backends: BTreeMap<u64, BTreeMap<String, SimVm>>,
    /// What the backends do to guests now.
    pub vm_faults: VmFaults,
    /// Images each node holds (kept across restarts, like the blob store).
    pub images_held: BTreeMap<u64, BTreeSet<String>>,
    /// Per node, the last index of the newest snapshot it installed: its stored log below
    /// that is no longer compared (see `check_logs`).
    pub snapshot_floor: BTreeMap<u64, u64>,
    /// Each node's disk under its redb store (outlives crashes; a power loss drops what
    /// was not synced).
    pub disks: BTreeMap<u64, crate::disk::SimDisk>,
    /// Each running node's failure detector, fed by gossip (lost in a crash).
    pub detectors: BTreeMap<u64, Detector>,
    /// The last request id handed out (ids are a counter here, random in the node).
    last_request_id: u128,
    start: Instant,
}

/// The simulated epoch: `at_ms` stamps are this plus simulated time plus the node's skew.
pub const EPOCH_MS: u64 = 1_700_000_000_000;

impl WorldState {
    pub fn new(seed: u64, keep_trace: bool) -> Self {
        Self {
            rng: SimRng::fork(seed, 0x004e_4554), // "NET"
            net: NetFaults::CALM,
            blocked: BTreeSet::new(),
            rafts: BTreeMap::new(),
            slow_disk: BTreeMap::new(),
            clock_offset_ms: BTreeMap::new(),
            links: BTreeMap::new(),
            counters: Counters::default(),
            trace: Trace::new(keep_trace),
            checks: Invariants::default(),
            violations: Vec::new(),
            node_ids: Vec::new(),
            backends: BTreeMap::new(),
            vm_faults: VmFaults::CALM,
            images_held: BTreeMap::new(),
            detectors: BTreeMap::new(),
            snapshot_floor: BTreeMap::new(),
            disks: BTreeMap::new(),
            last_request_id: 0,
            start: Instant::now(),
        }
    }

    /// A fresh request id (never 0, which means "not deduplicated").
    pub fn request_id(&mut self) -> u128 {
        self.last_request_id += 1;
        self.last_request_id
    }

    /// Simulated milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.start).as_millis() as u64
    }

    /// What `node`'s own clock reads now (ms since the Unix epoch), skew included.
    pub fn node_clock_ms(&self, node: u64) -> u64 {
        let skew = self.clock_offset_ms.get(&node).copied().unwrap_or(0);
        (EPOCH_MS + self.now_ms()).saturating_add_signed(skew)
    }

    /// Records an event in the trace, stamped with simulated time.
    pub fn event(&mut self, what: impl fmt::Display) {
        let line = format!("{:>9} {what}", self.now_ms());
        self.trace.push(line);
    }

    /// Records a violated invariant (also in the trace).
    pub fn violation(&mut self, what: String) {
        self.event(format_args!("VIOLATION {what}"));
        self.counters.bump("violations");
        // Bounded: a broken run can repeat the same violation thousands of times.
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    pub fn violations_opt(&mut self, found: Option<String>) {
        if let Some(v) = found {
            self.violation(v);
        }
    }
}

/// The lock around [`WorldState`].
pub struct World(Mutex<WorldState>);

impl World {
    pub fn new(state: WorldState) -> Self {
        Self(Mutex::new(state))
    }

    pub fn lock(&self) -> MutexGuard<'_, WorldState> {
        // A panic while holding it already fails the run; keep going to report.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
