//! [`SimRuntime`]: openraft's `AsyncRuntime` for the simulation.
//!
//! It is tokio (the simulation runs on a current-thread runtime with a paused clock, so time
//! only moves when every task is idle) with two differences:
//! - `thread_rng()` (openraft draws election timeouts from it) is seeded per run, see
//!   [`seed_thread_rng`];
//! - every task spawned while a node's code runs is tagged with that node (a tokio task
//!   local inherited by the tasks it spawns) and registered, so that [`crash`] can abort
//!   all of a node's tasks at once: a crash, not a graceful shutdown.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend};

use crate::rng::SimRng;

tokio::task_local! {
    /// The simulated node whose code the current task runs.
    static NODE: u64;
}

thread_local! {
    static RNG: RefCell<SimRng> = RefCell::new(SimRng::new(0));
    static TASKS: RefCell<BTreeMap<u64, Vec<tokio::task::AbortHandle>>> = const { RefCell::new(BTreeMap::new()) };
}

/// Seeds the generator behind [`SimRuntime::thread_rng`] on this thread, and forgets the
/// task registry of a previous run. Call at the start of every run.
pub fn seed_thread_rng(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = SimRng::fork(seed, 0x5241_4654)); // "RAFT"
    TASKS.with(|t| t.borrow_mut().clear());
}

/// The node the current task belongs to, if any.
pub fn current_node() -> Option<u64> {
    NODE.try_with(|n| *n).ok()
}

/// Spawns `future` as a task of `node` (aborted when the node crashes).
pub fn spawn_on<F>(node: u64, future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = tokio::spawn(NODE.scope(node, future));
    TASKS.with(|t| {
        let mut t = t.borrow_mut();
        let tasks = t.entry(node).or_default();
        tasks.retain(|h| !h.is_finished());
        tasks.push(handle.abort_handle());
    });
    handle
}

/// Runs `future` (e.g. `Raft::new`) as code of `node`, so the tasks it spawns are the node's.
pub async fn run_as<F: Future>(node: u64, future: F) -> F::Output {
    NODE.scope(node, future).await
}

/// Aborts every task of `node`: its Raft core, replication, watchers. Their futures (and the
/// storage handles they own) are dropped the next time the runtime turns.
pub fn crash(node: u64) -> usize {
    let tasks = TASKS.with(|t| t.borrow_mut().remove(&node).unwrap_or_default());
    let n = tasks.iter().filter(|h| !h.is_finished()).count();
    for h in tasks {
        h.abort();
    }
    n
}

/// openraft's `ThreadLocalRng` for the simulation: draws from this thread's seeded generator.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimThreadRng;

impl rand_core::RngCore for SimThreadRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        RNG.with(|r| r.borrow_mut().next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// tokio, with seeded randomness and per-node task tracking (see the module docs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SimRuntime;

impl AsyncRuntime for SimRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = tokio::time::Instant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = SimThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        match current_node() {
            Some(node) => spawn_on(node, future),
            None => tokio::spawn(future),
        }
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        SimThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}
