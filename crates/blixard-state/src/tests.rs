use super::*;
use blixard_types::ticket::secret_hash;

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}

fn req(at_ms: u64, by: NodeId, cmd: Command) -> Request {
    Request { at_ms, by, cmd, id: 0 }
}

fn bootstrapped() -> ClusterState {
    let mut s = ClusterState::default();
    let r = s.apply(&req(
        0,
        id(1),
        Command::Bootstrap { cluster_id: ClusterId([1; 16]), node: id(1), info: NodeInfo::default() },
    ));
    assert_eq!(r, CommandResult::Ok);
    s
}

fn ticket(s: &mut ClusterState, secret: u8, role: Role, expires: u64) -> [u8; 32] {
    let h = secret_hash(&[secret; 32]);
    let r = s.apply(&req(0, id(1), Command::CreateTicket { secret_hash: h, role, expires_at_ms: expires }));
    assert_eq!(r, CommandResult::Ok);
    h
}

fn admit(node: NodeId, h: [u8; 32], role: Role) -> Command {
    Command::AdmitNode { node, info: NodeInfo::default(), secret_hash: h, role }
}

#[test]
fn nothing_applies_before_bootstrap_and_bootstrap_is_once() {
    let mut s = ClusterState::default();
    let r = s.apply(&req(0, id(1), Command::RemoveNode { node: id(1) }));
    assert_eq!(r, CommandResult::Refused(Refusal::NotBootstrapped));
    let mut s = bootstrapped();
    let before = s.clone();
    let r = s.apply(&req(
        1,
        id(2),
        Command::Bootstrap { cluster_id: ClusterId([2; 16]), node: id(2), info: NodeInfo::default() },
    ));
    assert_eq!(r, CommandResult::Refused(Refusal::AlreadyBootstrapped));
    assert_eq!(s, before);
}

#[test]
fn ticket_rules() {
    let mut s = bootstrapped();
    let h = ticket(&mut s, 7, Role::Voter, 1000);
    // Wrong role, unknown secret, expiry: refused and nothing changes.
    let before = s.clone();
    assert_eq!(
        s.apply(&req(5, id(2), admit(id(2), h, Role::Learner))),
        CommandResult::Refused(Refusal::RoleMismatch { granted: Role::Voter, requested: Role::Learner })
    );
    assert_eq!(
        s.apply(&req(5, id(2), admit(id(2), secret_hash(&[8; 32]), Role::Voter))),
        CommandResult::Refused(Refusal::UnknownTicket)
    );
    assert_eq!(s.apply(&req(1000, id(2), admit(id(2), h, Role::Voter))), CommandResult::Refused(Refusal::TicketExpired));
    assert_eq!(s, before);
    // A client ticket cannot admit a node, a node ticket cannot authorise a client.
    assert!(matches!(
        s.apply(&req(5, id(9), Command::AuthorizeClient { key: id(9), secret_hash: h })),
        CommandResult::Refused(Refusal::RoleMismatch { .. })
    ));
    // Valid.
    assert_eq!(s.apply(&req(5, id(2), admit(id(2), h, Role::Voter))), CommandResult::Ok);
    assert!(s.is_member(&id(2)));
    // Revoked.
    let tid = ticket_id(&h);
    assert_eq!(s.apply(&req(6, id(1), Command::RevokeTicket { id: tid })), CommandResult::Ok);
    assert_eq!(s.apply(&req(7, id(3), admit(id(3), h, Role::Voter))), CommandResult::Refused(Refusal::TicketRevoked));
    assert!(!s.is_member(&id(3)));
}

#[test]
fn removed_nodes_stay_out() {
    let mut s = bootstrapped();
    let h = ticket(&mut s, 7, Role::Voter, u64::MAX);
    assert_eq!(s.apply(&req(5, id(2), admit(id(2), h, Role::Voter))), CommandResult::Ok);
    assert_eq!(s.apply(&req(6, id(1), Command::RemoveNode { node: id(2) })), CommandResult::Ok);
    assert!(!s.is_member(&id(2)));
    assert!(!s.is_client(&id(2)));
    assert_eq!(s.apply(&req(7, id(2), admit(id(2), h, Role::Voter))), CommandResult::Refused(Refusal::NodeRemoved(id(2))));
    let c = ticket(&mut s, 8, Role::Client, u64::MAX);
    assert_eq!(
        s.apply(&req(7, id(2), Command::AuthorizeClient { key: id(2), secret_hash: c })),
        CommandResult::Refused(Refusal::NodeRemoved(id(2)))
    );
    assert_eq!(s.apply(&req(8, id(1), Command::RemoveNode { node: id(42) })), CommandResult::Refused(Refusal::UnknownNode(id(42))));
}

#[test]
fn clients_are_authorised_but_not_members() {
    let mut s = bootstrapped();
    let c = ticket(&mut s, 8, Role::Client, u64::MAX);
    assert_eq!(s.apply(&req(7, id(5), Command::AuthorizeClient { key: id(5), secret_hash: c })), CommandResult::Ok);
    assert!(s.is_client(&id(5)));
    assert!(!s.is_member(&id(5)));
}

#[test]
fn labels_set_remove_and_validate() {
    let mut s = bootstrapped();
    let set = BTreeMap::from([("zone".to_string(), "a".to_string()), ("gpu".to_string(), "yes".to_string())]);
    let cmd = Command::SetLabels { node: id(1), set, remove: vec![] };
    assert_eq!(s.apply(&req(1, id(1), cmd)), CommandResult::Ok);
    let cmd = Command::SetLabels { node: id(1), set: BTreeMap::new(), remove: vec!["gpu".into()] };
    assert_eq!(s.apply(&req(2, id(1), cmd)), CommandResult::Ok);
    assert_eq!(s.nodes[&id(1)].labels, BTreeMap::from([("zone".to_string(), "a".to_string())]));
    let before = s.clone();
    let bad = BTreeMap::from([("bad key".to_string(), "x".to_string())]);
    assert!(matches!(
        s.apply(&req(3, id(1), Command::SetLabels { node: id(1), set: bad, remove: vec![] })),
        CommandResult::Refused(Refusal::InvalidLabel(_))
    ));
    assert_eq!(s, before);
}

#[test]
fn resolve_prefix() {
    let mut s = bootstrapped();
    let h = ticket(&mut s, 7, Role::Voter, u64::MAX);
    let mut a = [0x12; 32];
    a[1] = 0x34;
    let mut b = [0x12; 32];
    b[1] = 0x35;
    for n in [NodeId(a), NodeId(b)] {
        assert_eq!(s.apply(&req(5, n, admit(n, h, Role::Voter))), CommandResult::Ok);
    }
    assert_eq!(s.resolve_node("1234"), Ok(NodeId(a)));
    assert_eq!(s.resolve_node("12"), Err(ResolveError::Ambiguous));
    assert_eq!(s.resolve_node("ff"), Err(ResolveError::NoMatch));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn arb_cmd() -> impl Strategy<Value = Command> {
        let node = (0u8..6).prop_map(id);
        prop_oneof![
            (node.clone(), 0u8..3).prop_map(|(n, t)| admit(n, secret_hash(&[t; 32]), Role::Voter)),
            (0u8..3, 0u64..100).prop_map(|(t, e)| Command::CreateTicket {
                secret_hash: secret_hash(&[t; 32]),
                role: Role::Voter,
                expires_at_ms: e
            }),
            node.clone().prop_map(|n| Command::RemoveNode { node: n }),
            (node, "[a-z ]{0,4}", "[a-z=]{0,4}").prop_map(|(n, k, v)| Command::SetLabels {
                node: n,
                set: BTreeMap::from([(k, v)]),
                remove: vec![]
            }),
        ]
    }

    proptest! {
        /// Two replicas applying the same log end in the same state, and refused commands
        /// never change the state.
        #[test]
        fn apply_is_deterministic(cmds in proptest::collection::vec((0u64..100, arb_cmd()), 0..40)) {
            let mut a = bootstrapped();
            let mut b = bootstrapped();
            for (at, cmd) in cmds {
                let r = req(at, id(1), cmd);
                let before = a.clone();
                let ra = a.apply(&r);
                let rb = b.apply(&r);
                prop_assert_eq!(&ra, &rb);
                if matches!(ra, CommandResult::Refused(_)) {
                    prop_assert_eq!(&a, &before);
                }
            }
            prop_assert_eq!(a, b);
        }

        /// A removed node never becomes a member again.
        #[test]
        fn removed_is_forever(cmds in proptest::collection::vec((0u64..100, arb_cmd()), 0..40)) {
            let mut s = bootstrapped();
            for (at, cmd) in cmds {
                s.apply(&req(at, id(1), cmd));
                for r in &s.removed {
                    prop_assert!(!s.nodes.contains_key(r));
                }
            }
        }
    }
}

mod vms {
    use super::*;
    use blixard_types::vm::{Desired, RestartPolicy, VmReport, VmSpec, VmState};
    use blixard_types::command::Resources;
    use proptest::prelude::*;

    fn spec(name: &str, vcpus: u32, mem: u64) -> VmSpec {
        VmSpec {
            name: name.into(),
            image: "img".into(),
            vcpus,
            memory_mib: mem,
            disk_gib: 0,
            labels: BTreeMap::new(),
            constraints: BTreeMap::new(),
            anti_affinity: None,
            restart: RestartPolicy::Always,
            health: None,
        }
    }

    fn with_capacity() -> ClusterState {
        let mut s = ClusterState::default();
        let info = NodeInfo { resources: Resources { cpus: 4, memory_mib: 4096, disk_gib: 10 }, ..Default::default() };
        s.apply(&req(0, id(1), Command::Bootstrap { cluster_id: ClusterId([1; 16]), node: id(1), info: info.clone() }));
        let h = ticket(&mut s, 7, Role::Voter, u64::MAX);
        let r = s.apply(&req(1, id(2), Command::AdmitNode { node: id(2), info, secret_hash: h, role: Role::Voter }));
        assert_eq!(r, CommandResult::Ok);
        let r = s.apply(&req(1, id(1), publish(&hash(1), "img")));
        assert_eq!(r, CommandResult::Ok);
        s
    }

    fn hash(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn publish(hash: &str, name: &str) -> Command {
        Command::PublishImage { hash: hash.into(), size: 1, kind: ImageKind::Bundle, name: Some(name.into()) }
    }

    #[test]
    fn image_catalogue() {
        let mut s = with_capacity();
        // A VM's image is resolved to the hash at create: a later push under the name
        // does not change it.
        ok(&mut s, id(1), Command::CreateVm { spec: spec("web", 1, 64), start: true });
        assert_eq!(s.vms["web"].spec.image, hash(1));
        assert_eq!(s.vms["web"].image_ref, "img");
        ok(&mut s, id(1), publish(&hash(2), "img"));
        assert_eq!(s.image_names["img"], hash(2));
        assert!(s.images[&hash(1)].names.is_empty());
        assert_eq!(s.vms["web"].spec.image, hash(1));
        // References: name, full hash, unique prefix; not unknown or ambiguous ones.
        assert_eq!(s.resolve_image("img"), Ok(hash(2)));
        assert_eq!(s.resolve_image(&hash(1)), Ok(hash(1)));
        assert_eq!(s.resolve_image(&hash(1)[..8]), Ok(hash(1)));
        assert!(matches!(s.resolve_image("nope"), Err(Refusal::UnknownImage(_))));
        ok(&mut s, id(1), Command::PublishImage { hash: format!("0102{}", &hash(1)[4..]), size: 1, kind: ImageKind::Bundle, name: None });
        assert!(matches!(s.resolve_image("0102"), Err(Refusal::UnknownImage(_))), "short prefixes are not references");
        assert_eq!(s.resolve_image("01010101"), Ok(hash(1)));
        ok(&mut s, id(1), Command::PublishImage { hash: format!("01010101{}", "f".repeat(56)), size: 1, kind: ImageKind::Bundle, name: None });
        assert!(matches!(s.resolve_image("01010101"), Err(Refusal::AmbiguousImage(_))));
        // Bad input is refused and changes nothing.
        let before = s.clone();
        for bad in [
            Command::PublishImage { hash: "abc".into(), size: 1, kind: ImageKind::Bundle, name: None },
            publish(&hash(3), "Bad Name"),
            publish(&hash(3), "deadbeef"),
            Command::RemoveImage { hash: hash(9) },
            Command::RemoveImage { hash: hash(1) },
            Command::CreateVm { spec: VmSpec { image: "nope".into(), ..spec("db", 1, 64) }, start: true },
        ] {
            assert!(matches!(s.apply(&req(11, id(1), bad)), CommandResult::Refused(_)));
        }
        assert_eq!(s, before);
        assert!(matches!(
            s.apply(&req(11, id(1), Command::RemoveImage { hash: hash(1) })),
            CommandResult::Refused(Refusal::ImageInUse { .. })
        ));
        // Once the VM is gone the image can go, and its names with it.
        ok(&mut s, id(1), Command::DeleteVm { name: "web".into() });
        ok(&mut s, id(1), Command::RemoveImage { hash: hash(1) });
        ok(&mut s, id(1), Command::RemoveImage { hash: hash(2) });
        assert!(!s.image_names.contains_key("img"));
        assert!(!s.images.contains_key(&hash(2)));
    }

    fn ok(s: &mut ClusterState, by: NodeId, cmd: Command) {
        let r = s.apply(&req(10, by, cmd));
        assert_eq!(r, CommandResult::Ok);
    }

    fn report(state: VmState, deleted: bool) -> VmReport {
        VmReport { state, healthy: None, error: None, restarts: 0, reboots_done: 0, deleted }
    }

    #[test]
    fn lifecycle() {
        let mut s = with_capacity();
        ok(&mut s, id(1), Command::CreateVm { spec: spec("web", 2, 1024), start: true });
        assert!(matches!(
            s.apply(&req(11, id(1), Command::CreateVm { spec: spec("web", 1, 64), start: true })),
            CommandResult::Refused(Refusal::VmExists(_))
        ));
        assert!(matches!(
            s.apply(&req(11, id(1), Command::CreateVm { spec: spec("Bad/name", 1, 64), start: true })),
            CommandResult::Refused(Refusal::InvalidSpec(_))
        ));
        assert_eq!(s.unplaced().count(), 1);
        ok(&mut s, id(1), Command::PlaceVm { name: "web".into(), node: id(2) });
        assert_eq!(s.unplaced().count(), 0);
        assert_eq!(s.usage[&id(2)].used.cpus, 2);
        // Only the host may report.
        assert!(matches!(
            s.apply(&req(12, id(1), Command::ReportVm { name: "web".into(), report: report(VmState::Running, false) })),
            CommandResult::Refused(Refusal::NotHost { .. })
        ));
        ok(&mut s, id(2), Command::ReportVm { name: "web".into(), report: report(VmState::Running, false) });
        assert_eq!(s.vms["web"].state, VmState::Running);
        ok(&mut s, id(1), Command::SetDesired { name: "web".into(), desired: Desired::Paused });
        ok(&mut s, id(1), Command::RebootVm { name: "web".into() });
        assert_eq!(s.vms["web"].reboots_requested, 1);
        // Delete: stays until the host confirms, then its capacity is free again.
        ok(&mut s, id(1), Command::DeleteVm { name: "web".into() });
        assert!(s.vms["web"].deleting);
        assert!(matches!(
            s.apply(&req(13, id(1), Command::SetDesired { name: "web".into(), desired: Desired::Running })),
            CommandResult::Refused(Refusal::VmDeleting(_))
        ));
        ok(&mut s, id(2), Command::ReportVm { name: "web".into(), report: report(VmState::Stopped, true) });
        assert!(!s.vms.contains_key("web"));
        assert_eq!(s.usage[&id(2)].used, Resources::default());
    }

    #[test]
    fn placement_is_checked_against_capacity() {
        let mut s = with_capacity();
        ok(&mut s, id(1), Command::CreateVm { spec: spec("a", 3, 1024), start: true });
        ok(&mut s, id(1), Command::CreateVm { spec: spec("b", 2, 1024), start: true });
        ok(&mut s, id(1), Command::PlaceVm { name: "a".into(), node: id(1) });
        let before = s.clone();
        assert!(matches!(
            s.apply(&req(11, id(1), Command::PlaceVm { name: "b".into(), node: id(1) })),
            CommandResult::Refused(Refusal::DoesNotFit { .. })
        ));
        assert_eq!(s, before);
        // Moving a VM frees its old node.
        ok(&mut s, id(1), Command::PlaceVm { name: "a".into(), node: id(2) });
        ok(&mut s, id(1), Command::PlaceVm { name: "b".into(), node: id(1) });
        // Re-placing on the same node does not count it twice.
        ok(&mut s, id(1), Command::PlaceVm { name: "a".into(), node: id(2) });
        assert_eq!(s.usage[&id(2)].used.cpus, 3);
    }

    fn recomputed(s: &ClusterState) -> BTreeMap<NodeId, (Resources, u32)> {
        let mut m: BTreeMap<NodeId, (Resources, u32)> = BTreeMap::new();
        for v in s.vms.values() {
            if let Some(n) = v.node {
                let e = m.entry(n).or_default();
                e.0.cpus += v.spec.vcpus;
                e.0.memory_mib += v.spec.memory_mib;
                e.1 += 1;
            }
        }
        m
    }

    proptest! {
        /// The usage index always equals what the VM records add up to, and no node is
        /// ever placed past its capacity.
        #[test]
        fn usage_index_matches_records(ops in proptest::collection::vec((0u8..5, 0u8..6, 1u8..3, 1u32..4), 0..60)) {
            let mut s = with_capacity();
            for (op, vm, node, vcpus) in ops {
                let name = format!("vm{vm}");
                let cmd = match op {
                    0 => Command::CreateVm { spec: spec(&name, vcpus, 512), start: true },
                    1 => Command::PlaceVm { name, node: id(node) },
                    2 => Command::DeleteVm { name },
                    3 => Command::ReportVm { name, report: report(VmState::Stopped, true) },
                    _ => Command::SetDesired { name, desired: Desired::Stopped },
                };
                let by = if op == 3 { id(node) } else { id(1) };
                s.apply(&req(20, by, cmd));
                let want = recomputed(&s);
                for (n, (used, count)) in &want {
                    let u = &s.usage[n];
                    prop_assert_eq!(u.used.cpus, used.cpus);
                    prop_assert_eq!(u.used.memory_mib, used.memory_mib);
                    prop_assert_eq!(u.vms, *count);
                    prop_assert!(used.cpus <= s.nodes[n].resources.cpus);
                }
                for (n, u) in &s.usage {
                    if !want.contains_key(n) {
                        prop_assert_eq!(u.vms, 0);
                    }
                }
            }
        }
    }

    fn batch(commands: Vec<VmCommand>) -> Command {
        Command::Batch { commands }
    }

    #[test]
    fn a_batch_is_applied_whole_or_not_at_all() {
        let mut s = with_capacity();
        let before = s.clone();
        let place = |name: &str, node| VmCommand::PlaceVm { name: name.into(), node };
        let create = |name: &str, vcpus| VmCommand::CreateVm { spec: spec(name, vcpus, 512), start: true };
        // The fourth command does not fit (3 + 2 vCPUs on a 4-vCPU node): nothing stays.
        let r = s.apply(&req(10, id(1), batch(vec![create("a", 3), place("a", id(1)), create("b", 2), place("b", id(1))])));
        match r {
            CommandResult::Refused(Refusal::InBatch { index, kind, vm, reason }) => {
                assert_eq!((index, kind.as_str(), vm.as_str()), (3, "place-vm", "b"));
                assert!(reason.contains("does not fit"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s, before);
        // A VM moved twice within a refused batch ends where it was.
        ok(&mut s, id(1), batch(vec![create("a", 3), place("a", id(1))]));
        let placed = s.clone();
        let r = s.apply(&req(11, id(1), batch(vec![place("a", id(2)), place("a", id(1)), place("nope", id(1))])));
        assert!(matches!(r, CommandResult::Refused(Refusal::InBatch { index: 2, .. })), "{r:?}");
        assert_eq!(s, placed);
        // Whole: the same as one by one.
        ok(&mut s, id(1), batch(vec![create("b", 1), place("b", id(2)), place("a", id(2))]));
        assert_eq!((s.vms["a"].node, s.vms["b"].node), (Some(id(2)), Some(id(2))));
        assert_eq!(s.usage[&id(2)].used.cpus, 4);
        assert_eq!(s.usage[&id(1)].used.cpus, 0);
        // Bounded.
        let many = (0..=MAX_BATCH).map(|i| create(&format!("v{i}"), 1)).collect();
        let before = s.clone();
        assert!(matches!(
            s.apply(&req(12, id(1), batch(many))),
            CommandResult::Refused(Refusal::BatchTooLarge { len, .. }) if len == MAX_BATCH as u64 + 1
        ));
        assert_eq!(s, before);
    }

    proptest! {
        /// A batch that is applied leaves the state one-by-one application leaves; a refused
        /// one leaves it as it was, and one by one a command of it is refused too.
        #[test]
        fn a_batch_is_its_commands_one_by_one_or_nothing(
            setup in proptest::collection::vec((0u8..4, 0u8..6, 1u8..3, 1u32..4), 0..20),
            ops in proptest::collection::vec((0u8..4, 0u8..6, 1u8..3, 1u32..4), 0..12),
        ) {
            let vm_cmd = |(op, vm, node, vcpus): (u8, u8, u8, u32)| {
                let name = format!("vm{vm}");
                match op {
                    0 => VmCommand::CreateVm { spec: spec(&name, vcpus, 512), start: true },
                    1 => VmCommand::PlaceVm { name, node: id(node) },
                    2 => VmCommand::SetDesired { name, desired: Desired::Stopped },
                    _ => VmCommand::PlacementFailed { name, reason: "full".into() },
                }
            };
            let mut s = with_capacity();
            for op in setup {
                s.apply(&req(20, id(1), vm_cmd(op).into()));
            }
            let cmds: Vec<VmCommand> = ops.into_iter().map(vm_cmd).collect();
            let mut one_by_one = s.clone();
            let all_ok = cmds.iter().all(|c| one_by_one.apply(&req(21, id(1), c.clone().into())) == CommandResult::Ok);
            let before = s.clone();
            let r = s.apply(&req(21, id(1), batch(cmds)));
            if all_ok {
                prop_assert_eq!(r, CommandResult::Ok);
                prop_assert_eq!(&s, &one_by_one);
            } else {
                prop_assert!(matches!(r, CommandResult::Refused(Refusal::InBatch { .. })), "{:?}", r);
                prop_assert_eq!(&s, &before);
            }
        }
    }

    /// Two 4-vCPU nodes. VMs no node can take (8 vCPUs) come first in name order; the
    /// round still places the new small ones, and tries the failed ones again in turn.
    #[test]
    fn unplaceable_vms_do_not_starve_new_ones() {
        let mut s = with_capacity();
        for i in 0..3 {
            ok(&mut s, id(1), Command::CreateVm { spec: spec(&format!("a-big-{i}"), 8, 512), start: true });
        }
        // The first round fails the big ones and records why.
        let plan = s.plan_placements(s.node_views(|_| true), |_| false, 0, 3);
        assert!(
            plan.iter()
                .all(|p| matches!(p, Placement::Unplaceable { changed: true, .. })),
            "{plan:?}"
        );
        for p in plan {
            if let Placement::Unplaceable { name, reason, .. } = p {
                ok(&mut s, id(1), Command::PlacementFailed { name, reason });
            }
        }
        ok(&mut s, id(1), Command::CreateVm { spec: spec("b-small", 1, 512), start: true });
        // A round of 2: the new VM first, though the big ones sort before it.
        let plan = s.plan_placements(s.node_views(|_| true), |_| false, 0, 2);
        assert!(
            matches!(&plan[0], Placement::Place { name, .. } if name == "b-small"),
            "{plan:?}"
        );
        // Unchanged reasons are not worth a Raft entry.
        assert!(
            matches!(&plan[1], Placement::Unplaceable { changed: false, .. }),
            "{plan:?}"
        );
        // Every failed VM gets its turn as the salt moves.
        let mut tried = BTreeSet::new();
        for salt in 0..3 {
            for p in s.plan_placements(s.node_views(|_| true), |_| false, salt, 2) {
                if let Placement::Unplaceable { name, .. } = p {
                    tried.insert(name);
                }
            }
        }
        assert_eq!(tried.len(), 3, "{tried:?}");
    }

    /// VMs on a lost or drained node move, never back to that node; a round does not
    /// overfill a node (its view is charged as it goes).
    #[test]
    fn lost_and_drained_nodes_hand_their_vms_over_without_overfilling() {
        let mut s = with_capacity();
        for i in 0..2 {
            ok(&mut s, id(1), Command::CreateVm { spec: spec(&format!("v{i}"), 2, 1024), start: true });
            ok(&mut s, id(1), Command::PlaceVm { name: format!("v{i}"), node: id(2) });
        }
        for i in 2..4 {
            ok(&mut s, id(1), Command::CreateVm { spec: spec(&format!("v{i}"), 2, 1024), start: true });
        }
        assert!(
            s.plan_placements(s.node_views(|_| true), |_| false, 0, 10)
                .len()
                == 2,
            "only the two new VMs"
        );
        // Node 2 lost: its two VMs and the two new ones need node 1 (4 vCPUs): two fit.
        let plan = s.plan_placements(s.node_views(|n| *n != id(2)), |n| *n == id(2), 0, 10);
        let placed: Vec<_> = plan
            .iter()
            .filter_map(|p| {
                if let Placement::Place { node, .. } = p {
                    Some(*node)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(placed, vec![id(1), id(1)], "{plan:?}");
        assert_eq!(plan.len(), 4);
        // Drained but alive: the same, and never back onto node 2.
        ok(&mut s, id(1), Command::SetDrain { node: id(2), drain: true });
        let plan = s.plan_placements(s.node_views(|_| true), |_| false, 0, 10);
        assert!(
            plan.iter()
                .all(|p| !matches!(p, Placement::Place { node, .. } if *node == id(2))),
            "{plan:?}"
        );
    }
}

#[test]
fn a_request_sent_twice_is_applied_once() {
    let mut s = bootstrapped();
    let n = id(1);
    let label = |v: &str| Command::SetLabels { node: n, set: BTreeMap::from([("k".to_string(), v.to_string())]), remove: vec![] };
    let first = Request { id: 42, ..req(1, n, label("a")) };
    assert_eq!(s.apply(&first), CommandResult::Ok);
    assert_eq!(s.apply(&req(2, n, label("b"))), CommandResult::Ok);
    // The first write again (a forward that timed out, retried): it succeeded before, so it
    // succeeds again, and changes nothing.
    assert_eq!(s.apply(&first), CommandResult::Ok);
    assert_eq!(s.nodes[&n].labels["k"], "b");
    // Without an id, a request is applied every time.
    assert_eq!(s.apply(&req(3, n, label("a"))), CommandResult::Ok);
    assert_eq!(s.nodes[&n].labels["k"], "a");
    // A refused request leaves no trace: not even its id.
    let before = s.clone();
    let refused = Request { id: 43, ..req(4, n, Command::SetLabels { node: id(9), set: BTreeMap::new(), remove: vec![] }) };
    assert!(matches!(s.apply(&refused), CommandResult::Refused(_)));
    assert_eq!(s, before);
}

#[test]
fn remembered_request_ids_are_bounded_and_survive_encoding() {
    let mut s = bootstrapped();
    let n = id(1);
    for i in 1..=(crate::REMEMBERED_REQUESTS as u128 + 10) {
        let cmd = Command::SetLabels { node: n, set: BTreeMap::from([("k".to_string(), i.to_string())]), remove: vec![] };
        assert_eq!(s.apply(&Request { id: i, ..req(1, n, cmd) }), CommandResult::Ok);
    }
    assert_eq!(s.applied_requests.len(), crate::REMEMBERED_REQUESTS);
    assert!(!s.applied_requests.contains(1), "the oldest ids are forgotten");
    assert!(s.applied_requests.contains(crate::REMEMBERED_REQUESTS as u128 + 10));
    let back: ClusterState = postcard::from_bytes(&postcard::to_allocvec(&s).expect("encode")).expect("decode");
    assert_eq!(back, s);
}
