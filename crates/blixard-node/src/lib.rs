//! The Blixard node daemon: wires identity, the iroh endpoint, Raft and the protocols
//! together, and serves the client API.
//!
//! Layout:
//! - [`config`]: what `node run` is given, and the data dir layout.
//! - [`node`]: starting (init, join, resume) and stopping a node.
//! - [`client_api`]: the client-API protocol: status, tickets, removal, labels, and
//!   forwarding to the leader.
//! - [`api_local`], [`api_leader`]: client requests one node answers itself (pull, gc,
//!   push, logs) and those the leader answers (catalogue, VM lifecycle).
//! - [`images`]: the node's image store (push, pull, what it holds, gc).
//! - [`executor`]: the reconciler's executor: committed state → VMs on the backends.
//! - [`placer`]: placement on the leader.
//! - [`join`]: the join protocol: admitting nodes and authorising CLI keys by ticket.
//! - [`client`]: the client side used by the CLI (and tests): find the cluster from a
//!   ticket, authorise the CLI key on first use, send requests.
//!
//! **Invariant:** the node is the only place that owns tasks and the `Router`; every
//! inbound connection except join passes the mesh's gate first.

mod api_leader;
mod api_local;
pub mod audit;
pub mod client;
pub mod client_api;
pub mod config;
pub mod executor;
pub mod health;
pub mod images;
pub mod join;
/// Failure detection (pure; shared with the simulator).
pub use blixard_reconcile::liveness;
pub mod metrics;
pub mod node;
pub mod placer;

pub use config::{NodeConfig, StartMode};
pub use node::{Node, StartError};

/// Unix time in milliseconds (stamped into proposals; `apply` never reads a clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
