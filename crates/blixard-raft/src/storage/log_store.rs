//! The Raft log and vote ([`RaftLogStorage`]) on redb, with group commit.
//!
//! # Group commit
//!
//! Unless [`super::OpenOptions::inline_io`] is set, `append` does no disk I/O: it encodes
//! the entries, inserts them into `pending` (an in-memory map shared by the store and every
//! [`LogReader`]), sends openraft's [`LogFlushed`] callback to the flusher thread
//! (`raft-log-flush`) and returns. The flusher blocks for one callback, drains every other
//! queued callback, then writes *all* pending entries in one redb transaction committed with
//! [`Durability::Immediate`], removes from `pending` exactly the entries it wrote (same index
//! and same log id) and only then fires the drained callbacks. Every drained callback's
//! entries were inserted into `pending` before the callback was sent, so they are in that
//! commit (or were truncated/purged meanwhile, see below). Entries appended after the drain
//! may ride along early; their callbacks fire after the next batch, which may write nothing.
//! On a failed commit each drained callback gets the error (openraft treats it as a storage
//! failure) and the entries stay pending. The thread ends when the store is dropped: it
//! flushes what is queued first, and `Drop` joins it so the file is closed afterwards.
//!
//! Readers merge `pending` over the database (pending wins for an index). They copy the
//! pending rows and begin their redb read transaction while holding the `pending` lock, so
//! a read sees a consistent log: the flusher removes entries from `pending` only after its
//! commit (a reader that still sees them pending has them; one that does not began its read
//! after the commit), and truncate/purge update the database and `pending` under that lock.
//!
//! # Truncate and purge against the flusher
//!
//! `flush_lock` is held by the flusher from taking its snapshot of `pending` until it has
//! committed and removed the written entries from `pending`; `truncate` and `purge` hold it
//! (and then the `pending` lock) around their own fsync'd commit and their update of
//! `pending`. The two critical sections are therefore ordered:
//! - flusher first: the entries it wrote are in the database when truncate/purge runs, and
//!   truncate/purge deletes the rows `>= since` / `<= upto` as usual;
//! - truncate/purge first: the entries it removed from `pending` are no longer there when
//!   the flusher takes its snapshot, so they are never written.
//!
//! Hence once `truncate`/`purge` returns, no removed entry can reach the database, and no
//! truncated entry can come back from the buffer. An entry re-appended at a truncated index
//! (another log id) is a new pending entry: the flusher only removes what it wrote, compared
//! by log id. Lock order everywhere: `flush_lock`, then `pending`, then redb's write lock;
//! nothing waits for `pending` or `flush_lock` while holding redb's write lock.
//!
//! The database never has a hole: pending entries always form the contiguous suffix of the
//! log above what is on disk (openraft appends without holes and truncates before
//! overwriting), and each flush writes all of them at once.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

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

type NodeLogId<C> = LogId<<C as openraft::RaftTypeConfig>::NodeId>;

/// Called once the entries of one append are on disk (or could not be written).
pub(crate) type FlushDone = Box<dyn FnOnce(io::Result<()>) + Send + 'static>;

/// An appended entry not yet known to be on disk: its log id and its postcard encoding.
struct PendingEntry<C: StorageConfig> {
    log_id: NodeLogId<C>,
    bytes: Arc<[u8]>,
}

impl<C: StorageConfig> Clone for PendingEntry<C> {
    fn clone(&self) -> Self {
        Self { log_id: self.log_id.clone(), bytes: self.bytes.clone() }
    }
}

/// What the store, its readers and the flusher share.
struct Shared<C: StorageConfig> {
    db: Arc<Database>,
    /// Appended entries not yet written by the flusher, by index.
    pending: Mutex<BTreeMap<u64, PendingEntry<C>>>,
    /// Held by the flusher from its snapshot of `pending` to the end of its commit, and by
    /// truncate/purge around their commit (see the module docs).
    flush_lock: Mutex<()>,
    /// Number of fsync'd commits made by the flusher (batches that wrote something).
    flush_commits: AtomicU64,
}

impl<C: StorageConfig> Shared<C> {
    fn pending(&self) -> std::result::Result<MutexGuard<'_, BTreeMap<u64, PendingEntry<C>>>, DbError> {
        self.pending.lock().map_err(|_| DbError::LogPoisoned)
    }

    fn flush_lock(&self) -> std::result::Result<MutexGuard<'_, ()>, DbError> {
        self.flush_lock.lock().map_err(|_| DbError::LogPoisoned)
    }

    /// Writes every pending entry in one fsync'd commit; returns how many were written.
    fn flush_pending(&self) -> std::result::Result<usize, DbError> {
        let _flushing = self.flush_lock()?;
        let batch: Vec<(u64, PendingEntry<C>)> = self.pending()?.iter().map(|(&i, e)| (i, e.clone())).collect();
        if batch.is_empty() {
            return Ok(0);
        }
        write(&self.db, Durability::Immediate, |txn| {
            let mut log = txn.open_table(LOG)?;
            for (index, entry) in &batch {
                log.insert(*index, &*entry.bytes)?;
            }
            Ok(())
        })?;
        self.flush_commits.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.pending()?;
        for (index, written) in &batch {
            // An entry truncated and re-appended meanwhile has another log id: keep it.
            if pending.get(index).is_some_and(|p| p.log_id == written.log_id) {
                pending.remove(index);
            }
        }
        Ok(batch.len())
    }
}

/// The flusher thread's loop: one fsync'd commit for every group of queued callbacks.
fn run_flusher<C: StorageConfig>(shared: Arc<Shared<C>>, rx: mpsc::Receiver<FlushDone>) {
    while let Ok(first) = rx.recv() {
        let mut done = vec![first];
        done.extend(rx.try_iter());
        match shared.flush_pending() {
            Ok(n) => {
                tracing::trace!(entries = n, appends = done.len(), "flushed raft log entries");
                for d in done {
                    d(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, appends = done.len(), "flushing the raft log failed");
                let text = e.to_string();
                for d in done {
                    d(Err(io::Error::other(text.clone())));
                }
            }
        }
    }
    tracing::debug!("raft log flusher stopped");
}

/// The running flusher thread and the sending half of its queue.
struct Flusher {
    tx: Option<mpsc::Sender<FlushDone>>,
    thread: Option<JoinHandle<()>>,
}

/// The Raft log, vote and committed log id, stored in the shared redb file.
///
/// Writes are serialized by `&mut self`. Vote, truncate and purge are fsync'd before they
/// return; appends are group-committed by a flusher thread (see the module docs), or
/// fsync'd before `append` returns with [`super::OpenOptions::inline_io`].
pub struct LogStore<C: StorageConfig = TypeConfig> {
    shared: Arc<Shared<C>>,
    /// See [`super::OpenOptions::inline_io`].
    inline_io: bool,
    /// Started by the first group-committed append.
    flusher: Option<Flusher>,
}

/// A read-only handle on the log for openraft's replication tasks: a cheap clone sharing the
/// database and the not-yet-flushed entries.
pub struct LogReader<C: StorageConfig = TypeConfig> {
    shared: Arc<Shared<C>>,
}

impl<C: StorageConfig> LogStore<C> {
    pub(crate) fn new(db: Arc<Database>, inline_io: bool) -> Self {
        let shared = Shared {
            db,
            pending: Mutex::new(BTreeMap::new()),
            flush_lock: Mutex::new(()),
            flush_commits: AtomicU64::new(0),
        };
        Self { shared: Arc::new(shared), inline_io, flusher: None }
    }

    #[cfg(test)]
    pub(crate) fn db(&self) -> &Arc<Database> {
        &self.shared.db
    }

    /// Fsync'd commits made by the flusher so far.
    #[cfg(test)]
    pub(crate) fn flush_commits(&self) -> u64 {
        self.shared.flush_commits.load(Ordering::Relaxed)
    }

    /// Keeps the flusher from writing until the returned function is called (tests only).
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub(crate) fn pause_flusher(&self) -> impl FnOnce() {
        let shared = self.shared.clone();
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _held = shared.flush_lock.lock().unwrap();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        move || {
            drop(release_tx);
            holder.join().unwrap();
        }
    }

    /// The flusher's queue, starting the thread on first use.
    fn flusher_queue(&mut self) -> std::result::Result<&mpsc::Sender<FlushDone>, DbError> {
        if self.flusher.is_none() {
            let (tx, rx) = mpsc::channel::<FlushDone>();
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name("raft-log-flush".into())
                .spawn(move || run_flusher(shared, rx))
                .map_err(|e| DbError::Task(format!("cannot start the raft log flusher: {e}")))?;
            self.flusher = Some(Flusher { tx: Some(tx), thread: Some(thread) });
        }
        self.flusher.as_ref().and_then(|f| f.tx.as_ref()).ok_or(DbError::FlusherGone)
    }

    /// The group-commit append: buffers the encoded entries, queues `done` for the flusher.
    /// Never blocks on disk I/O. On error `done` has already been called with it.
    pub(crate) fn enqueue(
        &mut self,
        rows: Vec<(NodeLogId<C>, Vec<u8>)>,
        done: FlushDone,
    ) -> std::result::Result<(), DbError> {
        let fail = |e: DbError, done: FlushDone| {
            done(Err(io::Error::other(e.to_string())));
            Err(e)
        };
        match self.shared.pending() {
            Ok(mut pending) => {
                for (log_id, bytes) in rows {
                    pending.insert(log_id.index, PendingEntry { log_id, bytes: bytes.into() });
                }
            }
            Err(e) => return fail(e, done),
        }
        let tx = match self.flusher_queue() {
            Ok(tx) => tx,
            Err(e) => return fail(e, done),
        };
        // Sent after the entries are in `pending`: the flusher's next snapshot has them.
        if let Err(mpsc::SendError(done)) = tx.send(done) {
            return fail(DbError::FlusherGone, done);
        }
        Ok(())
    }
}

impl<C: StorageConfig> Drop for LogStore<C> {
    fn drop(&mut self) {
        let Some(mut flusher) = self.flusher.take() else {
            return;
        };
        // Closing the queue lets the flusher write what is still queued, then stop; joining
        // it releases its handle on the database, so the file can be reopened.
        drop(flusher.tx.take());
        if let Some(thread) = flusher.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the raft log flusher thread panicked");
            }
        }
    }
}

impl<C: StorageConfig> Clone for LogReader<C> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<C: StorageConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").field("inline_io", &self.inline_io).finish_non_exhaustive()
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

/// Reads the log entries in `range`: the pending ones merged over the database's.
fn read_entries<C: StorageConfig>(
    shared: &Shared<C>,
    range: impl RangeBounds<u64>,
) -> std::result::Result<Vec<C::Entry>, DbError> {
    let Some((first, last)) = inclusive_range(&range) else {
        return Ok(Vec::new());
    };
    // Copy the pending rows and open the read transaction under one lock: see the module docs.
    let (pending, txn) = {
        let pending = shared.pending()?;
        let rows: BTreeMap<u64, Arc<[u8]>> =
            pending.range(first..=last).map(|(&i, e)| (i, e.bytes.clone())).collect();
        (rows, shared.db.begin_read()?)
    };
    let table = txn.open_table(LOG)?;
    let mut entries = Vec::new();
    if pending.is_empty() {
        for row in table.range(first..=last)? {
            let (k, v) = row?;
            entries.push(decode_entry::<C>(k.value(), v.value())?);
        }
        return Ok(entries);
    }
    let mut merged = BTreeMap::new();
    for row in table.range(first..=last)? {
        let (k, v) = row?;
        let index = k.value();
        if !pending.contains_key(&index) {
            merged.insert(index, decode_entry::<C>(index, v.value())?);
        }
    }
    for (index, bytes) in &pending {
        merged.insert(*index, decode_entry::<C>(*index, bytes)?);
    }
    entries.extend(merged.into_values());
    Ok(entries)
}

// openraft's error type is large; it is what the trait returns anyway.
#[allow(clippy::result_large_err)]
fn read_entries_edge<C: StorageConfig>(
    shared: &Shared<C>,
    range: impl RangeBounds<u64> + Clone + Debug,
) -> Result<Vec<C::Entry>, C> {
    let entries =
        read_entries::<C>(shared, range.clone()).map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Read))?;
    tracing::trace!(?range, n = entries.len(), "read log entries");
    Ok(entries)
}

impl<C: StorageConfig> RaftLogReader<C> for LogReader<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, C> {
        read_entries_edge::<C>(&self.shared, range)
    }
}

impl<C: StorageConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, C> {
        read_entries_edge::<C>(&self.shared, range)
    }
}

fn log_state<C: StorageConfig>(shared: &Shared<C>) -> std::result::Result<LogState<C>, DbError> {
    let (last_pending, txn) = {
        let pending = shared.pending()?;
        let last = pending.iter().next_back().map(|(&i, e)| (i, e.log_id.clone()));
        (last, shared.db.begin_read()?)
    };
    let last_purged_log_id: Option<LogId<C::NodeId>> = {
        let meta = txn.open_table(META)?;
        let v = meta.get(KEY_LAST_PURGED)?;
        match v {
            Some(v) => Some(decode(|| "last purged log id".into(), v.value())?),
            None => None,
        }
    };
    let log = txn.open_table(LOG)?;
    let last_on_disk = log.last()?.map(|(k, v)| (k.value(), v));
    let last = match (last_pending, last_on_disk) {
        // The pending entry wins for the same index.
        (Some((pi, pid)), Some((di, _))) if pi >= di => Some(pid),
        (Some((_, pid)), None) => Some(pid),
        (_, Some((di, v))) => Some(decode_entry::<C>(di, v.value())?.log_id),
        (None, None) => None,
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
        log_state::<C>(&self.shared).map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader { shared: self.shared.clone() }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(vote = %vote))]
    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), C> {
        let map = |e: DbError| e.into_storage::<C>(ErrorSubject::Vote, ErrorVerb::Write);
        let bytes = encode("vote", vote).map_err(map)?;
        let db = self.shared.db.clone();
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
        read_meta(&self.shared.db, KEY_VOTE).map_err(|e| e.into_storage::<C>(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<C::NodeId>>) -> Result<(), C> {
        tracing::trace!(?committed, "save committed");
        let map = |e: DbError| e.into_storage::<C>(ErrorSubject::Store, ErrorVerb::Write);
        let bytes = encode("committed log id", &committed).map_err(map)?;
        let db = self.shared.db.clone();
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
        let committed: Option<Option<LogId<C::NodeId>>> = read_meta(&self.shared.db, KEY_COMMITTED)
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
        if !self.inline_io {
            let _enter = span.enter();
            // Group commit: readable now, durable (and reported) once the flusher commits.
            return self
                .enqueue(rows, Box::new(move |result| callback.log_io_completed(result)))
                .map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Write));
        }
        let db = self.shared.db.clone();
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
        let shared = self.shared.clone();
        let since = log_id.index;
        blocking(self.inline_io, move || {
            // Serialised with the flusher, and atomic for readers: see the module docs.
            let _flush = shared.flush_lock()?;
            let mut pending = shared.pending()?;
            write(&shared.db, Durability::Immediate, |txn| {
                txn.open_table(LOG)?.retain_in(since.., |_, _| false)?;
                Ok(())
            })?;
            pending.split_off(&since);
            Ok(())
        })
        .await
        .map_err(|e| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(upto = %log_id))]
    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), C> {
        let map = |e: DbError| e.into_storage::<C>(ErrorSubject::Logs, ErrorVerb::Delete);
        let bytes = encode("last purged log id", &log_id).map_err(map)?;
        let shared = self.shared.clone();
        blocking(self.inline_io, move || {
            // Serialised with the flusher, and atomic for readers: see the module docs.
            let _flush = shared.flush_lock()?;
            let mut pending = shared.pending()?;
            let purged = write(&shared.db, Durability::Immediate, |txn| {
                let mut meta = txn.open_table(META)?;
                let previous: Option<LogId<C::NodeId>> = match meta.get(KEY_LAST_PURGED)? {
                    Some(v) => Some(decode(|| "last purged log id".into(), v.value())?),
                    None => None,
                };
                // Purging never moves backwards.
                if previous.is_some_and(|p| p.index >= log_id.index) {
                    return Ok(false);
                }
                txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
                meta.insert(KEY_LAST_PURGED, bytes.as_slice())?;
                Ok(true)
            })?;
            if purged {
                // Normally nothing: openraft purges only what a snapshot covers.
                pending.retain(|&i, _| i > log_id.index);
            }
            Ok(())
        })
        .await
        .map_err(map)
    }
}
