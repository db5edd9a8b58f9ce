//! Timing-sensitive fault tests on real processes: leader failover and gossip failure
//! detection. They run one at a time (and in their own test binary, so no other cluster
//! test shares the CPU) because their assertions are about wall-clock bounds.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// Serialises the tests of this binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn leader_failover_restart_and_full_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_nodes();
    let s = c.status().expect("status");
    let old = leader(&s).expect("leader");
    let old_i = c.index_of(&old);
    // Poll through a ticket that lists the survivors first, so no poll waits on the dead.
    let mut t = blixard_types::Ticket::decode(c.client_ticket.as_deref().expect("ticket")).expect("decode");
    t.peers.sort_by_key(|p| p.id.to_string() == old);
    c.client_ticket = Some(t.encode());
    let killed_at = Instant::now();
    c.kill9(old_i);
    // Ask the survivors themselves (no forwarding through the dead leader).
    let survivors: Vec<String> = c.nodes.iter().filter(|n| n.id != old).map(|n| n.id.clone()).collect();
    let new = wait_for("a new leader", Duration::from_secs(10), || {
        survivors.iter().find_map(|id| {
            let v = c.json(&["node", "status", id]).ok()?;
            (v["state"] == "leader").then(|| id.clone())
        })
    });
    let failover = killed_at.elapsed();
    eprintln!("failover: new leader {} after {failover:?}", &new[..10]);
    assert!(failover < Duration::from_secs(2), "failover took {failover:?}");
    // Writes continue without the old leader.
    let other = c.nodes.iter().find(|n| n.id != old).expect("other").id.clone();
    c.cli_ok(&["node", "label", &other, "written=while-down"]);
    // The old leader restarts, rejoins and has everything committed meanwhile.
    c.restart(old_i);
    let leader_now = leader(&c.status().expect("status")).expect("leader");
    let want = c.json(&["node", "status", &leader_now]).expect("leader status")["state_digest"].clone();
    wait_for("restarted node caught up", Duration::from_secs(10), || {
        let v = c.json(&["node", "status", &old]).ok()?;
        (v["state_digest"] == want).then_some(())
    });
    // Stop all three cleanly, start all three again: state intact.
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        c.restart(i);
    }
    let s = wait_for("cluster back after full restart", Duration::from_secs(20), || {
        let s = c.status().ok()?;
        (count_role(&s, "voter") == 3 && leader(&s).is_some()).then_some(s)
    });
    let m = members(&s).into_iter().find(|m| m["id"] == other.as_str()).expect("member");
    assert_eq!(m["labels"]["written"], "while-down", "{s:#}");
}

#[test]
fn gossip_sees_a_dead_node_within_three_seconds() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_nodes();
    let victim = c.nodes[2].id.clone();
    // Everyone sees everyone alive first.
    wait_for("all peers alive", Duration::from_secs(10), || {
        c.nodes.iter().all(|n| {
            c.json(&["node", "status", &n.id])
                .ok()
                .is_some_and(|v| v["peers"].as_object().is_some_and(|p| p.len() == 2 && p.values().all(|s| s == "alive")))
        })
        .then_some(())
    });
    let killed = Instant::now();
    c.kill9(2);
    let survivors: Vec<String> = c.nodes[..2].iter().map(|n| n.id.clone()).collect();
    let mut seen_dead = vec![None; 2];
    while seen_dead.iter().any(Option::is_none) && killed.elapsed() < Duration::from_secs(10) {
        for (i, id) in survivors.iter().enumerate() {
            if seen_dead[i].is_none() {
                let v = c.json(&["node", "status", id]).expect("node status");
                if v["peers"][&victim] == "dead" {
                    seen_dead[i] = Some(killed.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("dead seen after {seen_dead:?}");
    for t in &seen_dead {
        let t = t.expect("every survivor sees the node dead");
        // 3 s budget, plus the time one CLI poll takes.
        assert!(t < Duration::from_millis(3300), "took {t:?}");
    }
    let s = c.status().expect("status");
    let m = members(&s).into_iter().find(|m| m["id"] == victim.as_str()).expect("member");
    assert_eq!(m["healthy"], false);
    assert_eq!(m["state"], "dead");
}

/// Every other node's view of `id` (from `node status`), `None` if a node did not answer.
fn seen_by_others(c: &Cluster, id: &str) -> Vec<Option<String>> {
    c.nodes
        .iter()
        .filter(|n| n.id != id)
        .map(|n| c.json(&["node", "status", &n.id]).ok().and_then(|v| v["peers"][id].as_str().map(str::to_string)))
        .collect()
}

/// A node killed with -9 and restarted on the same address is heard again by every other
/// node within seconds, every time (the restarted process is a new gossip peer behind a
/// key and address the others still hold a connection for).
#[test]
fn a_restarted_node_is_heard_again_every_time() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_nodes();
    let rounds: usize = std::env::var("BLIXARD_RESTART_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let mut took = Vec::new();
    for round in 0..rounds {
        let i = 1 + round % 2;
        let id = c.nodes[i].id.clone();
        wait_for("every node alive before the kill", Duration::from_secs(15), || {
            seen_by_others(&c, &id).iter().all(|s| s.as_deref() == Some("alive")).then_some(())
        });
        c.kill9(i);
        // Short and long downtimes: before and after the others see it dead (2.5 s).
        std::thread::sleep(Duration::from_millis([200, 3500, 800][round % 3]));
        c.restart(i);
        let restarted = Instant::now();
        let mut last;
        let heard = loop {
            last = seen_by_others(&c, &id);
            // Before 3 s "alive" may still be the killed process's last report.
            if restarted.elapsed() > Duration::from_secs(3) && last.iter().all(|s| s.as_deref() == Some("alive")) {
                break Some(restarted.elapsed());
            }
            if restarted.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let heard = heard.unwrap_or_else(|| panic!("round {round}: node {i} restarted, not heard within 10 s: {last:?}"));
        took.push(heard);
    }
    eprintln!("heard again after {took:?}");
}
