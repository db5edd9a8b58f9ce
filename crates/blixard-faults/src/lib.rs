//! Fault schedules on real Blixard node processes, each in its own network namespace.
//!
//! A schedule starts a fresh cluster ([`cluster`]) in namespaces joined by a bridge
//! ([`net`]), runs clients that record every operation they attempt while a seeded nemesis
//! partitions (nft, both ways or one way), rate-limits (`tc tbf`), kills (`kill -9`, then
//! restart) and pauses (SIGSTOP) nodes, heals, reads every key once more, and checks the
//! history with [`blixard_history::check`] ([`schedule`]).
//!
//! The nemesis's choices follow the seed; the processes' timing does not, so a seed replays
//! the same faults, not the same run.

pub mod cluster;
pub mod net;
pub mod schedule;

pub use schedule::{run_schedule, Plant, ScheduleOptions, ScheduleReport};

/// Why a schedule could not run to its end (not a violation: those are in the report).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("node {node} did not start: {detail}")]
    NodeStart { node: usize, detail: String },
    #[error("`blixard {args}` failed: {stderr}")]
    Cli { args: String, stderr: String },
    #[error("`blixard {args}` did not answer within {:?}", cluster::CLI_TIMEOUT)]
    CliTimeout { args: String },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
