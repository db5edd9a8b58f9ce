use super::*;
use blixard_types::vm::{HealthCheck, RestartPolicy};
use proptest::prelude::*;

fn spec(policy: RestartPolicy) -> VmSpec {
    VmSpec {
        name: "web".into(),
        image: "img".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        labels: Default::default(),
        constraints: Default::default(),
        anti_affinity: None,
        restart: policy,
        health: Some(HealthCheck::Tcp(80)),
    }
}

fn recorded(state: VmState) -> VmReport {
    VmReport { state, healthy: None, error: None, restarts: 0, reboots_done: 0, deleted: false }
}

fn wanted(desired: Desired, policy: RestartPolicy, rec: VmState) -> BTreeMap<String, Wanted> {
    BTreeMap::from([(
        "web".to_string(),
        Wanted { spec: spec(policy), desired, deleting: false, reboots_requested: 0, recorded: recorded(rec) },
    )])
}

fn seen(local: Option<Local>) -> BTreeMap<String, Observed> {
    BTreeMap::from([("web".to_string(), Observed { local, healthy: None, error: None })])
}

fn ready() -> BTreeMap<String, Memory> {
    BTreeMap::from([("web".to_string(), Memory { image: ImageState::Ready, ..Default::default() })])
}

fn ops(actions: &[Action]) -> Vec<&'static str> {
    actions.iter().map(Action::name).collect()
}

fn reported(actions: &[Action]) -> Option<VmState> {
    actions.iter().find_map(|a| match a {
        Action::Report(_, r) => Some(r.state),
        _ => None,
    })
}

#[test]
fn new_vm_fetches_then_creates_and_starts() {
    let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Pending);
    let mut m = BTreeMap::new();
    let a = plan(&w, &BTreeMap::new(), &mut m, 0);
    assert_eq!(ops(&a), ["fetch", "report"]);
    assert_eq!(reported(&a), Some(VmState::Fetching));
    // Still fetching: nothing new.
    let w2 = wanted(Desired::Running, RestartPolicy::Always, VmState::Fetching);
    assert!(plan(&w2, &BTreeMap::new(), &mut m, 1).is_empty());
    m.get_mut("web").expect("mem").image = ImageState::Ready;
    let a = plan(&w2, &BTreeMap::new(), &mut m, 2);
    assert_eq!(ops(&a), ["create", "start", "report"]);
    let a = plan(&wanted(Desired::Running, RestartPolicy::Always, VmState::Starting), &seen(Some(Local::Running)), &mut m, 3);
    assert_eq!(reported(&a), Some(VmState::Running));
    // Reported: a steady state needs no action.
    assert!(plan(&wanted(Desired::Running, RestartPolicy::Always, VmState::Running), &seen(Some(Local::Running)), &mut m, 4).is_empty());
}

#[test]
fn image_failure_is_reported_and_retried_with_backoff_then_fails() {
    let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Fetching);
    let mut m = BTreeMap::from([("web".to_string(), Memory { image: ImageState::Failed("disk full".into()), ..Default::default() })]);
    let mut now = 10_000;
    for n in 1..MAX_RESTARTS {
        // The failure is reported at once; nothing is fetched before the backoff.
        let a = plan(&w, &BTreeMap::new(), &mut m, now);
        match &a[..] {
            [Action::Report(_, r)] => {
                assert_eq!(r.state, VmState::Fetching, "retry {n}");
                assert!(r.error.as_deref().is_some_and(|e| e.contains("image: disk full")), "{r:?}");
            }
            other => panic!("retry {n}: {other:?}"),
        }
        assert!(!plan(&w, &BTreeMap::new(), &mut m, now + backoff_ms(n) - 1).iter().any(|a| matches!(a, Action::FetchImage(_))));
        now += backoff_ms(n);
        let a = plan(&w, &BTreeMap::new(), &mut m, now);
        assert!(matches!(a.first(), Some(Action::FetchImage(_))), "retry {n} after its backoff: {a:?}");
        // ... and it fails again.
        m.get_mut("web").expect("mem").image = ImageState::Failed("disk full".into());
    }
    let a = plan(&w, &BTreeMap::new(), &mut m, now);
    match &a[..] {
        [Action::Report(_, r)] => assert_eq!(r.state, VmState::Failed, "out of retries"),
        other => panic!("{other:?}"),
    }
    assert!(!plan(&w, &BTreeMap::new(), &mut m, now + 3_600_000).iter().any(|a| matches!(a, Action::FetchImage(_))));
}

#[test]
fn crash_restarts_with_backoff_then_gives_up() {
    let mut m = ready();
    let mut now = 10_000;
    for n in 1..=MAX_RESTARTS {
        let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Running);
        let s = seen(Some(Local::Failed));
        // First sight schedules the restart; nothing starts before the backoff.
        let a = plan(&w, &s, &mut m, now);
        assert!(!ops(&a).contains(&"start"), "restart {n} too early");
        assert_eq!(m["web"].restarts, n);
        let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Starting);
        assert!(!ops(&plan(&w, &s, &mut m, now + backoff_ms(n) - 1)).contains(&"start"));
        now += backoff_ms(n);
        assert_eq!(ops(&plan(&w, &s, &mut m, now))[0], "start");
    }
    let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Starting);
    let a = plan(&w, &seen(Some(Local::Failed)), &mut m, now + 1);
    assert_eq!(reported(&a), Some(VmState::Failed));
    assert!(m["web"].gave_up);
    // Failed stays failed.
    let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Failed);
    assert!(!ops(&plan(&w, &seen(Some(Local::Failed)), &mut m, now + 100_000)).contains(&"start"));
    // The user starts it again (the state machine moves it to pending): a fresh streak.
    let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Pending);
    let a = plan(&w, &seen(Some(Local::Failed)), &mut m, now + 100_001);
    assert!(!m["web"].gave_up);
    assert_eq!(m["web"].restarts, 1);
    assert!(reported(&a).is_some());
}

#[test]
fn backoff_doubles_and_is_capped() {
    assert_eq!(backoff_ms(1), 1_000);
    assert_eq!(backoff_ms(2), 2_000);
    assert_eq!(backoff_ms(3), 4_000);
    assert_eq!(backoff_ms(40), MAX_BACKOFF_MS);
}

#[test]
fn restart_policies() {
    // never: a crash is reported, not restarted.
    let mut m = ready();
    let a = plan(&wanted(Desired::Running, RestartPolicy::Never, VmState::Running), &seen(Some(Local::Failed)), &mut m, 0);
    assert_eq!(ops(&a), ["report"]);
    assert_eq!(reported(&a), Some(VmState::Failed));
    // on-failure: a clean power-off is not a failure.
    let mut m = ready();
    let a = plan(&wanted(Desired::Running, RestartPolicy::OnFailure, VmState::Running), &seen(Some(Local::Stopped)), &mut m, 0);
    assert_eq!(reported(&a), Some(VmState::Stopped));
    assert_eq!(m["web"].restarts, 0);
    // on-failure: a crash is.
    let mut m = ready();
    plan(&wanted(Desired::Running, RestartPolicy::OnFailure, VmState::Running), &seen(Some(Local::Failed)), &mut m, 0);
    assert_eq!(m["web"].restarts, 1);
}

#[test]
fn stop_pause_resume_reboot() {
    let mut m = ready();
    let a = plan(&wanted(Desired::Stopped, RestartPolicy::Always, VmState::Running), &seen(Some(Local::Running)), &mut m, 0);
    assert_eq!(ops(&a), ["stop"]);
    // Stopped on purpose: reported stopped, and not restarted.
    let a = plan(&wanted(Desired::Stopped, RestartPolicy::Always, VmState::Running), &seen(Some(Local::Stopped)), &mut m, 1);
    assert_eq!(reported(&a), Some(VmState::Stopped));
    // Start again.
    let a = plan(&wanted(Desired::Running, RestartPolicy::Always, VmState::Stopped), &seen(Some(Local::Stopped)), &mut m, 2);
    assert_eq!(ops(&a), ["start", "report"]);
    let a = plan(&wanted(Desired::Paused, RestartPolicy::Always, VmState::Running), &seen(Some(Local::Running)), &mut m, 3);
    assert_eq!(ops(&a), ["pause"]);
    let a = plan(&wanted(Desired::Paused, RestartPolicy::Always, VmState::Running), &seen(Some(Local::Paused)), &mut m, 4);
    assert_eq!(reported(&a), Some(VmState::Paused));
    let a = plan(&wanted(Desired::Running, RestartPolicy::Always, VmState::Paused), &seen(Some(Local::Paused)), &mut m, 5);
    assert_eq!(ops(&a), ["resume"]);
    // One reboot per request.
    let mut w = wanted(Desired::Running, RestartPolicy::Always, VmState::Running);
    w.get_mut("web").expect("vm").reboots_requested = 1;
    let a = plan(&w, &seen(Some(Local::Running)), &mut m, 6);
    assert_eq!(ops(&a), ["reboot", "report"]);
    w.get_mut("web").expect("vm").recorded.reboots_done = 1;
    assert!(plan(&w, &seen(Some(Local::Running)), &mut m, 7).is_empty());
}

#[test]
fn delete_and_fencing() {
    let mut m = ready();
    let mut w = wanted(Desired::Stopped, RestartPolicy::Always, VmState::Running);
    w.get_mut("web").expect("vm").deleting = true;
    assert_eq!(ops(&plan(&w, &seen(Some(Local::Running)), &mut m, 0)), ["remove"]);
    let a = plan(&w, &BTreeMap::new(), &mut m, 1);
    assert!(matches!(&a[..], [Action::Report(_, r)] if r.deleted));
    // A VM this node has but the cluster placed elsewhere (or forgot) is removed here.
    let mut m = BTreeMap::new();
    let a = plan(&BTreeMap::new(), &seen(Some(Local::Running)), &mut m, 0);
    assert_eq!(ops(&a), ["remove"]);
}

fn arb_local() -> impl Strategy<Value = Option<Local>> {
    prop_oneof![
        Just(None),
        Just(Some(Local::Created)),
        Just(Some(Local::Starting)),
        Just(Some(Local::Running)),
        Just(Some(Local::Paused)),
        Just(Some(Local::Stopping)),
        Just(Some(Local::Stopped)),
        Just(Some(Local::Failed)),
    ]
}

proptest! {
    /// Whatever the situation: nothing is started for a VM wanted stopped or deleted,
    /// only unwanted or deleted VMs are removed, and every action names a VM that is
    /// wanted or present.
    #[test]
    fn plans_are_safe(
        desired in prop_oneof![Just(Desired::Running), Just(Desired::Paused), Just(Desired::Stopped)],
        deleting in any::<bool>(), is_wanted in any::<bool>(), local in arb_local(),
        policy in prop_oneof![Just(RestartPolicy::Always), Just(RestartPolicy::OnFailure), Just(RestartPolicy::Never)],
        image_ready in any::<bool>(), now in 0u64..1_000_000, restarts in 0u32..8,
    ) {
        let mut w = wanted(desired, policy, VmState::Running);
        w.get_mut("web").expect("vm").deleting = deleting;
        if !is_wanted { w.clear(); }
        let o = seen(local);
        let mut m = BTreeMap::from([("web".to_string(), Memory {
            image: if image_ready { ImageState::Ready } else { ImageState::Missing },
            restarts,
            ..Default::default()
        })]);
        let a = plan(&w, &o, &mut m, now);
        for act in &a {
            match act {
                Action::Start(_) | Action::Create(_) | Action::Resume(_) => {
                    prop_assert!(is_wanted && !deleting && desired != Desired::Stopped);
                }
                Action::Remove(_) => prop_assert!(!is_wanted || deleting),
                _ => {}
            }
        }
        if !is_wanted && local.is_none() {
            prop_assert!(a.is_empty());
        }
    }
}

#[test]
fn failed_create_waits_out_the_backoff_then_gives_up() {
    let mut m = ready();
    let w = wanted(Desired::Running, RestartPolicy::Always, VmState::Starting);
    let mut now = 1_000;
    for n in 1..MAX_RESTARTS {
        m.get_mut("web").expect("vm").record_failure("qemu not found".into(), now);
        let a = plan(&w, &seen(None), &mut m, now + backoff_ms(n) - 1);
        assert!(!ops(&a).contains(&"create"), "attempt {n} before its backoff");
        now += backoff_ms(n);
        assert_eq!(ops(&plan(&w, &seen(None), &mut m, now))[..2], ["create", "start"]);
    }
    m.get_mut("web").expect("vm").record_failure("qemu not found".into(), now);
    let a = plan(&w, &seen(None), &mut m, now + 1_000_000);
    assert_eq!(reported(&a), Some(VmState::Failed));
    let err = a.iter().find_map(|x| match x {
        Action::Report(_, r) => r.error.clone(),
        _ => None,
    });
    assert_eq!(err.as_deref(), Some("qemu not found"));
}
