//! Histories of client operations against a cluster, and a linearizability checker for
//! them.
//!
//! Clients record every operation they attempt: when they invoked it, when (if ever) they
//! learnt its outcome, and the outcome. [`check`] decides whether some total order of the
//! operations exists that respects real time (an operation that returned before another
//! was invoked comes first) and the semantics of a register per key (a read returns the
//! last value written). That is linearizability; it is what "nothing acknowledged is lost
//! and no stale value is read" means precisely.
//!
//! The search is Wing & Gong's, with Lowe's memoisation of (linearized set, state): keys are
//! independent registers, so each key is checked alone (linearizability is compositional),
//! which keeps each search small. An operation whose outcome is unknown (the client timed
//! out) may have taken effect at any time after its invocation, or never: it never
//! constrains the order and may be left out.
//!
//! **Invariant:** pure logic, no I/O and no clocks: times are whatever monotonic numbers
//! the recorder used.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Write { key: String, value: String },
    /// Read `key`.
    Read { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Write { key, .. } | Op::Read { key } => key,
        }
    }
}

/// What the client learnt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A write was acknowledged as committed.
    Written,
    /// A read returned this value (`None`: the key was absent).
    Read(Option<String>),
    /// The operation certainly did not take effect (refused before it was proposed).
    Failed,
    /// The client does not know (timeout, connection lost): it may or may not have taken
    /// effect.
    Unknown,
}

/// One operation: invoked at `call`, outcome learnt at `ret` (`None` for `Unknown`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub client: u64,
    pub op: Op,
    pub call: u64,
    pub ret: Option<u64>,
    pub outcome: Outcome,
}

/// Why a history is not linearizable, or could not be decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order exists for this key. `ops` are the key's operations, for the report.
    Violation { key: String, ops: Vec<Operation> },
    /// A recorded outcome does not fit its operation (a write answered with a value, a read
    /// answered "written"), or an operation returned before it was invoked.
    Malformed { op: Operation, why: &'static str },
    /// The search for this key gave up after `budget` states; neither proven nor refuted.
    TooComplex { key: String, budget: usize },
}

impl Verdict {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => f.write_str("linearizable"),
            Verdict::Violation { key, ops } => {
                writeln!(f, "key {key:?}: no linearization of its {} operations:", ops.len())?;
                for o in ops {
                    let ret = o.ret.map_or_else(|| "?".to_string(), |r| r.to_string());
                    writeln!(f, "  client {} [{}, {}] {:?} -> {:?}", o.client, o.call, ret, o.op, o.outcome)?;
                }
                Ok(())
            }
            Verdict::Malformed { op, why } => write!(f, "malformed operation {op:?}: {why}"),
            Verdict::TooComplex { key, budget } => {
                write!(f, "key {key:?}: undecided after {budget} search states (too much concurrency)")
            }
        }
    }
}

/// Default bound on the states one key's search may visit.
pub const DEFAULT_BUDGET: usize = 2_000_000;

/// Checks `history` (any order) against a register per key.
pub fn check(history: &[Operation], budget: usize) -> Verdict {
    let mut per_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in history {
        if let Some(why) = malformed(o) {
            return Verdict::Malformed { op: o.clone(), why };
        }
        // A failed operation did nothing, and an unanswered read tells nothing.
        let useless = o.outcome == Outcome::Failed || (o.outcome == Outcome::Unknown && matches!(o.op, Op::Read { .. }));
        if !useless {
            per_key.entry(o.op.key()).or_default().push(o);
        }
    }
    for (key, ops) in per_key {
        match Search::new(&ops, budget).run() {
            Some(true) => {}
            Some(false) => {
                let mut ops: Vec<Operation> = ops.into_iter().cloned().collect();
                ops.sort_by_key(|o| o.call);
                return Verdict::Violation { key: key.to_string(), ops };
            }
            None => return Verdict::TooComplex { key: key.to_string(), budget },
        }
    }
    Verdict::Linearizable
}

fn malformed(o: &Operation) -> Option<&'static str> {
    match (&o.op, &o.outcome) {
        (Op::Write { .. }, Outcome::Read(_)) => return Some("a write answered with a value"),
        (Op::Read { .. }, Outcome::Written) => return Some("a read answered as a write"),
        _ => {}
    }
    match (o.ret, &o.outcome) {
        (None, Outcome::Written | Outcome::Read(_)) => Some("an answered operation without a return time"),
        (Some(r), _) if r < o.call => Some("returned before it was invoked"),
        _ => None,
    }
}

/// The search for one key. Operations are indexed by their position in `ops`.
struct Search<'a> {
    ops: Vec<&'a Operation>,
    /// Return time, with `u64::MAX` for operations that never returned.
    ret: Vec<u64>,
    /// Operations that must be linearized (answered ones); unknown writes are optional.
    required: usize,
    seen: HashSet<(Vec<u64>, Option<&'a str>)>,
    budget: usize,
}

impl<'a> Search<'a> {
    fn new(ops: &[&'a Operation], budget: usize) -> Self {
        let mut ops = ops.to_vec();
        ops.sort_by_key(|o| o.call);
        let ret = ops.iter().map(|o| if o.outcome == Outcome::Unknown { u64::MAX } else { o.ret.unwrap_or(u64::MAX) }).collect();
        let required = ops.iter().filter(|o| o.outcome != Outcome::Unknown).count();
        Self { ops, ret, required, seen: HashSet::new(), budget }
    }

    /// `Some(true)`: linearizable; `Some(false)`: not; `None`: budget exhausted.
    fn run(&mut self) -> Option<bool> {
        let done = vec![0u64; self.ops.len().div_ceil(64)];
        self.step(done, None, 0)
    }

    fn step(&mut self, done: Vec<u64>, state: Option<&'a str>, linearized_required: usize) -> Option<bool> {
        if linearized_required == self.required {
            // Every answered operation has its place; unknown writes left may never have
            // happened.
            return Some(true);
        }
        if !self.seen.insert((done.clone(), state)) {
            return Some(false);
        }
        if self.seen.len() > self.budget {
            return None;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        let first = done.iter().position(|w| *w != u64::MAX).map_or(self.ops.len(), |w| w * 64 + done[w].trailing_ones() as usize);
        // An operation can go next only if no pending operation returned before it was
        // invoked. Sorted by call, so the scan stops at the first call past the horizon (a
        // later operation returns later still).
        let mut horizon = u64::MAX;
        for i in first..self.ops.len() {
            if self.ops[i].call > horizon {
                break;
            }
            if !is_done(i) {
                horizon = horizon.min(self.ret[i]);
            }
        }
        for i in first..self.ops.len() {
            if is_done(i) {
                continue;
            }
            let o = self.ops[i];
            if o.call > horizon {
                // Sorted by call: every later one is beyond the horizon too.
                break;
            }
            let next = match (&o.op, &o.outcome) {
                (Op::Write { value, .. }, _) => Some(value.as_str()),
                (Op::Read { .. }, Outcome::Read(v)) if v.as_deref() == state => state,
                _ => continue,
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            let required = linearized_required + usize::from(o.outcome != Outcome::Unknown);
            match self.step(d, next, required) {
                Some(false) => {}
                other => return other,
            }
        }
        Some(false)
    }
}

/// Planted bugs, to show the checker fails on broken histories (`schedules --plant`).
pub mod plant {
    use super::{Op, Operation, Outcome};

    /// Rewrites one read to return the value an acknowledged write had overwritten before the
    /// read began: a stale read. Returns `false` if the history has no such read.
    pub fn stale_read(history: &mut [Operation]) -> bool {
        for r in 0..history.len() {
            let (Op::Read { key }, Outcome::Read(got), call) = (&history[r].op, &history[r].outcome, history[r].call) else {
                continue;
            };
            // Two acknowledged writes of other values to the key, both finished before the
            // read began, one strictly before the other: the older is certainly stale.
            let writes: Vec<(u64, u64, &String)> = history
                .iter()
                .filter_map(|w| match (&w.op, &w.outcome, w.ret) {
                    (Op::Write { key: k, value }, Outcome::Written, Some(ret)) if k == key && ret < call => {
                        Some((w.call, ret, value))
                    }
                    _ => None,
                })
                .collect();
            let stale = writes.iter().find_map(|&(_, old_ret, old)| {
                let overwritten = writes.iter().any(|&(c, _, v)| c > old_ret && v != old);
                (overwritten && Some(old) != got.as_ref()).then(|| old.clone())
            });
            if let Some(old) = stale {
                history[r].outcome = Outcome::Read(Some(old));
                return true;
            }
        }
        false
    }

    /// Drops the effect of one acknowledged write that a later read saw: the read now sees
    /// the value before it (a lost acknowledged write). Returns `false` if none fits.
    pub fn lost_write(history: &mut [Operation]) -> bool {
        for r in 0..history.len() {
            let (Op::Read { key }, Outcome::Read(Some(got)), call) = (&history[r].op, &history[r].outcome, history[r].call) else {
                continue;
            };
            let acked_before = history.iter().any(|w| {
                matches!((&w.op, &w.outcome, w.ret), (Op::Write { key: k, value }, Outcome::Written, Some(ret))
                    if k == key && value == got && ret < call)
            });
            if acked_before {
                history[r].outcome = Outcome::Read(None);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests;
