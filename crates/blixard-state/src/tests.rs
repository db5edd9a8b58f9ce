use super::*;
use blixard_types::ticket::secret_hash;

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}

fn req(at_ms: u64, by: NodeId, cmd: Command) -> Request {
    Request { at_ms, by, cmd }
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
