//! The audit log: one JSON line per applied state-changing request (who, what, when,
//! result), in `DATA_DIR/audit.log`. Written from the applied Raft log, so every node keeps
//! the same complete, ordered record; entries re-applied after a restart are skipped by
//! log index.

use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use blixard_raft::storage::AppliedEntry;
use blixard_types::CommandResult;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::warn;

/// One audit record. Field names are a stable format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Raft log index: unique and ordered.
    pub index: u64,
    /// When the request was proposed (unix ms, the proposer's clock).
    pub at_ms: u64,
    /// The authenticated key that asked.
    pub by: String,
    pub what: String,
    /// `ok`, or why the state machine refused it.
    pub result: String,
}

/// The index of the last record in an existing log (0 if none or unreadable).
fn last_index(path: &Path) -> u64 {
    let Ok(f) = std::fs::File::open(path) else { return 0 };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<AuditRecord>(&l).ok())
        .map(|r| r.index)
        .last()
        .unwrap_or(0)
}

/// Appends records from `rx` to `path` until the sender is gone.
pub async fn run(path: PathBuf, mut rx: UnboundedReceiver<AppliedEntry>) {
    let mut last = last_index(&path);
    let mut file = match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open the audit log; auditing is off");
            return;
        }
    };
    let _ = file.seek(SeekFrom::End(0));
    while let Some(e) = rx.recv().await {
        if e.index <= last {
            continue;
        }
        last = e.index;
        let record = AuditRecord {
            index: e.index,
            at_ms: e.at_ms,
            by: e.by.to_string(),
            what: e.kind.to_string(),
            result: match e.result {
                CommandResult::Ok => "ok".to_string(),
                CommandResult::Refused(r) => r.to_string(),
            },
        };
        let line = serde_json::to_string(&record).unwrap_or_default();
        if let Err(err) = writeln!(file, "{line}") {
            warn!(error = %err, "cannot write the audit log");
        }
    }
    let _ = file.sync_all();
}
