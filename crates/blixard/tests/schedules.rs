//! Fault schedules on five real node processes in network namespaces (partitions both ways
//! and one way, rate limits, kill -9 and restart, SIGSTOP), with the clients' history
//! checked for linearizability; and a planted stale read, which the checker must catch.
//! Needs root, iproute2 and nftables: skipped with a visible message otherwise, unless
//! BLIXARD_REQUIRE_REAL=1 (CI), where it fails instead. The long run is
//! `blixard-faults schedules --count 200` (README).

mod common;

use std::path::Path;
use std::time::Duration;

use blixard_faults::{net, run_schedule, Plant, ScheduleOptions};
use common::*;

/// 10 s of faults, every kind (kill -9 included).
fn short(seed: u64) -> ScheduleOptions {
    ScheduleOptions { faults_for: Duration::from_secs(10), ..ScheduleOptions::new(seed) }
}

fn ready() -> bool {
    match net::prerequisites() {
        Ok(()) => true,
        Err(why) if require_real() => panic!("BLIXARD_REQUIRE_REAL=1 but {why}"),
        Err(why) => {
            eprintln!("SKIP fault schedules: {why}");
            false
        }
    }
}

#[test]
fn fault_schedules_keep_the_history_linearizable_and_planted_bugs_are_caught() {
    if !ready() {
        return;
    }
    let bin = Path::new(BIN);
    for seed in [1, 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = run_schedule(bin, dir.path(), &short(seed)).unwrap_or_else(|e| {
            let _ = dir.keep();
            panic!("schedule {seed} could not run: {e}")
        });
        eprintln!("schedule {seed}: {r:?}");
        assert!(r.faults.values().sum::<usize>() >= 3, "the nemesis acted: {:?}", r.faults);
        assert!(r.writes_acked >= 5 && r.reads >= 5, "the clients made progress: {r:?}");
        assert!(r.violations.is_empty() && r.acked_lost == 0 && r.undecided.is_empty(), "{r:#?}");
    }
    // The same recording with a stale read planted: the checker must say so.
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_schedule(bin, dir.path(), &ScheduleOptions { plant: Some(Plant::StaleRead), ..short(3) }).expect("schedule 3");
    assert_eq!(r.planted, Some(true), "{r:?}");
    assert_eq!(r.violations.len(), 1, "{r:#?}");
}
