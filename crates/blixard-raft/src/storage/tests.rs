//! Storage tests: openraft's conformance suite, durability across reopen, log edge cases,
//! corruption and a model-based property test. All on real redb files in temp dirs.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blixard_types::command::NodeInfo;
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request, Role};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    AnyError, CommittedLeaderId, EntryPayload, LogState, Membership, RaftLogReader, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use proptest::prelude::*;
use tempfile::TempDir;

use super::*;
use crate::RaftNode;

openraft::declare_raft_types!(
    /// Same payloads as `TypeConfig`, but `u64` node ids, as openraft's suite requires.
    pub TestConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = RaftNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

type TLog = LogStore<TestConfig>;
type TSm = StateMachineStore<TestConfig>;
type TEntry = openraft::Entry<TestConfig>;
type TLogId = openraft::LogId<u64>;
type Range = (Bound<u64>, Bound<u64>);

fn log_id(term: u64, index: u64) -> TLogId {
    TLogId::new(CommittedLeaderId::new(term, 0), index)
}

fn blank(term: u64, index: u64) -> TEntry {
    TEntry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

fn normal(term: u64, index: u64, req: Request) -> TEntry {
    TEntry { log_id: log_id(term, index), payload: EntryPayload::Normal(req) }
}

fn membership(term: u64, index: u64, voters: &[u64]) -> TEntry {
    let voters: BTreeSet<u64> = voters.iter().copied().collect();
    TEntry { log_id: log_id(term, index), payload: EntryPayload::Membership(Membership::new(vec![voters], ())) }
}

fn key(n: u8) -> NodeId {
    NodeId([n; 32])
}

fn bootstrap() -> Request {
    Request {
        at_ms: 1,
        by: key(1),
        cmd: Command::Bootstrap { cluster_id: ClusterId([7; 16]), node: key(1), info: NodeInfo::default() },
        id: 0,
    }
}

fn ticket(i: u8) -> Request {
    Request {
        at_ms: 2,
        by: key(1),
        cmd: Command::CreateTicket { secret_hash: [i; 32], role: Role::Voter, expires_at_ms: 10_000 },
        id: 0,
    }
}

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("raft.redb")
}

fn open_test(path: &Path) -> (TLog, TSm) {
    open_with::<TestConfig>(path).unwrap()
}

fn open_mode(path: &Path, inline_io: bool) -> (TLog, TSm) {
    open_with_options::<TestConfig>(path, OpenOptions::default().inline_io(inline_io)).unwrap()
}

/// What a group-commit callback saw: its result, and whether its entries were then in the
/// database (committed, not merely pending).
type Flushed = (std::io::Result<()>, bool);

/// A group-committed append whose callback is not awaited: returns where it reports.
fn enqueue(log: &mut TLog, entries: Vec<TEntry>) -> mpsc::Receiver<Flushed> {
    let (tx, rx) = mpsc::channel();
    let db = log.db().clone();
    let idx = indexes(&entries);
    let rows = entries.into_iter().map(|e| (e.log_id, encode("log entry", &e).unwrap())).collect();
    let done = Box::new(move |result: std::io::Result<()>| {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(LOG).unwrap();
        let on_disk = idx.iter().all(|&i| table.get(i).unwrap().is_some());
        let _ = tx.send((result, on_disk));
    });
    log.enqueue(rows, done).unwrap();
    rx
}

fn flushed(rx: &mpsc::Receiver<Flushed>) -> Flushed {
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

/// Log indexes stored in the database itself (not the pending buffer).
fn db_indexes(db: &redb::Database) -> Vec<u64> {
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(LOG).unwrap();
    table.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
}

async fn all_entries(log: &mut TLog) -> Vec<TEntry> {
    log.try_get_log_entries(..).await.unwrap()
}

fn indexes(entries: &[TEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

/// Writes raw bytes into a table row, bypassing the store.
fn poke(db: &redb::Database, f: impl FnOnce(&redb::WriteTransaction)) {
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

fn error_text(e: &StorageError<u64>) -> String {
    e.to_string()
}

// ---- 1. openraft's conformance suite ----

struct RedbStoreBuilder {
    inline_io: bool,
}

impl StoreBuilder<TestConfig, TLog, TSm, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, TLog, TSm), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let options = OpenOptions::default().inline_io(self.inline_io);
        let (log, sm) = open_with_options::<TestConfig>(&db_path(&dir), options)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn storage_passes_openraft_suite_with_group_commit() {
    // The suite makes its own tokio runtime per case, so this is a plain #[test].
    Suite::test_all(RedbStoreBuilder { inline_io: false }).unwrap();
}

#[test]
fn storage_passes_openraft_suite_with_inline_io() {
    Suite::test_all(RedbStoreBuilder { inline_io: true }).unwrap();
}

// ---- 1b. group commit ----

#[tokio::test]
async fn storage_group_commit_batches_appends_and_reports_only_durable_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    const N: u64 = 100;
    {
        let (mut log, _sm) = open_test(&path);
        // The flusher is held: every append queues up behind it.
        let resume = log.pause_flusher();
        let rxs: Vec<_> = (1..=N).map(|i| enqueue(&mut log, vec![blank(1, i)])).collect();
        assert!(db_indexes(log.db()).is_empty(), "nothing is written while the flusher is held");
        assert!(rxs.iter().all(|rx| rx.try_recv().is_err()), "no append is reported before it is written");
        assert_eq!(indexes(&all_entries(&mut log).await), (1..=N).collect::<Vec<_>>());
        resume();
        for rx in &rxs {
            let (result, on_disk) = flushed(rx);
            result.unwrap();
            assert!(on_disk, "a callback fired before its entries were committed");
        }
        assert!((1..=2).contains(&log.flush_commits()), "{} commits for {N} appends", log.flush_commits());

        // Free-running: appends far outpace fsyncs, so they still share commits.
        let before = log.flush_commits();
        let rxs: Vec<_> = (N + 1..=5 * N).map(|i| enqueue(&mut log, vec![blank(1, i)])).collect();
        for rx in &rxs {
            let (result, on_disk) = flushed(rx);
            result.unwrap();
            assert!(on_disk);
        }
        let commits = log.flush_commits() - before;
        assert!(commits < 2 * N, "{commits} commits for {} appends", 4 * N);
        println!("group commit: {} appends in {commits} fsync'd commits", 4 * N);
    }
    // Everything reported is on disk after a reopen.
    let (mut log, _sm) = open_test(&path);
    assert_eq!(indexes(&all_entries(&mut log).await), (1..=5 * N).collect::<Vec<_>>());
}

#[tokio::test]
async fn storage_appended_entries_are_readable_before_they_are_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open_test(&db_path(&dir));
    log.blocking_append((1..=3).map(|i| blank(1, i))).await.unwrap();
    let mut reader = log.get_log_reader().await;
    let resume = log.pause_flusher();
    let rx = enqueue(&mut log, vec![normal(1, 4, ticket(4)), blank(1, 5)]);
    assert_eq!(db_indexes(log.db()), vec![1, 2, 3]);
    assert!(rx.try_recv().is_err());
    // Visible to the store, to a reader made before, and in the log state.
    assert_eq!(indexes(&all_entries(&mut log).await), vec![1, 2, 3, 4, 5]);
    assert_eq!(reader.try_get_log_entries(4..).await.unwrap(), vec![normal(1, 4, ticket(4)), blank(1, 5)]);
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 5)));
    // Pending entries win over the database for the same index (a truncated, re-appended
    // suffix waiting for its flush).
    resume();
    assert!(flushed(&rx).1);
    log.truncate(log_id(1, 5)).await.unwrap();
    let resume = log.pause_flusher();
    let rx = enqueue(&mut log, vec![blank(2, 5)]);
    assert_eq!(reader.try_get_log_entries(5..=5).await.unwrap(), vec![blank(2, 5)]);
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(2, 5)));
    resume();
    assert!(flushed(&rx).1);
    assert_eq!(reader.try_get_log_entries(5..).await.unwrap(), vec![blank(2, 5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_truncate_while_flushing_never_brings_entries_back() {
    for round in 0..30u32 {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            let (mut log, _sm) = open_test(&path);
            log.blocking_append((1..=5).map(|i| blank(1, i))).await.unwrap();
            // A reader checking for holes all along.
            let mut reader = log.get_log_reader().await;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop2 = stop.clone();
            let watcher = tokio::spawn(async move {
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = indexes(&reader.try_get_log_entries(..).await.unwrap());
                    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "hole in {got:?}");
                    assert_eq!(got.first(), Some(&1));
                    tokio::task::yield_now().await;
                }
            });
            let rx_old = enqueue(&mut log, (6..=10).map(|i| blank(1, i)).collect());
            // Let the flusher get nowhere, part way, or through its commit.
            match round % 3 {
                0 => {}
                1 => std::thread::yield_now(),
                _ => std::thread::sleep(Duration::from_micros(u64::from(round) * 50)),
            }
            log.truncate(log_id(1, 8)).await.unwrap();
            assert!(db_indexes(log.db()).iter().all(|&i| i < 8), "round {round}");
            assert_eq!(indexes(&all_entries(&mut log).await), (1..=7).collect::<Vec<_>>());
            // The queued callback still fires; what it flushed excludes the truncated entries.
            flushed(&rx_old).0.unwrap();
            assert_eq!(db_indexes(log.db()), (1..=7).collect::<Vec<_>>(), "round {round}");
            let rx_new = enqueue(&mut log, vec![blank(2, 8), blank(2, 9)]);
            assert!(flushed(&rx_new).1);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            watcher.await.unwrap();
        }
        let (mut log, _sm) = open_test(&path);
        let got: Vec<TLogId> = all_entries(&mut log).await.iter().map(|e| e.log_id).collect();
        let want: Vec<TLogId> = (1..=7).map(|i| log_id(1, i)).chain([log_id(2, 8), log_id(2, 9)]).collect();
        assert_eq!(got, want, "round {round}");
    }
}

// ---- 2. durability across reopen ----

#[tokio::test]
async fn storage_log_vote_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let entries = vec![
        membership(1, 0, &[1, 2, 3]),
        blank(1, 1),
        normal(1, 2, bootstrap()),
        normal(2, 3, ticket(1)),
        blank(2, 4),
    ];
    let vote = Vote::new_committed(2, 1);
    {
        let (mut log, _sm) = open_test(&path);
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(Some(log_id(2, 3))).await.unwrap();
        log.save_vote(&vote).await.unwrap();
    }
    let (mut log, sm) = open_test(&path);
    assert_eq!(all_entries(&mut log).await, entries);
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 3)));
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState { last_purged_log_id: None, last_log_id: Some(log_id(2, 4)) }
    );
    // No snapshot yet: the state machine starts empty, openraft re-applies the log.
    assert_eq!(sm.shared().read().unwrap().last_applied, None);

    // save_committed is not fsync'd, but a clean close makes it durable.
    log.save_committed(Some(log_id(2, 4))).await.unwrap();
    drop((log, sm));
    let (mut log, _sm) = open_test(&path);
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 4)));
}

#[tokio::test]
async fn storage_snapshot_and_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = vec![
        membership(1, 1, &[1]),
        normal(1, 2, bootstrap()),
        normal(1, 3, ticket(1)),
        normal(1, 4, ticket(2)),
        blank(2, 5),
    ];
    let (built, state_at_5) = {
        let (mut log, mut sm) = open_test(&path);
        log.blocking_append(first.clone()).await.unwrap();
        let replies = sm.apply(first.clone()).await.unwrap();
        assert_eq!(replies, vec![CommandResult::Ok; 5]);
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(2, 5)));
        assert!(built.meta.snapshot_id.starts_with("2-5-"), "{}", built.meta.snapshot_id);
        log.purge(log_id(1, 3)).await.unwrap();
        // Entries after the snapshot: in the log, applied in memory only.
        let later = vec![normal(2, 6, ticket(3)), blank(2, 7)];
        log.blocking_append(later.clone()).await.unwrap();
        sm.apply(later).await.unwrap();
        log.save_committed(Some(log_id(2, 7))).await.unwrap();
        let state_at_5 = {
            let applied = sm.shared();
            let applied = applied.read().unwrap();
            assert_eq!(applied.state.tickets.len(), 3);
            let mut s = applied.state.clone();
            s.tickets.remove(&[3; 32]);
            s
        };
        (built, state_at_5)
    };

    let (mut log, mut sm) = open_test(&path);
    {
        let applied = sm.shared();
        let applied = applied.read().unwrap();
        assert_eq!(applied.state, state_at_5, "the state is loaded from the snapshot");
        assert_eq!(applied.last_applied, Some(log_id(2, 5)));
        assert_eq!(applied.membership, built.meta.last_membership);
    }
    let (applied, mem) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 5)));
    assert_eq!(mem, StoredMembership::new(Some(log_id(1, 1)), Membership::new(vec![BTreeSet::from([1])], ())));
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);
    assert_eq!(current.snapshot.get_ref(), built.snapshot.get_ref());
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState { last_purged_log_id: Some(log_id(1, 3)), last_log_id: Some(log_id(2, 7)) }
    );
    assert_eq!(indexes(&all_entries(&mut log).await), vec![4, 5, 6, 7]);
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 7)));
    // The snapshot counter survives: a new snapshot gets a new id.
    let again = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_ne!(again.meta.snapshot_id, built.meta.snapshot_id);
}

// ---- 3. truncate, purge, ranges ----

#[tokio::test]
async fn storage_truncate_removes_the_conflicting_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open_test(&db_path(&dir));
    log.blocking_append((1..=10).map(|i| blank(1, i))).await.unwrap();
    log.truncate(log_id(1, 6)).await.unwrap();
    assert_eq!(indexes(&all_entries(&mut log).await), vec![1, 2, 3, 4, 5]);
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 5)));
    // The new leader's entries replace the truncated ones.
    log.blocking_append([blank(2, 6), normal(2, 7, ticket(1))]).await.unwrap();
    let entries = all_entries(&mut log).await;
    assert_eq!(indexes(&entries), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(entries[5].log_id, log_id(2, 6));
    // Truncating past the end is a no-op; truncating everything empties the log.
    log.truncate(log_id(2, 100)).await.unwrap();
    assert_eq!(all_entries(&mut log).await.len(), 7);
    log.truncate(log_id(0, 0)).await.unwrap();
    assert!(all_entries(&mut log).await.is_empty());
    assert_eq!(log.get_log_state().await.unwrap(), LogState { last_purged_log_id: None, last_log_id: None });
}

#[tokio::test]
async fn storage_purge_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open_test(&db_path(&dir));
    log.blocking_append((0..=10).map(|i| blank(1, i))).await.unwrap();
    log.purge(log_id(1, 3)).await.unwrap();
    assert_eq!(indexes(&all_entries(&mut log).await), (4..=10).collect::<Vec<_>>());
    // A purge never moves backwards.
    log.purge(log_id(1, 2)).await.unwrap();
    assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(all_entries(&mut log).await.len(), 7);
    // Purging past the end (after installing a snapshot) empties the log; the last log id is
    // then the purged one and appending continues after it.
    log.purge(log_id(3, 20)).await.unwrap();
    assert!(all_entries(&mut log).await.is_empty());
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState { last_purged_log_id: Some(log_id(3, 20)), last_log_id: Some(log_id(3, 20)) }
    );
    log.blocking_append([blank(3, 21)]).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState { last_purged_log_id: Some(log_id(3, 20)), last_log_id: Some(log_id(3, 21)) }
    );
}

#[tokio::test]
async fn storage_empty_and_odd_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open_test(&db_path(&dir));
    assert_eq!(log.get_log_state().await.unwrap(), LogState { last_purged_log_id: None, last_log_id: None });
    assert!(all_entries(&mut log).await.is_empty());
    log.blocking_append(Vec::<TEntry>::new()).await.unwrap();
    log.blocking_append((1..=5).map(|i| blank(1, i))).await.unwrap();
    let mut reader = log.get_log_reader().await;
    #[allow(clippy::reversed_empty_ranges)]
    let empty: Vec<Range> = vec![
        (Bound::Included(3), Bound::Excluded(3)),
        (Bound::Included(4), Bound::Excluded(2)),
        (Bound::Included(4), Bound::Included(2)),
        (Bound::Excluded(5), Bound::Unbounded),
        (Bound::Unbounded, Bound::Included(0)),
        (Bound::Unbounded, Bound::Excluded(0)),
        (Bound::Excluded(u64::MAX), Bound::Unbounded),
        (Bound::Included(6), Bound::Included(u64::MAX)),
        (Bound::Excluded(2), Bound::Excluded(3)),
    ];
    for range in empty {
        assert!(reader.try_get_log_entries(range).await.unwrap().is_empty(), "{range:?}");
    }
    let some: Vec<(Range, Vec<u64>)> = vec![
        ((Bound::Included(2), Bound::Included(3)), vec![2, 3]),
        ((Bound::Excluded(1), Bound::Included(2)), vec![2]),
        ((Bound::Unbounded, Bound::Unbounded), vec![1, 2, 3, 4, 5]),
        ((Bound::Included(0), Bound::Excluded(u64::MAX)), vec![1, 2, 3, 4, 5]),
        ((Bound::Included(4), Bound::Excluded(100)), vec![4, 5]),
    ];
    for (range, want) in some {
        assert_eq!(indexes(&reader.try_get_log_entries(range).await.unwrap()), want, "{range:?}");
    }
    assert_eq!(indexes(&log.limited_get_log_entries(2, 4).await.unwrap()), vec![2, 3]);
}

// ---- state machine ----

#[tokio::test]
async fn storage_apply_returns_state_machine_results() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open_test(&db_path(&dir));
    let shared = sm.shared();
    let replies = sm
        .apply([
            normal(1, 1, ticket(1)),
            normal(1, 2, bootstrap()),
            blank(1, 3),
            normal(1, 4, bootstrap()),
            membership(1, 5, &[1, 2]),
            normal(1, 6, ticket(1)),
            normal(1, 7, ticket(1)),
        ])
        .await
        .unwrap();
    use blixard_types::command::Refusal;
    assert_eq!(
        replies,
        vec![
            CommandResult::Refused(Refusal::NotBootstrapped),
            CommandResult::Ok,
            CommandResult::Ok,
            CommandResult::Refused(Refusal::AlreadyBootstrapped),
            CommandResult::Ok,
            CommandResult::Ok,
            CommandResult::Refused(Refusal::DuplicateTicket),
        ]
    );
    let applied = shared.read().unwrap();
    assert_eq!(applied.last_applied, Some(log_id(1, 7)));
    assert_eq!(applied.membership.log_id(), &Some(log_id(1, 5)));
    assert_eq!(applied.state.cluster_id, Some(ClusterId([7; 16])));
    assert_eq!(applied.state.tickets.len(), 1);
}

#[tokio::test]
async fn storage_install_snapshot_replaces_state_and_persists() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (_l_log, mut leader) = open_test(&db_path(&leader_dir));
    leader.apply([membership(1, 1, &[1]), normal(1, 2, bootstrap()), normal(1, 3, ticket(9))]).await.unwrap();
    let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    {
        let (_f_log, mut follower) = open_test(&db_path(&follower_dir));
        follower.apply([blank(1, 1)]).await.unwrap();
        follower.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
        assert_eq!(follower.shared().read().unwrap().state, leader.shared().read().unwrap().state);
        assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(1, 3)));
    }
    let (_f_log, mut follower) = open_test(&db_path(&follower_dir));
    assert_eq!(follower.shared().read().unwrap().state, leader.shared().read().unwrap().state);
    assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);

    // A newer snapshot is not overwritten by an older one built concurrently.
    let older = {
        let mut m = snap.meta.clone();
        m.last_log_id = Some(log_id(1, 1));
        m
    };
    let (written, _) =
        super::state_machine::tests_support::persist::<TestConfig>(follower.db(), &older, vec![1, 2, 3]).unwrap();
    assert!(!written);
    assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
}

#[tokio::test]
async fn storage_install_snapshot_rejects_garbage_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open_test(&db_path(&dir));
    sm.apply([membership(1, 1, &[1]), normal(1, 2, bootstrap())]).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let before = sm.shared().read().unwrap().clone();

    let mut meta = snap.meta.clone();
    meta.last_log_id = Some(log_id(5, 50));
    meta.snapshot_id = "5-50-1".into();
    let err = sm.install_snapshot(&meta, Box::new(Cursor::new(vec![0xff; 40]))).await.unwrap_err();
    assert!(error_text(&err).contains("corrupt snapshot 5-50-1"), "{err}");
    // Valid bytes that do not match their metadata are refused too.
    let err = sm.install_snapshot(&meta, snap.snapshot.clone()).await.unwrap_err();
    assert!(error_text(&err).contains("does not match its metadata"), "{err}");

    let after = sm.shared().read().unwrap().clone();
    assert_eq!(after.state, before.state);
    assert_eq!(after.last_applied, before.last_applied);
    assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
}

// ---- 4. corruption ----

#[tokio::test]
async fn storage_corrupt_log_row_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open_test(&db_path(&dir));
    log.blocking_append((1..=5).map(|i| blank(1, i))).await.unwrap();
    poke(log.db(), |txn| {
        txn.open_table(LOG).unwrap().insert(3, [0xff_u8, 0xff, 0xff, 0xff, 0xff, 0xff].as_slice()).unwrap();
    });
    let err = log.try_get_log_entries(..).await.unwrap_err();
    assert!(error_text(&err).contains("corrupt log entry at index 3"), "{err}");
    assert!(error_text(&err).contains("Read"), "{err}");
    // Rows around it still read.
    assert_eq!(indexes(&log.try_get_log_entries(1..3).await.unwrap()), vec![1, 2]);
    assert_eq!(indexes(&log.try_get_log_entries(4..).await.unwrap()), vec![4, 5]);

    // A valid entry stored under the wrong index is corrupt too; get_log_state reads the last.
    let misplaced = postcard::to_allocvec(&blank(1, 2)).unwrap();
    poke(log.db(), |txn| {
        txn.open_table(LOG).unwrap().insert(5, misplaced.as_slice()).unwrap();
    });
    let err = log.get_log_state().await.unwrap_err();
    assert!(error_text(&err).contains("corrupt log entry at index 5: it holds the entry of index 2"), "{err}");

    // A truncated row.
    let mut short = postcard::to_allocvec(&normal(1, 4, ticket(1))).unwrap();
    short.truncate(short.len() / 2);
    poke(log.db(), |txn| {
        txn.open_table(LOG).unwrap().insert(4, short.as_slice()).unwrap();
    });
    assert!(log.try_get_log_entries(4..5).await.is_err());
}

#[tokio::test]
async fn storage_corrupt_vote_and_meta_rows_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open_test(&db_path(&dir));
    log.blocking_append((1..=3).map(|i| blank(1, i))).await.unwrap();
    poke(log.db(), |txn| {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert(KEY_VOTE, [0xff_u8; 3].as_slice()).unwrap();
        meta.insert(KEY_COMMITTED, [0x01_u8].as_slice()).unwrap();
        meta.insert(KEY_LAST_PURGED, [0x80_u8].as_slice()).unwrap();
    });
    let err = log.read_vote().await.unwrap_err();
    assert!(error_text(&err).contains("corrupt vote record"), "{err}");
    assert!(log.read_committed().await.is_err());
    let err = log.get_log_state().await.unwrap_err();
    assert!(error_text(&err).contains("corrupt last purged log id"), "{err}");
    assert!(log.purge(log_id(1, 1)).await.is_err());
}

#[tokio::test]
async fn storage_corrupt_snapshot_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let (_log, mut sm) = open_test(&path);
        sm.apply([membership(1, 1, &[1]), normal(1, 2, bootstrap())]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        poke(sm.db(), |txn| {
            txn.open_table(SNAPSHOT).unwrap().insert(KEY_SNAPSHOT_META, [0xde_u8, 0xad].as_slice()).unwrap();
        });
        let err = sm.get_current_snapshot().await.unwrap_err();
        assert!(error_text(&err).contains("corrupt snapshot metadata"), "{err}");
    }
    let err = open_with::<TestConfig>(&path).unwrap_err();
    assert!(matches!(&err, OpenError::Corrupt { source, .. } if source.what() == "snapshot metadata"), "{err:?}");

    // Good metadata, garbage data: found at open.
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let (_log, mut sm) = open_test(&path);
        sm.apply([membership(1, 1, &[1]), normal(1, 2, bootstrap())]).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let mut data = snap.snapshot.into_inner();
        data.truncate(data.len() - 3);
        poke(sm.db(), |txn| {
            txn.open_table(SNAPSHOT).unwrap().insert(KEY_SNAPSHOT_DATA, data.as_slice()).unwrap();
        });
    }
    let err = open_with::<TestConfig>(&path).unwrap_err();
    assert!(matches!(&err, OpenError::Corrupt { source, .. } if source.what().starts_with("snapshot 1-2-")), "{err:?}");

    // A missing half is corrupt as well.
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let (_log, mut sm) = open_test(&path);
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        poke(sm.db(), |txn| {
            txn.open_table(SNAPSHOT).unwrap().remove(KEY_SNAPSHOT_DATA).unwrap();
        });
        assert!(sm.get_current_snapshot().await.is_err());
    }
    assert!(matches!(open_with::<TestConfig>(&path), Err(OpenError::Corrupt { .. })));
}

#[test]
fn storage_refuses_unknown_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let (log, _sm) = open_test(&path);
        poke(log.db(), |txn| {
            txn.open_table(META)
                .unwrap()
                .insert(KEY_SCHEMA, postcard::to_allocvec(&99u32).unwrap().as_slice())
                .unwrap();
        });
    }
    let err = open_with::<TestConfig>(&path).unwrap_err();
    assert!(matches!(err, OpenError::UnsupportedVersion { found: 99, supported: SCHEMA_VERSION, .. }), "{err:?}");
}

#[test]
fn storage_open_reports_unopenable_paths() {
    let dir = tempfile::tempdir().unwrap();
    let err = open(&dir.path().join("missing-dir").join("raft.redb")).unwrap_err();
    assert!(matches!(err, OpenError::Database { .. }), "{err:?}");
    assert!(err.to_string().contains("missing-dir"), "{err}");
}

#[test]
fn storage_default_config_is_valid() {
    let config = default_config();
    // Several heartbeats fit in the shortest election timeout, so a healthy leader is never
    // deposed by one late heartbeat ...
    assert!(config.heartbeat_interval * 2 < config.election_timeout_min);
    // ... and the worst case before a new leader stands (the old lease, then the 2 x max
    // wait of a node with a shorter log) stays within the 2 s failover budget.
    assert!(config.election_timeout_max * 3 < 2000);
    assert_eq!(config.purge_batch_size, 256);
    assert!(config.validate().is_ok());
}

// ---- the production TypeConfig, and the cost of one fsync'd append ----

#[tokio::test]
async fn storage_append_latency_with_type_config() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(&db_path(&dir)).unwrap();
    let leader = NodeId([1; 32]);
    let entry = |i: u64| crate::Entry {
        log_id: crate::LogId::new(CommittedLeaderId::new(1, leader), i),
        payload: EntryPayload::Normal(ticket((i % 251) as u8)),
    };
    // Warm up (fresh memory is slow on this VM).
    for i in 1..=100 {
        log.blocking_append([entry(i)]).await.unwrap();
    }
    const N: u64 = 1_000;
    let start = Instant::now();
    for i in 101..101 + N {
        log.blocking_append([entry(i)]).await.unwrap();
    }
    let per = start.elapsed() / N as u32;
    println!("fsync'd append of one small entry: {} µs mean over {N}", per.as_micros());
    let mut reader = log.get_log_reader().await;
    let got = reader.try_get_log_entries(500..=500).await.unwrap();
    assert_eq!(got, vec![entry(500)]);
}

// ---- 5. model-based property test ----

#[derive(Debug, Clone)]
enum Op {
    /// `wait`: await the flush (always, with inline I/O); otherwise leave the callback queued.
    Append { n: u8, new_term: bool, wait: bool },
    Truncate(u16),
    Purge(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..6, any::<bool>(), any::<bool>()).prop_map(|(n, new_term, wait)| Op::Append { n, new_term, wait }),
        2 => any::<u16>().prop_map(Op::Truncate),
        2 => any::<u16>().prop_map(Op::Purge),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    log: BTreeMap<u64, TLogId>,
    last_purged: Option<TLogId>,
    term: u64,
}

impl Model {
    fn next_index(&self) -> u64 {
        match (self.log.keys().next_back(), &self.last_purged) {
            (Some(&last), _) => last + 1,
            (None, Some(p)) => p.index + 1,
            (None, None) => 0,
        }
    }

    /// Lowest index openraft may truncate or purge from: above what is purged.
    fn floor(&self) -> u64 {
        self.last_purged.map_or(0, |p| p.index + 1)
    }

    fn state(&self) -> LogState<TestConfig> {
        LogState {
            last_purged_log_id: self.last_purged,
            last_log_id: self.log.values().next_back().copied().or(self.last_purged),
        }
    }
}

async fn check(log: &mut TLog, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.get_log_state().await.unwrap(), model.state());
    let entries = all_entries(log).await;
    let got: Vec<TLogId> = entries.iter().map(|e| e.log_id).collect();
    let want: Vec<TLogId> = model.log.values().copied().collect();
    prop_assert_eq!(&got, &want);
    // Contiguous, starting right after the purged prefix.
    if let Some(first) = got.first() {
        prop_assert_eq!(first.index, model.floor());
    }
    prop_assert!(got.windows(2).all(|w| w[1].index == w[0].index + 1), "hole in {:?}", got);
    // A middle sub-range matches too.
    if got.len() > 2 {
        let (a, b) = (got[1].index, got[got.len() - 1].index);
        let sub = log.try_get_log_entries(a..b).await.unwrap();
        prop_assert_eq!(sub.len() as u64, b - a);
    }
    Ok(())
}

/// Every queued callback fired, successfully.
fn all_flushed(queued: &mut Vec<mpsc::Receiver<Flushed>>) -> Result<(), TestCaseError> {
    for rx in queued.drain(..) {
        let (result, _) = flushed(&rx);
        prop_assert!(result.is_ok(), "{:?}", result);
    }
    Ok(())
}

async fn run_ops(ops: Vec<Op>, inline_io: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (mut log, mut sm) = open_mode(&path, inline_io);
    let mut model = Model { term: 1, ..Model::default() };
    let mut queued = Vec::new();
    for op in ops {
        match op {
            Op::Append { n, new_term, wait } => {
                if new_term {
                    model.term += 1;
                }
                let start = model.next_index();
                let entries: Vec<TEntry> = (start..start + u64::from(n))
                    .map(|i| if i % 2 == 0 { blank(model.term, i) } else { normal(model.term, i, ticket(i as u8)) })
                    .collect();
                for e in &entries {
                    model.log.insert(e.log_id.index, e.log_id);
                }
                if wait || inline_io {
                    log.blocking_append(entries).await.unwrap();
                } else {
                    queued.push(enqueue(&mut log, entries));
                }
            }
            Op::Truncate(pick) => {
                let (lo, hi) = (model.floor(), model.next_index());
                let at = lo + u64::from(pick) % (hi - lo + 1);
                model.log.retain(|&i, _| i < at);
                log.truncate(log_id(model.term, at)).await.unwrap();
            }
            Op::Purge(pick) => {
                // Up to two past the end, as after installing a snapshot.
                let (lo, hi) = (model.floor(), model.next_index() + 1);
                let at = lo + u64::from(pick) % (hi - lo + 1);
                let id = model.log.get(&at).copied().unwrap_or_else(|| log_id(model.term, at));
                model.log.retain(|&i, _| i > at);
                model.last_purged = Some(id);
                log.purge(id).await.unwrap();
            }
            Op::Reopen => {
                // Dropping the store flushes what is queued, and reports it.
                drop((log, sm));
                all_flushed(&mut queued)?;
                (log, sm) = open_mode(&path, inline_io);
            }
        }
        check(&mut log, &model).await?;
    }
    drop((log, sm));
    all_flushed(&mut queued)?;
    // What the model holds is what is on disk.
    let (mut log, _sm) = open_mode(&path, inline_io);
    check(&mut log, &model).await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn storage_log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops, false))?;
    }

    #[test]
    fn storage_log_matches_model_with_inline_io(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops, true))?;
    }
}
