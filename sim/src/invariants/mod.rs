//! The properties checked while a simulation runs, one file per property. Each checker is
//! plain data fed by observations (what a node applied, who leads which term, what a client
//! was told); it returns a description of each violation it sees.

pub mod capacity;
pub mod election_safety;
pub mod log_matching;
pub mod oracle;
pub mod state_agreement;

pub use election_safety::ElectionSafety;
pub use log_matching::CommittedLog;
pub use oracle::Oracle;
pub use state_agreement::StateAgreement;

/// All checkers of one run.
#[derive(Debug, Default)]
pub struct Invariants {
    pub election: ElectionSafety,
    pub committed: CommittedLog,
    pub states: StateAgreement,
    pub oracle: Oracle,
}
