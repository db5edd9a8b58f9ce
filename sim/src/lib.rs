//! Deterministic simulation of a Blixard cluster.
//!
//! N nodes run in one process on one thread: the real openraft, the real
//! [`ClusterState::apply`](blixard_state::ClusterState::apply) and the real redb storage
//! (`blixard_raft::storage`, on [`disk`]s that lose unsynced writes in a power loss), over
//! a simulated network and clock driven by one seed. The same seed replays the same run: the event trace, hashed, is identical.
//!
//! Layout:
//! - [`rng`]: the seeded generator everything random draws from.
//! - [`runtime`]: openraft's `AsyncRuntime` for the simulation (seeded `thread_rng`,
//!   per-node task tracking so a crash aborts a node's tasks).
//! - [`world`]: the shared state of a run: faults in force, cut links, clocks, counters, trace.
//! - [`network`]: openraft's network over a seeded message scheduler (loss, delay,
//!   duplication, reordering, partitions).
//! - [`storage`]: slow-disk and deliberately broken wrappers around the real log store; the
//!   state machine wrapper that feeds the checkers.
//! - [`invariants`]: one file per checked property, plus the client oracle.
//! - [`cluster`]: nodes (start, crash, restart), the nemesis, clients, the two phases.
//! - [`orchestrate`]: each node's health gossip, placer and executor, deciding with the
//!   node's own pure functions; [`backend`]: the simulated `VmBackend` they drive.
//! - [`c1m`]: a million VMs on ten thousand nodes through `apply` and the planner.
//!
//! Not modelled yet: loss of un-fsync'd writes; clock *rate* drift in Raft's own timers;
//! membership changes under faults. See `sim/README.md`.

use std::io::Cursor;
use std::time::Duration;

use blixard_raft::RaftNode;
use blixard_types::{Request, Response};

pub mod backend;
pub mod c1m;
pub mod cluster;
pub mod disk;
pub mod invariants;
pub mod network;
pub mod orchestrate;
pub mod rng;
pub mod runtime;
pub mod storage;
pub mod world;

pub use cluster::{run_seed, FaultPlan, Profile, Report, SimOptions};
pub use storage::Bug;

openraft::declare_raft_types!(
    /// Blixard's payloads on the simulation runtime, with `u64` node ids.
    pub SimConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = RaftNode,
        Entry = openraft::Entry<SimConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = runtime::SimRuntime,
);

pub type Raft = openraft::Raft<SimConfig>;
pub type Entry = openraft::Entry<SimConfig>;

/// Human-readable simulated duration.
pub fn fmt_ms(ms: u64) -> String {
    format!("{:.1}s", Duration::from_millis(ms).as_secs_f64())
}
