//! Tests of the harness itself: determinism, every fault observably injected, and a planted
//! storage bug caught (the checkers can fail). Kept short: the workspace test run pays for it.

use blixard_sim::world::Counters;
use blixard_sim::{run_seed, Bug, Profile, Report, SimOptions};
use std::time::Duration;

/// A short run with frequent nemesis actions.
fn short(seed: u64) -> SimOptions {
    let mut o = SimOptions::new(seed);
    o.safety_ms = 4_000;
    o.snapshot_every = 20;
    o.liveness_ms = 20_000;
    o.faults = Profile::Dense.plan();
    o
}

fn assert_clean(r: &Report, o: &SimOptions) {
    assert!(
        r.violations.is_empty(),
        "seed {} violated {:?}; replay: {}",
        r.seed,
        r.violations,
        o.replay_command()
    );
}

#[test]
fn same_seed_same_trace_different_seed_different_trace() {
    let o = short(11);
    let a = run_seed(&o);
    let b = run_seed(&o);
    assert_clean(&a, &o);
    assert_eq!(
        a.trace_hash, b.trace_hash,
        "seed 11 ran twice gave different traces"
    );
    assert_eq!(a.events, b.events);
    assert_eq!(a.counters, b.counters);
    let c = run_seed(&short(12));
    assert_ne!(
        a.trace_hash, c.trace_hash,
        "seeds 11 and 12 gave the same trace"
    );
    // The runs did real work.
    assert!(a.acked > 10, "only {} acknowledged writes", a.acked);
    assert!(a.terms_with_leader >= 1);
}

#[test]
fn every_fault_kind_is_injected_and_invariants_hold() {
    let mut total = Counters::default();
    for seed in 100..103 {
        let o = short(seed);
        let r = run_seed(&o);
        assert_clean(&r, &o);
        total.merge(&r.counters);
    }
    for kind in [
        "msg_lost",
        "msg_delayed",
        "msg_duplicated",
        "msg_reordered",
        "msg_dropped_partition",
        "partition_symmetric",
        "partition_one_way",
        "crashes",
        "power_losses",
        "restarts",
        "clock_skew",
        "slow_disk",
        "disk_slow_writes",
        "client_acks",
        "snapshots_built",
        "vm_placements",
        "vm_starts",
        "vm_crash",
    ] {
        assert!(total.get(kind) > 0, "{kind} never happened: {total}");
    }
}

/// A node that forgets its vote on restart can vote twice in one term: two leaders. Needs
/// restarts during elections, so: 3 nodes, the crash-heavy profile.
#[test]
fn planted_bug_forget_vote_is_caught() {
    planted(Bug::ForgetVote, |o| {
        o.nodes = 3;
        o.faults = Profile::ElectionStorm.plan();
    });
}

/// The orchestration side under faults, with a short grace so that VMs do move: nodes
/// fence, VMs move off lost nodes (one-way partitions included), no VM ever starts on a
/// node while active on another,
/// and every VM runs where it is placed once the faults stop.
#[test]
fn vms_move_off_lost_nodes_and_never_run_twice() {
    let mut total = Counters::default();
    for seed in 0..3 {
        let mut o = SimOptions::new(seed);
        o.safety_ms = 12_000;
        o.grace_ms = 500;
        let r = run_seed(&o);
        assert_clean(&r, &o);
        total.merge(&r.counters);
    }
    for kind in ["fences", "vm_moves", "vm_starts", "partition_one_way"] {
        assert!(total.get(kind) > 0, "{kind} never happened: {total}");
    }
}

/// An executor that never fences keeps VMs running that the majority has moved: the
/// exclusivity check sees the VM start on its new node while still active on the old one.
#[test]
fn planted_bug_no_fence_is_caught() {
    for seed in 0..20 {
        let mut o = SimOptions::new(seed);
        o.grace_ms = 500;
        o.bug = Some(Bug::NoFence);
        let r = run_seed(&o);
        if let Some(v) = r.violations.iter().find(|v| v.contains("while active on")) {
            eprintln!("NoFence caught at seed {seed}: {v}");
            return;
        }
    }
    panic!("NoFence was not caught in 20 seeds");
}

/// A disk whose fsync does nothing loses acknowledged writes in a power loss.
#[test]
fn planted_bug_lying_fsync_is_caught() {
    planted(Bug::LyingFsync, |_| {});
}

/// A log store that acknowledges appends it never wrote loses committed entries.
#[test]
fn planted_bug_ack_unwritten_is_caught() {
    planted(Bug::AckUnwritten, |_| {});
}

fn planted(bug: Bug, tune: impl Fn(&mut SimOptions)) {
    const SEEDS: u64 = 8;
    for seed in 0..SEEDS {
        let mut o = short(seed);
        tune(&mut o);
        o.bug = Some(bug);
        let r = run_seed(&o);
        if !r.violations.is_empty() {
            eprintln!("{bug:?} caught at seed {seed}: {:?}", r.violations[0]);
            return;
        }
    }
    panic!("{bug:?} was not caught in {SEEDS} seeds");
}

/// The C1M path at a small scale (the full run is `blixard-sim --c1m`): through three Raft
/// servers, every VM placed, no node over capacity (summed from the VM records), several
/// rounds, the servers' states identical; and the same seed gives the same state.
#[test]
fn c1m_path_places_everything_within_capacity() {
    let o = blixard_sim::c1m::C1mOptions {
        nodes: 200,
        vms: 20_000,
        per_round: 2_000,
        ..Default::default()
    };
    let r = blixard_sim::c1m::run_c1m(&o).unwrap_or_else(|e| panic!("C1M run failed: {e}"));
    assert_eq!(r.placed, 20_000, "{r:?}");
    assert_eq!(r.unplaceable, 0, "{r:?}");
    assert_eq!(r.capacity_violations, 0, "{r:?}");
    assert!(r.rounds >= 10, "{r:?}");
    // Joins (2 entries a node), 20 batches of creates, at least 20 of placements.
    assert!(r.entries >= 2 * 200 + 40, "{r:?}");
    assert!(r.place.sim > Duration::ZERO, "{r:?}");
    let again = blixard_sim::c1m::run_c1m(&o).unwrap_or_else(|e| panic!("C1M run failed: {e}"));
    assert_eq!((again.state_hash, again.entries), (r.state_hash, r.entries));
}
