use super::*;
use blixard_types::vm::RestartPolicy;
use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

fn node(i: u8, cpus: u32, mem: u64) -> NodeView {
    NodeView {
        id: NodeId([i; 32]),
        capacity: Resources { cpus, memory_mib: mem, disk_gib: 100 },
        schedulable: true,
        ..Default::default()
    }
}

fn spec(vcpus: u32, mem: u64) -> VmSpec {
    VmSpec {
        name: "vm".into(),
        image: "img".into(),
        vcpus,
        memory_mib: mem,
        disk_gib: 1,
        labels: BTreeMap::new(),
        constraints: BTreeMap::new(),
        anti_affinity: None,
        restart: RestartPolicy::Always,
        health: None,
    }
}

#[test]
fn binpack_fills_the_fullest_spread_the_emptiest() {
    let mut a = node(1, 8, 8192);
    a.used = Resources { cpus: 6, memory_mib: 6000, disk_gib: 0 };
    let b = node(2, 8, 8192);
    let nodes = [a, b];
    let p = Policy::default();
    assert_eq!(place(&nodes, &spec(1, 512), &p, 0), Ok(NodeId([1; 32])));
    let p = Policy { strategy: Strategy::Spread, ..Policy::default() };
    assert_eq!(place(&nodes, &spec(1, 512), &p, 0), Ok(NodeId([2; 32])));
}

#[test]
fn filters_report_reasons() {
    let mut down = node(1, 8, 8192);
    down.schedulable = false;
    let small = node(2, 1, 8192);
    let mut labelled = node(3, 8, 8192);
    labelled.labels.insert("zone".into(), "b".into());
    let mut s = spec(2, 512);
    s.constraints.insert("zone".into(), "a".into());
    let err = place(&[down, small, labelled], &s, &Policy::default(), 0).expect_err("nothing fits");
    assert_eq!(err.reasons[&Reason::NotSchedulable], 1);
    assert_eq!(err.reasons[&Reason::Cpu], 1);
    assert_eq!(err.reasons[&Reason::Constraint("zone=a".into())], 1);
    assert!(err.to_string().contains("not enough free vCPUs (1 nodes)"), "{err}");
    assert_eq!(place(&[], &s, &Policy::default(), 0).expect_err("empty").to_string(), "no nodes in the cluster");
}

#[test]
fn overcommit_anti_affinity_and_image_locality() {
    let mut a = node(1, 2, 1024);
    a.used = Resources { cpus: 2, memory_mib: 0, disk_gib: 0 };
    assert_eq!(place(&[a.clone()], &spec(1, 64), &Policy::default(), 0).map_err(|e| e.reasons), Err([(Reason::Cpu, 1)].into()));
    let p = Policy { cpu_overcommit_pct: 200, ..Policy::default() };
    assert_eq!(place(&[a.clone()], &spec(1, 64), &p, 0), Ok(a.id));

    let mut g = node(1, 8, 8192);
    g.groups.insert("db".into());
    let h = node(2, 8, 8192);
    let mut s = spec(1, 64);
    s.anti_affinity = Some("db".into());
    assert_eq!(place(&[g, h], &s, &Policy::default(), 0), Ok(NodeId([2; 32])));

    // Equal nodes: the one holding the image wins over the id tie-break.
    let x = node(1, 8, 8192);
    let mut y = node(2, 8, 8192);
    y.images.insert("img".into());
    assert_eq!(place(&[x, y], &spec(1, 64), &Policy::default(), 0), Ok(NodeId([2; 32])));
}

#[test]
fn sampling_scores_a_bounded_number_of_nodes() {
    let nodes: Vec<NodeView> = (0..100).map(|i| node(i, 8, 8192)).collect();
    let p = Policy { sample: Some(3), ..Policy::default() };
    // Different salts start at different nodes; same salt, same answer.
    let a = place(&nodes, &spec(1, 64), &p, 10).expect("fits");
    let b = place(&nodes, &spec(1, 64), &p, 10).expect("fits");
    let c = place(&nodes, &spec(1, 64), &p, 50).expect("fits");
    assert_eq!(a, b);
    assert_ne!(a, c);
}

proptest! {
    /// Whatever the cluster, a placement always satisfies every filter, and a refusal
    /// means no node fits.
    #[test]
    fn placements_always_fit(
        caps in proptest::collection::vec((1u32..16, 256u64..16384, 0u32..16, 0u64..16384, any::<bool>()), 0..12),
        vcpus in 1u32..8, mem in 64u64..4096, spread in any::<bool>(), salt in any::<u64>(), sample in proptest::option::of(1usize..5),
    ) {
        let nodes: Vec<NodeView> = caps.iter().enumerate().map(|(i, (c, m, uc, um, up))| {
            let mut n = node(i as u8, *c, *m);
            n.used = Resources { cpus: *uc, memory_mib: *um, disk_gib: 0 };
            n.schedulable = *up;
            n
        }).collect();
        let p = Policy { strategy: if spread { Strategy::Spread } else { Strategy::Binpack }, sample, ..Policy::default() };
        let s = spec(vcpus, mem);
        match place(&nodes, &s, &p, salt) {
            Ok(id) => {
                let n = nodes.iter().find(|n| n.id == id).expect("placed on a known node");
                prop_assert!(fits(n, &s, &p).is_ok());
            }
            Err(u) => {
                prop_assert!(nodes.iter().all(|n| fits(n, &s, &p).is_err()));
                prop_assert_eq!(u.reasons.values().sum::<usize>(), nodes.len());
            }
        }
    }
}
