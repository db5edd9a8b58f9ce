//! Durable Raft storage: the log, the vote and the state-machine snapshot in one redb file.
//!
//! Layout of the file (see [`open`]):
//! - `raft_log`: log index (`u64`) → postcard of the openraft `Entry`.
//! - `raft_meta`: `"schema_version"`, `"vote"`, `"committed"`, `"last_purged"`,
//!   `"snapshot_counter"` → postcard values.
//! - `raft_snapshot`: `"meta"` → postcard `SnapshotMeta`, `"data"` → the snapshot bytes (a
//!   postcard [`SnapshotBlob`]). Both rows are written in one transaction.
//!
//! Durability: every write to the vote, a purge, a truncation or a snapshot is a redb write
//! transaction committed with [`Durability::Immediate`] (fsync'd) before the call returns.
//! Log appends use group commit (see [`LogStore`]): `append` puts the encoded entries in an
//! in-memory buffer readable by every log reader and returns at once; a flusher thread
//! writes everything buffered in one fsync'd commit and only then reports the entries
//! flushed to openraft, so many appends share one fsync. With
//! [`OpenOptions::inline_io`] (the simulator) `append` commits before returning instead.
//! The committed log id is the exception: it is written with [`Durability::None`] and
//! becomes durable with the next fsync'd commit. Losing it in a crash is safe: openraft then
//! re-applies fewer entries on restart and learns the commit index again from the leader.
//!
//! The applied [`ClusterState`](blixard_state::ClusterState) lives in memory only
//! ([`StateMachineStore::shared`]); it becomes durable through snapshots. On open, the
//! persisted snapshot is loaded, and openraft re-applies the committed log above it.
//!
//! Errors: opening returns [`OpenError`]; at the openraft edge, redb and postcard errors become
//! [`openraft::StorageError`] naming the subject (vote, logs, snapshot…) and the verb. Bytes
//! read from disk are never trusted: a row that does not decode is reported as corrupt.
//!
//! Everything is generic over a [`StorageConfig`] (an openraft type config whose payloads are
//! Blixard's [`Request`]/[`Response`]) so openraft's conformance suite, which needs
//! `NodeId: From<u64>`, can run against the very same code; [`TypeConfig`] is the default.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blixard_types::{Request, Response};
use openraft::{AnyError, ErrorSubject, ErrorVerb, RaftTypeConfig, StorageError, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::TypeConfig;

mod log_store;
mod state_machine;
#[cfg(test)]
mod tests;

pub use log_store::{LogReader, LogStore};
pub use state_machine::{Applied, AppliedEntry, SharedState, SnapshotBlob, SnapshotBuilder, StateMachineStore};

/// Durability level re-exported for the docs above.
pub use redb::Durability;

/// An openraft type configuration this storage can serve: Blixard's requests and responses,
/// openraft's own `Entry`, and snapshots held in memory as bytes.
///
/// Only [`TypeConfig`] is used in production; the tests also use a config with `u64` node ids.
pub trait StorageConfig:
    RaftTypeConfig<D = Request, R = Response, Entry = openraft::Entry<Self>, SnapshotData = Cursor<Vec<u8>>>
{
}

impl<C> StorageConfig for C where
    C: RaftTypeConfig<D = Request, R = Response, Entry = openraft::Entry<C>, SnapshotData = Cursor<Vec<u8>>>
{
}

/// Version of the table layout and value encodings, stored under `raft_meta/schema_version`.
/// 2: standard Raft leader ids (openraft's `single-term-leader`): a log id carries its term
/// only, a vote is `(term, voted_for)`. 3: every request carries an id and the state
/// remembers the last ones applied. Older stores cannot be read.
pub const SCHEMA_VERSION: u32 = 3;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

pub(crate) const KEY_SCHEMA: &str = "schema_version";
pub(crate) const KEY_VOTE: &str = "vote";
pub(crate) const KEY_COMMITTED: &str = "committed";
pub(crate) const KEY_LAST_PURGED: &str = "last_purged";
pub(crate) const KEY_SNAPSHOT_COUNTER: &str = "snapshot_counter";
pub(crate) const KEY_SNAPSHOT_META: &str = "meta";
pub(crate) const KEY_SNAPSHOT_DATA: &str = "data";

/// Why the raft store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// redb could not create, open or prepare the file (I/O error, locked by another process…).
    #[error("cannot open raft store {}", path.display())]
    Database {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    /// The file was written by a build with another layout.
    #[error(
        "raft store {} has format version {found}; this build reads version {supported}: run the Blixard version that wrote it, or move the data dir away and join this node again with a new ticket",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    /// A row needed at startup (schema version, persisted snapshot) does not decode.
    #[error("raft store {} is corrupt", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: CorruptError,
    },
}

/// Bytes read from the store that do not decode as what they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt {what}: {reason}")]
pub struct CorruptError {
    what: String,
    reason: String,
}

impl CorruptError {
    pub(crate) fn new(what: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self { what: what.into(), reason: reason.to_string() }
    }

    /// What is corrupt, e.g. `log entry at index 7`.
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// Internal error of one storage operation, mapped to a `StorageError` at the openraft edge.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error(transparent)]
    Corrupt(#[from] CorruptError),
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("the in-memory state machine lock is poisoned")]
    Poisoned,
    #[error("the lock on the unflushed raft log entries is poisoned")]
    LogPoisoned,
    #[error("the raft log flusher thread is gone")]
    FlusherGone,
}

macro_rules! redb_into_db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(e.into())
            }
        }
    )*};
}
redb_into_db_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl DbError {
    /// Maps to openraft's error, naming what was being done to what.
    pub(crate) fn into_storage<C: RaftTypeConfig>(
        self,
        subject: ErrorSubject<C::NodeId>,
        verb: ErrorVerb,
    ) -> StorageError<C::NodeId> {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// Postcard-encodes a value about to be stored.
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, DbError> {
    postcard::to_allocvec(value).map_err(|e| DbError::Encode { what, reason: e.to_string() })
}

/// Decodes bytes read from the store; `what` names them in the error.
pub(crate) fn decode<T: DeserializeOwned>(what: impl FnOnce() -> String, bytes: &[u8]) -> Result<T, CorruptError> {
    postcard::from_bytes(bytes).map_err(|e| CorruptError::new(what(), e))
}

/// Runs blocking redb work (a commit may fsync) off the async worker threads, or on the
/// calling task if `inline` (see [`OpenOptions::inline_io`]).
pub(crate) async fn blocking<T, F>(inline: bool, f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
{
    if inline {
        return f();
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| DbError::Task(e.to_string()))?
}

/// How to open the store. The default is what production uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Run redb writes (and their fsyncs) on the calling task instead of tokio's blocking
    /// pool. Only for the deterministic simulator (`sim/`): a blocking-pool thread finishes
    /// at a wall-clock moment, which would make a current-thread, paused-clock runtime
    /// interleave tasks differently from run to run. Blocks the runtime during each commit.
    pub inline_io: bool,
}

impl OpenOptions {
    /// Options with [`OpenOptions::inline_io`] set to `inline_io`.
    pub fn inline_io(mut self, inline_io: bool) -> Self {
        self.inline_io = inline_io;
        self
    }
}

/// Opens (creating if needed) the raft store at `path`, e.g. `DATA_DIR/raft.redb`, and loads
/// the persisted snapshot, if any, into the state machine.
///
/// The two handles share the file; drop both (and any log reader or snapshot builder) to
/// close it. redb refuses to open a file that is already open.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    open_with::<TypeConfig>(path)
}

/// [`open`] for any [`StorageConfig`].
pub fn open_with<C: StorageConfig>(path: &Path) -> Result<(LogStore<C>, StateMachineStore<C>), OpenError> {
    open_with_options::<C>(path, OpenOptions::default())
}

/// [`open_with`] with [`OpenOptions`].
pub fn open_with_options<C: StorageConfig>(
    path: &Path,
    options: OpenOptions,
) -> Result<(LogStore<C>, StateMachineStore<C>), OpenError> {
    open_database(path, options, || Database::create(path))
}

/// [`open_with_options`] on any redb storage backend (the simulator's disks, which lose
/// what was not synced when the power goes). `label` names the store in errors.
pub fn open_with_backend<C: StorageConfig>(
    backend: impl redb::StorageBackend,
    label: &Path,
    options: OpenOptions,
) -> Result<(LogStore<C>, StateMachineStore<C>), OpenError> {
    open_database(label, options, || redb::Builder::new().create_with_backend(backend))
}

fn open_database<C: StorageConfig>(
    path: &Path,
    options: OpenOptions,
    create: impl FnOnce() -> Result<Database, redb::DatabaseError>,
) -> Result<(LogStore<C>, StateMachineStore<C>), OpenError> {
    let span = tracing::debug_span!("raft_store_open", path = %path.display());
    let _guard = span.enter();
    let db_err = |e: DbError| match e {
        DbError::Redb(source) => OpenError::Database { path: path.to_owned(), source },
        DbError::Corrupt(source) => OpenError::Corrupt { path: path.to_owned(), source },
        other => OpenError::Corrupt { path: path.to_owned(), source: CorruptError::new("raft store", other) },
    };
    let db = create().map_err(|e| db_err(DbError::from(e)))?;
    prepare_tables(&db).map_err(|e| match e {
        Prepared::Db(e) => db_err(e),
        Prepared::Version(found) => {
            OpenError::UnsupportedVersion { path: path.to_owned(), found, supported: SCHEMA_VERSION }
        }
    })?;
    let db = Arc::new(db);
    let (applied, counter) = state_machine::load::<C>(&db).map_err(db_err)?;
    tracing::debug!(
        last_applied = ?applied.last_applied,
        snapshot_counter = counter,
        "raft store opened"
    );
    let inline = options.inline_io;
    Ok((LogStore::new(db.clone(), inline), StateMachineStore::new(db, applied, counter, inline)))
}

enum Prepared {
    Db(DbError),
    Version(u32),
}

impl<E: Into<DbError>> From<E> for Prepared {
    fn from(e: E) -> Self {
        Prepared::Db(e.into())
    }
}

/// Creates the tables and checks or records the schema version.
fn prepare_tables(db: &Database) -> Result<(), Prepared> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        txn.open_table(LOG)?;
        txn.open_table(SNAPSHOT)?;
        let mut meta = txn.open_table(META)?;
        let found = match meta.get(KEY_SCHEMA)? {
            Some(v) => Some(decode::<u32>(|| "schema version".into(), v.value())?),
            None => None,
        };
        match found {
            Some(SCHEMA_VERSION) => {}
            Some(other) => return Err(Prepared::Version(other)),
            None => {
                meta.insert(KEY_SCHEMA, encode("schema version", &SCHEMA_VERSION)?.as_slice())?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Reads and decodes one `raft_meta` row.
pub(crate) fn read_meta<T: DeserializeOwned>(db: &Database, key: &'static str) -> Result<Option<T>, DbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    let value = match table.get(key)? {
        Some(v) => Some(decode(|| format!("{key} record"), v.value())?),
        None => None,
    };
    Ok(value)
}

/// openraft settings for a LAN or loopback cluster: heartbeats every 100 ms, elections after
/// 300–600 ms of silence (fail-over well under 2 s), a snapshot every 10 000 entries keeping
/// the last 1 000 entries in the log for lagging followers.
pub fn default_config() -> openraft::Config {
    let config = openraft::Config {
        cluster_name: "blixard".to_string(),
        // openraft waits up to 2 x election_timeout_max before a node with a shorter log
        // stands, and honours the old leader's lease (= election_timeout_max): these values
        // bound failover near 1 s on a LAN.
        heartbeat_interval: 75,
        election_timeout_min: 200,
        election_timeout_max: 400,
        install_snapshot_timeout: Duration::from_secs(2).as_millis() as u64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        purge_batch_size: 256,
        ..Default::default()
    };
    // The values above are constants and pass validation (see the test); a failure here is
    // a programming error, caught by that test.
    #[allow(clippy::expect_used)]
    config.validate().expect("the built-in raft config is valid")
}
