use proptest::prelude::*;

use super::*;

fn w(client: u64, key: &str, value: &str, call: u64, ret: Option<u64>, outcome: Outcome) -> Operation {
    Operation { client, op: Op::Write { key: key.into(), value: value.into() }, call, ret, outcome }
}

fn r(client: u64, key: &str, got: Option<&str>, call: u64, ret: u64) -> Operation {
    Operation { client, op: Op::Read { key: key.into() }, call, ret: Some(ret), outcome: Outcome::Read(got.map(str::to_string)) }
}

fn ok(h: &[Operation]) -> bool {
    check(h, DEFAULT_BUDGET).is_ok()
}

#[test]
fn sequential_reads_see_the_last_write() {
    let h = [
        r(1, "k", None, 0, 1),
        w(1, "k", "a", 2, Some(3), Outcome::Written),
        r(2, "k", Some("a"), 4, 5),
        w(2, "k", "b", 6, Some(7), Outcome::Written),
        r(1, "k", Some("b"), 8, 9),
    ];
    assert!(ok(&h));
}

#[test]
fn a_read_overlapping_a_write_may_see_either_value() {
    for got in [Some("a"), Some("b")] {
        let h = [
            w(1, "k", "a", 0, Some(1), Outcome::Written),
            w(1, "k", "b", 2, Some(10), Outcome::Written),
            r(2, "k", got, 3, 4),
        ];
        assert!(ok(&h), "{got:?}");
    }
}

#[test]
fn a_stale_read_is_a_violation() {
    let h = [
        w(1, "k", "a", 0, Some(1), Outcome::Written),
        w(1, "k", "b", 2, Some(3), Outcome::Written),
        r(2, "k", Some("a"), 4, 5),
    ];
    let v = check(&h, DEFAULT_BUDGET);
    assert!(matches!(&v, Verdict::Violation { key, ops } if key == "k" && ops.len() == 3), "{v}");
    assert!(v.to_string().contains("no linearization"));
}

#[test]
fn reads_cannot_go_back_in_time() {
    // Both writes overlap both reads, but once one client saw "b", a later read cannot see
    // "a" again: a then b then a would need a third write.
    let h = [
        w(1, "k", "a", 0, Some(100), Outcome::Written),
        w(2, "k", "b", 0, Some(100), Outcome::Written),
        r(3, "k", Some("b"), 10, 20),
        r(3, "k", Some("a"), 30, 40),
        r(3, "k", Some("b"), 50, 60),
    ];
    assert!(!ok(&h));
    assert!(ok(&h[..4]));
}

#[test]
fn an_unknown_write_may_or_may_not_have_happened() {
    let maybe = w(1, "k", "a", 0, None, Outcome::Unknown);
    assert!(ok(&[maybe.clone(), r(2, "k", Some("a"), 5, 6)]));
    assert!(ok(&[maybe.clone(), r(2, "k", None, 5, 6)]));
    // ... but only after it was invoked, and once seen it stays.
    assert!(!ok(&[w(1, "k", "a", 10, None, Outcome::Unknown), r(2, "k", Some("a"), 5, 6)]));
    assert!(!ok(&[maybe, r(2, "k", Some("a"), 5, 6), r(2, "k", None, 7, 8)]));
}

#[test]
fn a_failed_write_never_happened() {
    let h = [w(1, "k", "a", 0, Some(1), Outcome::Failed), r(2, "k", Some("a"), 5, 6)];
    assert!(!ok(&h));
    assert!(ok(&[h[0].clone(), r(2, "k", None, 5, 6)]));
}

#[test]
fn keys_are_independent() {
    let h = [
        w(1, "x", "1", 0, Some(1), Outcome::Written),
        w(1, "y", "2", 2, Some(3), Outcome::Written),
        r(2, "x", Some("1"), 4, 5),
        r(2, "y", Some("1"), 4, 5),
    ];
    assert!(matches!(check(&h, DEFAULT_BUDGET), Verdict::Violation { key, .. } if key == "y"));
}

#[test]
fn malformed_operations_are_named() {
    let bad = Operation { client: 1, op: Op::Read { key: "k".into() }, call: 0, ret: Some(1), outcome: Outcome::Written };
    assert!(matches!(check(&[bad], DEFAULT_BUDGET), Verdict::Malformed { why: "a read answered as a write", .. }));
    let early = r(1, "k", None, 5, 4);
    assert!(matches!(check(&[early], DEFAULT_BUDGET), Verdict::Malformed { why: "returned before it was invoked", .. }));
}

#[test]
fn the_budget_bounds_the_search() {
    // Many concurrent unknown writes and a read that none of them explains: every subset is
    // tried before the search can say no.
    let mut h: Vec<Operation> = (0..40).map(|i| w(i, "k", &i.to_string(), 0, None, Outcome::Unknown)).collect();
    h.push(r(99, "k", Some("nobody"), 1, 2));
    h.push(w(98, "k", "z", 0, Some(100), Outcome::Written));
    assert!(matches!(check(&h, 1_000), Verdict::TooComplex { budget: 1_000, .. } | Verdict::Violation { .. }));
}

#[test]
fn planted_bugs_make_a_clean_history_fail() {
    let clean = vec![
        w(1, "k", "a", 0, Some(1), Outcome::Written),
        w(1, "k", "b", 2, Some(3), Outcome::Written),
        r(2, "k", Some("b"), 4, 5),
    ];
    assert!(ok(&clean));
    let mut stale = clean.clone();
    assert!(plant::stale_read(&mut stale));
    assert!(!ok(&stale));
    let mut lost = clean;
    assert!(plant::lost_write(&mut lost));
    assert!(!ok(&lost));
}

/// A random linearizable history: each operation takes effect at a random instant inside
/// its interval, in that order, on a real register per key.
fn linearizable_history(ops: Vec<(u8, u8, bool, u64, u64, u8)>) -> Vec<Operation> {
    let mut planned: Vec<(u64, u64, u64, u8, bool, u8)> = ops
        .into_iter()
        .enumerate()
        .map(|(i, (client, key, write, start, len, fate))| {
            let call = start * 10;
            let ret = call + len * 10 + 2;
            // The effect happens strictly inside [call, ret], at a distinct instant.
            let at = call + 1 + (i as u64 % (ret - call - 1));
            (at * 1000 + i as u64, call, ret, key % 3, write, client % 4 + fate / 200 * 10)
        })
        .collect();
    planned.sort();
    let mut registers: BTreeMap<u8, Option<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for (n, (_, call, ret, key, write, client)) in planned.into_iter().enumerate() {
        let key_s = format!("k{key}");
        let reg = registers.entry(key).or_default();
        // Clients with id >= 10 time out: their writes happened, their answers are lost.
        let lost = client >= 10;
        if write {
            let value = format!("v{n}");
            *reg = Some(value.clone());
            let (ret, outcome) = if lost { (None, Outcome::Unknown) } else { (Some(ret), Outcome::Written) };
            out.push(Operation { client: u64::from(client), op: Op::Write { key: key_s, value }, call, ret, outcome });
        } else {
            out.push(Operation {
                client: u64::from(client),
                op: Op::Read { key: key_s },
                call,
                ret: Some(ret),
                outcome: Outcome::Read(reg.clone()),
            });
        }
    }
    out
}

#[test]
fn a_long_history_with_overlap_is_decided_quickly() {
    // 3,000 operations on 3 keys, about 5 in flight per key at any time.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ops = (0..3_000)
        .map(|_| (next() as u8, next() as u8, next() % 2 == 0, next() % 600, next() % 6, next() as u8))
        .collect();
    let mut h = linearizable_history(ops);
    let t = std::time::Instant::now();
    assert!(ok(&h));
    assert!(plant::stale_read(&mut h));
    assert!(!ok(&h));
    eprintln!("3,000 operations checked twice in {:?}", t.elapsed());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every history produced by a real register with overlapping operations passes.
    #[test]
    fn real_register_histories_are_linearizable(
        ops in prop::collection::vec((any::<u8>(), any::<u8>(), any::<bool>(), 0u64..40, 0u64..6, any::<u8>()), 0..40)
    ) {
        let h = linearizable_history(ops);
        let v = check(&h, DEFAULT_BUDGET);
        prop_assert!(v.is_ok(), "{}", v);
    }

    /// A stale read planted into such a history is always caught.
    #[test]
    fn planted_stale_reads_are_caught(
        ops in prop::collection::vec((any::<u8>(), any::<u8>(), any::<bool>(), 0u64..40, 0u64..6, any::<u8>()), 0..40)
    ) {
        let mut h = linearizable_history(ops);
        if plant::stale_read(&mut h) {
            prop_assert!(!check(&h, DEFAULT_BUDGET).is_ok());
        }
    }

    /// The checker decides arbitrary (mostly nonsense) histories without panicking.
    #[test]
    fn arbitrary_histories_never_panic(
        ops in prop::collection::vec((0u64..4, 0u8..2, any::<bool>(), 0u64..20, prop::option::of(0u64..25), 0u8..4, 0u8..4), 0..14)
    ) {
        let h: Vec<Operation> = ops.into_iter().map(|(client, key, write, call, ret, val, fate)| {
            let key = format!("k{key}");
            let value = format!("v{val}");
            let op = if write { Op::Write { key, value: value.clone() } } else { Op::Read { key } };
            let outcome = match (fate, write) {
                (0, _) => Outcome::Failed,
                (1, _) => Outcome::Unknown,
                (_, true) => Outcome::Written,
                (2, false) => Outcome::Read(None),
                (_, false) => Outcome::Read(Some(value)),
            };
            Operation { client, op, call, ret, outcome }
        }).collect();
        let _ = check(&h, 10_000).to_string();
    }
}
