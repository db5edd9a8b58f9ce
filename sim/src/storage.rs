//! Wrappers around the real redb storage (`blixard_raft::storage`):
//! - [`SimLog`] delays writes on a slow disk, and hosts the deliberately broken variants
//!   ([`Bug`]) that prove the checkers can fail;
//! - [`CheckedSm`] applies entries one at a time through the real state machine and reports
//!   each applied entry and the resulting state to the invariant checkers.
//!
//! Neither re-implements anything: every call ends in the real store.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Duration;

use blixard_raft::storage::{LogReader, LogStore, SharedState, SnapshotBuilder, StateMachineStore};
use blixard_raft::RaftNode;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};

use crate::invariants::log_matching::EntryDigest;
use crate::world::World;
use crate::{Entry, SimConfig};

type Result<T> = std::result::Result<T, StorageError<u64>>;

/// A deliberately broken behaviour, for checking the checkers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bug {
    /// `read_vote` returns nothing: a restarted node forgets whom it voted for in which
    /// term, and may vote twice in one term.
    ForgetVote,
    /// `append` acknowledges entries as flushed without writing them (one append in four).
    AckUnwritten,
    /// The disk reports `fsync` done without making anything durable: a power loss takes
    /// acknowledged writes with it.
    LyingFsync,
    /// Not storage: the executor never fences, so a node cut off from the majority keeps
    /// running VMs the majority places elsewhere.
    NoFence,
}

/// The digest the checkers compare entries by.
pub fn digest(entry: &Entry) -> EntryDigest {
    // Encoding an in-memory entry cannot fail; an empty hash input would still be compared.
    let bytes = postcard::to_allocvec(entry).unwrap_or_default();
    EntryDigest {
        term: entry.log_id.leader_id.term,
        hash: *blake3::hash(&bytes).as_bytes(),
    }
}

/// BLAKE3 of a cluster state's encoding: what replicas are compared by.
pub fn state_hash(state: &blixard_state::ClusterState) -> std::result::Result<[u8; 32], postcard::Error> {
    let bytes = postcard::to_allocvec(state)?;
    Ok(*blake3::hash(&bytes).as_bytes())
}

/// The real log store, behind a slow disk and optionally a [`Bug`].
pub struct SimLog {
    inner: LogStore<SimConfig>,
    node: u64,
    world: Arc<World>,
    bug: Option<Bug>,
    appends: u64,
}

impl SimLog {
    pub fn new(inner: LogStore<SimConfig>, node: u64, world: Arc<World>, bug: Option<Bug>) -> Self {
        Self {
            inner,
            node,
            world,
            bug,
            appends: 0,
        }
    }

    /// Waits out this node's disk latency, if its disk is slow now.
    async fn disk(&self) {
        let delay = {
            let mut w = self.world.lock();
            match w.slow_disk.get(&self.node).copied() {
                Some((lo, hi)) => {
                    w.counters.bump("disk_slow_writes");
                    Some(w.rng.range(lo, hi))
                }
                None => None,
            }
        };
        if let Some(ms) = delay {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

impl RaftLogReader<SimConfig> for SimLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>> {
        self.inner.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<SimConfig> for SimLog {
    type LogReader = LogReader<SimConfig>;

    async fn get_log_state(&mut self) -> Result<LogState<SimConfig>> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.inner.get_log_reader().await
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<()> {
        self.disk().await;
        self.inner.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>> {
        if self.bug == Some(Bug::ForgetVote) {
            return Ok(None);
        }
        self.inner.read_vote().await
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<()> {
        self.inner.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>> {
        self.inner.read_committed().await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<SimConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.disk().await;
        self.appends += 1;
        if self.bug == Some(Bug::AckUnwritten) && self.appends.is_multiple_of(4) {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        self.inner.append(entries, callback).await
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<()> {
        self.disk().await;
        self.inner.truncate(log_id).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<()> {
        self.disk().await;
        self.inner.purge(log_id).await
    }
}

/// The real state machine, reporting what it applies.
pub struct CheckedSm {
    inner: StateMachineStore<SimConfig>,
    shared: SharedState<SimConfig>,
    node: u64,
    world: Arc<World>,
}

impl CheckedSm {
    pub fn new(inner: StateMachineStore<SimConfig>, node: u64, world: Arc<World>) -> Self {
        let shared = inner.shared();
        Self {
            inner,
            shared,
            node,
            world,
        }
    }

    /// The applied state (for the final checks).
    pub fn shared(&self) -> SharedState<SimConfig> {
        self.shared.clone()
    }

    /// Hash of the applied cluster state.
    // openraft's error type is large; it is what the trait returns anyway.
    #[allow(clippy::result_large_err)]
    fn state_hash(&self) -> Result<[u8; 32]> {
        let err = |e: &dyn std::error::Error| -> StorageError<u64> {
            StorageIOError::read_state_machine(AnyError::error(e.to_string())).into()
        };
        let applied = self.shared.read().map_err(|_| err(&SimPoisoned))?;
        state_hash(&applied.state).map_err(|e| err(&e))
    }
}

#[derive(Debug)]
struct SimPoisoned;

impl std::fmt::Display for SimPoisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("state lock poisoned")
    }
}

impl std::error::Error for SimPoisoned {}

impl RaftStateMachine<SimConfig> for CheckedSm {
    type SnapshotBuilder = SnapshotBuilder<SimConfig>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, RaftNode>)> {
        self.inner.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<blixard_types::Response>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let d = digest(&entry);
            let normal = matches!(entry.payload, EntryPayload::Normal(_));
            responses.extend(self.inner.apply(std::iter::once(entry)).await?);
            let state = self.state_hash()?;
            let mut w = self.world.lock();
            let node = self.node;
            w.event(format_args!(
                "n{node} apply {index} t{} {}",
                d.term,
                if normal { "normal" } else { "raft" }
            ));
            let v = w.checks.committed.on_applied(node, index, d);
            w.violations_opt(v);
            let v = w.checks.states.on_state(node, index, state);
            w.violations_opt(v);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.world.lock().counters.bump("snapshots_built");
        self.inner.get_snapshot_builder().await
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        self.inner.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        self.inner.install_snapshot(meta, snapshot).await?;
        let state = self.state_hash()?;
        let mut w = self.world.lock();
        w.counters.bump("snapshots_installed");
        let node = self.node;
        w.event(format_args!(
            "n{node} install snapshot {}",
            meta.snapshot_id
        ));
        if let Some(last) = &meta.last_log_id {
            let floor = w.snapshot_floor.entry(node).or_default();
            *floor = (*floor).max(last.index);
            let v = w.checks.states.on_state(node, last.index, state);
            w.violations_opt(v);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SimConfig>>> {
        self.inner.get_current_snapshot().await
    }
}
