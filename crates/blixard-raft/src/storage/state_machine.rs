//! The state machine ([`RaftStateMachine`]): Blixard's [`ClusterState`] in memory, made
//! durable by snapshots persisted in the redb file.

use std::fmt;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use blixard_state::ClusterState;
use blixard_types::CommandResult;
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::{
    blocking, decode, encode, read_meta, CorruptError, DbError, StorageConfig, KEY_SNAPSHOT_COUNTER, KEY_SNAPSHOT_DATA,
    KEY_SNAPSHOT_META, META, SNAPSHOT,
};
use crate::TypeConfig;

type Result<T, C> = std::result::Result<T, StorageError<<C as openraft::RaftTypeConfig>::NodeId>>;
/// A persisted snapshot: its metadata and bytes.
type Persisted<C> = (Meta<C>, Vec<u8>);
type Meta<C> = SnapshotMeta<<C as openraft::RaftTypeConfig>::NodeId, <C as openraft::RaftTypeConfig>::Node>;

/// What the state machine has applied: the cluster state and the raft bookkeeping that goes
/// with it. Read it through [`StateMachineStore::shared`].
pub struct Applied<C: StorageConfig = TypeConfig> {
    pub state: ClusterState,
    /// The last log entry applied, `None` before the first.
    pub last_applied: Option<LogId<C::NodeId>>,
    /// The last membership applied.
    pub membership: StoredMembership<C::NodeId, C::Node>,
}

impl<C: StorageConfig> Default for Applied<C> {
    fn default() -> Self {
        Self { state: ClusterState::default(), last_applied: None, membership: StoredMembership::default() }
    }
}

impl<C: StorageConfig> Clone for Applied<C> {
    fn clone(&self) -> Self {
        Self { state: self.state.clone(), last_applied: self.last_applied.clone(), membership: self.membership.clone() }
    }
}

impl<C: StorageConfig> fmt::Debug for Applied<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Applied")
            .field("state", &self.state)
            .field("last_applied", &self.last_applied)
            .field("membership", &self.membership)
            .finish()
    }
}

/// The applied state, shared between the state machine and readers in the node (authorisation
/// checks, status). Hold the lock briefly and never across an `.await`.
pub type SharedState<C = TypeConfig> = Arc<RwLock<Applied<C>>>;

/// The bytes of a snapshot: postcard of this enum. New variants are only ever appended, so a
/// newer build can still install an older snapshot.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub enum SnapshotBlob<C: StorageConfig = TypeConfig> {
    V1 { state: ClusterState, last_applied: Option<LogId<C::NodeId>>, membership: StoredMembership<C::NodeId, C::Node> },
}

impl<C: StorageConfig> SnapshotBlob<C> {
    /// Decodes snapshot bytes and checks them against their metadata.
    pub fn decode(meta: &Meta<C>, bytes: &[u8]) -> std::result::Result<Applied<C>, CorruptError> {
        let what = || format!("snapshot {}", meta.snapshot_id);
        let SnapshotBlob::V1 { state, last_applied, membership } = decode::<Self>(what, bytes)?;
        if last_applied != meta.last_log_id || membership != meta.last_membership {
            return Err(CorruptError::new(what(), "its data does not match its metadata"));
        }
        Ok(Applied { state, last_applied, membership })
    }
}

/// The state machine. Cloning the [`SharedState`] out of it is the way to read the state.
pub struct StateMachineStore<C: StorageConfig = TypeConfig> {
    db: Arc<Database>,
    shared: SharedState<C>,
    /// Makes snapshot ids unique; persisted with each snapshot built here.
    snapshot_counter: Arc<AtomicU64>,
    /// Told about every applied normal entry (audit log, reconcilers).
    observer: Option<tokio::sync::mpsc::UnboundedSender<AppliedEntry>>,
    /// The index of the last applied entry, for tasks that act on state changes (a watch
    /// wakes them only when something was applied, unlike Raft's metrics, which change on
    /// every heartbeat).
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// See [`super::OpenOptions::inline_io`].
    inline_io: bool,
}

/// One applied client command, as observers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedEntry {
    pub index: u64,
    pub at_ms: u64,
    pub by: blixard_types::NodeId,
    pub kind: &'static str,
    pub result: CommandResult,
}

/// Builds a snapshot of the state machine and persists it (see [`RaftSnapshotBuilder`]).
pub struct SnapshotBuilder<C: StorageConfig = TypeConfig> {
    db: Arc<Database>,
    shared: SharedState<C>,
    snapshot_counter: Arc<AtomicU64>,
    inline_io: bool,
}

impl<C: StorageConfig> fmt::Debug for StateMachineStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore").finish_non_exhaustive()
    }
}

impl<C: StorageConfig> fmt::Debug for SnapshotBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotBuilder").finish_non_exhaustive()
    }
}

impl<C: StorageConfig> StateMachineStore<C> {
    pub(crate) fn new(db: Arc<Database>, applied: Applied<C>, snapshot_counter: u64, inline_io: bool) -> Self {
        let index = applied.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
        Self {
            db,
            shared: Arc::new(RwLock::new(applied)),
            snapshot_counter: Arc::new(AtomicU64::new(snapshot_counter)),
            observer: None,
            applied_tx: tokio::sync::watch::Sender::new(index),
            inline_io,
        }
    }

    /// Watches the index of the last applied entry (changes only when entries are applied
    /// or a snapshot is installed).
    pub fn applied_index(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Sends every applied normal entry to `tx` from now on (entries re-applied after a
    /// restart are sent again: observers deduplicate by index).
    pub fn observe(&mut self, tx: tokio::sync::mpsc::UnboundedSender<AppliedEntry>) {
        self.observer = Some(tx);
    }

    /// The applied state, for readers outside openraft.
    pub fn shared(&self) -> SharedState<C> {
        self.shared.clone()
    }

    #[cfg(test)]
    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.db
    }
}

fn poisoned<C: StorageConfig>(verb: ErrorVerb) -> StorageError<C::NodeId> {
    DbError::Poisoned.into_storage::<C>(ErrorSubject::StateMachine, verb)
}

/// Loads the persisted snapshot (if any) and the snapshot counter at startup.
pub(crate) fn load<C: StorageConfig>(db: &Database) -> std::result::Result<(Applied<C>, u64), DbError> {
    let counter: u64 = read_meta(db, KEY_SNAPSHOT_COUNTER)?.unwrap_or(0);
    let applied = match read_snapshot::<C>(db)? {
        Some((meta, data)) => {
            let applied = SnapshotBlob::<C>::decode(&meta, &data)?;
            tracing::debug!(snapshot = %meta, bytes = data.len(), "loaded persisted snapshot");
            applied
        }
        None => Applied::default(),
    };
    Ok((applied, counter))
}

/// Reads the persisted snapshot's metadata and bytes.
fn read_snapshot<C: StorageConfig>(db: &Database) -> std::result::Result<Option<Persisted<C>>, DbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOT)?;
    let meta: Option<Meta<C>> = match table.get(KEY_SNAPSHOT_META)? {
        Some(v) => Some(decode(|| "snapshot metadata".into(), v.value())?),
        None => None,
    };
    let data = table.get(KEY_SNAPSHOT_DATA)?.map(|v| v.value().to_vec());
    match (meta, data) {
        (Some(meta), Some(data)) => Ok(Some((meta, data))),
        (None, None) => Ok(None),
        _ => Err(CorruptError::new("snapshot", "one of its metadata and data rows is missing").into()),
    }
}

/// Persists a snapshot (fsync'd) unless a newer one is already persisted; returns whether it
/// was written, and hands the bytes back.
fn persist_snapshot<C: StorageConfig>(
    db: &Database,
    meta: &Meta<C>,
    data: Vec<u8>,
    counter: Option<u64>,
) -> std::result::Result<(bool, Vec<u8>), DbError> {
    let meta_bytes = encode("snapshot metadata", meta)?;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let written = {
        if let Some(counter) = counter {
            txn.open_table(META)?.insert(KEY_SNAPSHOT_COUNTER, encode("snapshot counter", &counter)?.as_slice())?;
        }
        let mut table = txn.open_table(SNAPSHOT)?;
        let existing: Option<Meta<C>> = match table.get(KEY_SNAPSHOT_META)? {
            // A row that no longer decodes is replaced by this good snapshot.
            Some(v) => decode(|| "snapshot metadata".into(), v.value())
                .inspect_err(|e| tracing::warn!(error = %e, "replacing an unreadable persisted snapshot"))
                .ok(),
            None => None,
        };
        let newer_exists = existing.as_ref().is_some_and(|e| e.last_log_id > meta.last_log_id);
        if !newer_exists {
            table.insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
            table.insert(KEY_SNAPSHOT_DATA, data.as_slice())?;
        }
        !newer_exists
    };
    txn.commit()?;
    Ok((written, data))
}

impl<C: StorageConfig> RaftSnapshotBuilder<C> for SnapshotBuilder<C> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, C> {
        let blob = {
            let applied = self.shared.read().map_err(|_| poisoned::<C>(ErrorVerb::Read))?;
            SnapshotBlob::<C>::V1 {
                state: applied.state.clone(),
                last_applied: applied.last_applied.clone(),
                membership: applied.membership.clone(),
            }
        };
        let SnapshotBlob::V1 { last_applied, membership, .. } = &blob;
        let n = self.snapshot_counter.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{n}", id.leader_id.term, id.index),
            None => format!("none-{n}"),
        };
        let meta = Meta::<C> { last_log_id: last_applied.clone(), last_membership: membership.clone(), snapshot_id };
        let span = tracing::debug_span!("build_snapshot", snapshot = %meta);
        let data = encode("snapshot", &blob)
            .map_err(|e| e.into_storage::<C>(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write))?;
        let db = self.db.clone();
        let persist_meta = meta.clone();
        let (written, data) = blocking(self.inline_io, move || persist_snapshot::<C>(&db, &persist_meta, data, Some(n)))
            .instrument(span.clone())
            .await
            .map_err(|e| e.into_storage::<C>(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write))?;
        span.in_scope(|| tracing::debug!(bytes = data.len(), written, "snapshot built"));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl<C: StorageConfig> RaftStateMachine<C> for StateMachineStore<C> {
    type SnapshotBuilder = SnapshotBuilder<C>;

    async fn applied_state(&mut self) -> Result<(Option<LogId<C::NodeId>>, StoredMembership<C::NodeId, C::Node>), C> {
        let applied = self.shared.read().map_err(|_| poisoned::<C>(ErrorVerb::Read))?;
        Ok((applied.last_applied.clone(), applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, C>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.shared.write().map_err(|_| poisoned::<C>(ErrorVerb::Write))?;
        let mut responses = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id.clone());
            let response = match entry.payload {
                EntryPayload::Blank => CommandResult::Ok,
                EntryPayload::Normal(req) => {
                    let response = applied.state.apply(&req);
                    if let CommandResult::Refused(refusal) = &response {
                        tracing::debug!(log_id = %entry.log_id, kind = req.cmd.kind(), %refusal, "command refused");
                    }
                    if let Some(tx) = &self.observer {
                        // A closed receiver only means nobody listens any more.
                        let _ = tx.send(AppliedEntry {
                            index: entry.log_id.index,
                            at_ms: req.at_ms,
                            by: req.by,
                            kind: req.cmd.kind(),
                            result: response.clone(),
                        });
                    }
                    response
                }
                EntryPayload::Membership(membership) => {
                    tracing::debug!(log_id = %entry.log_id, %membership, "membership applied");
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    CommandResult::Ok
                }
            };
            responses.push(response);
        }
        tracing::trace!(n = responses.len(), last_applied = ?applied.last_applied, "applied");
        if let Some(l) = &applied.last_applied {
            self.applied_tx.send_replace(l.index);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            shared: self.shared.clone(),
            snapshot_counter: self.snapshot_counter.clone(),
            inline_io: self.inline_io,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, C> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta<C>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), C> {
        let span = tracing::debug_span!("install_snapshot", snapshot = %meta);
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let data = snapshot.into_inner();
        // Decode first: a bad snapshot leaves both the state and the persisted snapshot as
        // they were.
        let new_applied = SnapshotBlob::<C>::decode(meta, &data)
            .map_err(|e| DbError::from(e).into_storage::<C>(subject(), ErrorVerb::Read))?;
        let db = self.db.clone();
        let persist_meta = meta.clone();
        let (written, data) = blocking(self.inline_io, move || persist_snapshot::<C>(&db, &persist_meta, data, None))
            .instrument(span.clone())
            .await
            .map_err(|e| e.into_storage::<C>(subject(), ErrorVerb::Write))?;
        {
            let mut applied = self.shared.write().map_err(|_| poisoned::<C>(ErrorVerb::Write))?;
            *applied = new_applied;
            if let Some(l) = &applied.last_applied {
                self.applied_tx.send_replace(l.index);
            }
        }
        span.in_scope(|| tracing::debug!(bytes = data.len(), written, "snapshot installed"));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<C>>, C> {
        let snapshot = read_snapshot::<C>(&self.db)
            .map_err(|e| e.into_storage::<C>(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(snapshot.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Persists a snapshot directly, as a concurrent build would.
    pub(crate) fn persist<C: StorageConfig>(
        db: &Database,
        meta: &Meta<C>,
        data: Vec<u8>,
    ) -> std::result::Result<(bool, Vec<u8>), DbError> {
        persist_snapshot::<C>(db, meta, data, None)
    }
}
