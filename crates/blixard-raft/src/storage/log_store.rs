//! The Raft log and vote ([`RaftLogStorage`]) on redb.

use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader, StorageError, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tracing::Instrument;

use super::{
    blocking, decode, encode, read_meta, CorruptError, DbError, StorageConfig, KEY_COMMITTED, KEY_LAST_PURGED,
    KEY_VOTE, LOG, META,
};
use crate::TypeConfig;

type Result<T, C> = std::result::Result<T, StorageError<<C as openraft::RaftTypeConfig>::NodeId>>;

/// The Raft log, vote and committed log id, stored in the shared redb file.
///
/// Writes are serialized by `&mut self` and each one is fsync'd before it returns.
pub struct LogStore<C: StorageConfig = TypeConfig> {
    db: Arc<Database>,
    /// See [`super::OpenOptions::inline_io`].
    inline_io: bool,
    _config: PhantomData<fn() -> C>,
}

/// A read-only handle on the log for openraft's replication tasks: a cheap clone sharing the
/// database.
pub struct LogReader<C: StorageConfig = TypeConfig> {
    db: Arc<Database>,
    _config: PhantomData<fn() -> C>,
}

impl<C: StorageConfig> LogStore<C> {
    pub(crate) fn new(db: Arc<Database>, inline_io: bool) -> Self {
        Self { db, inline_io, _config: PhantomData }
    }

    #[cfg(test)]
    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.db
    }
}

impl<C: StorageConfig> Clone for LogReader<C> {
    fn clone(&self) -> Self {
        Self { db: self.db.clone(), _config: PhantomData }
    }
}

impl<C: StorageConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl<C: StorageConfig> fmt::Debug for LogReader<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogReader").finish_non_exhaustive()
    }
}

/// Normalises any range of indexes to an inclusive `(first, last)`, or `None` if it is empty.
pub(crate) fn inclusive_range(range: &impl RangeBounds<u64>) -> Option<(u64, u64)> {
    let first = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let last = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (first <= last).then_some((first, last))
}

fn decode_entry<C: StorageConfig>(index: u64, bytes: &[u8]) -> std::result::Result<C::Entry, CorruptError> {
    let entry: C::Entry = decode(|| format!("log entry at index {index}"), bytes)?;
    if entry.log_id.index != index {
        return Err(CorruptError::new(
            format!("log entry at index {index}"),
            format_args!("it holds the entry of index {}", entry.log_id.index),
        ));
    }
    Ok(entry)
}

fn read_entries<C: StorageConfig>(
    db: &Database,
    range: impl RangeBounds<u64>,
) -> std::result::Result<Vec<C::Entry>, DbError> {
    let Some((first, last)) = inclusive_range(&range) else {
        return Ok(Vec::new());
    };
    let txn = db.begin_read()?;
    let table = txn.open_table(LOG)?;
    let mut entries = Vec::new();
    for row in table.range(first..=last)? {
        let (k, v) = row?;
        entries.push(decode_entry::<C>(k.value(), v.value())?);
    }
    Ok(entries)
}

// openraft's error type is large; it is what the trait returns anyway.
#[allow(clippy::result_large_err)]
fn read_entries_edge<C: StorageConfig>(
    db: &Database,
    range: impl RangeBounds<u64> + Clone + Debug,
) -> Result<Vec<C::Entry>, C> {
    let entries =
        read_entries::<C>(db, range.clone()).map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Read))?;
    tracing::trace!(?range, n = entries.len(), "read log entries");
    Ok(entries)
}

impl<C: StorageConfig> RaftLogReader<C> for LogReader<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, C> {
        read_entries_edge::<C>(&self.db, range)
    }
}

impl<C: StorageConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, C> {
        read_entries_edge::<C>(&self.db, range)
    }
}

fn log_state<C: StorageConfig>(db: &Database) -> std::result::Result<LogState<C>, DbError> {
    let txn = db.begin_read()?;
    let last_purged_log_id: Option<LogId<C::NodeId>> = {
        let meta = txn.open_table(META)?;
        let v = meta.get(KEY_LAST_PURGED)?;
        match v {
            Some(v) => Some(decode(|| "last purged log id".into(), v.value())?),
            None => None,
        }
    };
    let log = txn.open_table(LOG)?;
    let last = match log.last()? {
        Some((k, v)) => Some(decode_entry::<C>(k.value(), v.value())?.log_id),
        None => None,
    };
    let last_log_id = last.or_else(|| last_purged_log_id.clone());
    Ok(LogState { last_purged_log_id, last_log_id })
}

/// One write transaction, fsync'd on commit unless `durability` says otherwise.
fn write<T>(
    db: &Database,
    durability: Durability,
    f: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<T, DbError>,
) -> std::result::Result<T, DbError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    let out = f(&txn)?;
    txn.commit()?;
    Ok(out)
}

impl<C: StorageConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, C> {
        log_state::<C>(&self.db).map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader { db: self.db.clone(), _config: PhantomData }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(vote = %vote))]
    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), C> {
        let map = |e: DbError| e.into_storage::<C>(ErrorSubject::Vote, ErrorVerb::Write);
        let bytes = encode("vote", vote).map_err(map)?;
        let db = self.db.clone();
        blocking(self.inline_io, move || {
            write(&db, Durability::Immediate, |txn| {
                txn.open_table(META)?.insert(KEY_VOTE, bytes.as_slice())?;
                Ok(())
            })
        })
        .await
        .map_err(map)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, C> {
        read_meta(&self.db, KEY_VOTE).map_err(|e| e.into_storage::<C>(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<C::NodeId>>) -> Result<(), C> {
        tracing::trace!(?committed, "save committed");
        let map = |e: DbError| e.into_storage::<C>(ErrorSubject::Store, ErrorVerb::Write);
        let bytes = encode("committed log id", &committed).map_err(map)?;
        let db = self.db.clone();
        // Not fsync'd: see the module docs. It becomes durable with the next log write.
        blocking(self.inline_io, move || {
            write(&db, Durability::None, |txn| {
                txn.open_table(META)?.insert(KEY_COMMITTED, bytes.as_slice())?;
                Ok(())
            })
        })
        .await
        .map_err(map)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<C::NodeId>>, C> {
        let committed: Option<Option<LogId<C::NodeId>>> = read_meta(&self.db, KEY_COMMITTED)
            .map_err(|e| e.into_storage::<C>(ErrorSubject::Store, ErrorVerb::Read))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), C>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let bytes = encode("log entry", &entry)
                .map_err(|e| e.into_storage::<C>(ErrorSubject::Log(entry.log_id.clone()), ErrorVerb::Write))?;
            rows.push((entry.log_id, bytes));
        }
        let (Some(first), Some(last)) = (rows.first().map(|r| r.0.clone()), rows.last().map(|r| r.0.clone())) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let span = tracing::debug_span!("append", n = rows.len(), first = %first, last = %last);
        let db = self.db.clone();
        let result = blocking(self.inline_io, move || {
            write(&db, Durability::Immediate, |txn| {
                let mut log = txn.open_table(LOG)?;
                for (log_id, bytes) in &rows {
                    log.insert(log_id.index, bytes.as_slice())?;
                }
                Ok(())
            })
        })
        .instrument(span)
        .await;
        match result {
            Ok(()) => {
                // Only now are the entries on disk.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "appending to the raft log failed");
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(since = %log_id))]
    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), C> {
        let db = self.db.clone();
        let since = log_id.index;
        blocking(self.inline_io, move || {
            write(&db, Durability::Immediate, |txn| {
                txn.open_table(LOG)?.retain_in(since.., |_, _| false)?;
                Ok(())
            })
        })
        .await
        .map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(upto = %log_id))]
    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), C> {
        let map = |e: DbError| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Delete);
        let bytes = encode("last purged log id", &log_id).map_err(map)?;
        let db = self.db.clone();
        blocking(self.inline_io, move || {
            write(&db, Durability::Immediate, |txn| {
                let mut meta = txn.open_table(META)?;
                let previous: Option<LogId<C::NodeId>> = match meta.get(KEY_LAST_PURGED)? {
                    Some(v) => Some(decode(|| "last purged log id".into(), v.value())?),
                    None => None,
                };
                // Purging never moves backwards.
                if previous.is_some_and(|p| p.index >= log_id.index) {
                    return Ok(());
                }
                txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
                meta.insert(KEY_LAST_PURGED, bytes.as_slice())?;
                Ok(())
            })
        })
        .await
        .map_err(map)
    }
}
