//! Unknown keys and bad tickets, against real node processes: refused on every protocol,
//! and nothing in cluster state changes. Secrets never reach the logs.

mod common;

use std::time::Duration;

use blixard_mesh::rpc::{Pool, RpcError};
use blixard_mesh::{alpn, endpoint};
use blixard_types::rpc::{ClientRequest, ClientResponse, JoinRequest, JoinResponse};
use blixard_types::{Role, Ticket};
use common::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// A stranger: a fresh key the cluster has never seen.
async fn stranger() -> iroh::Endpoint {
    endpoint::bind(endpoint::EndpointOptions {
        secret_key: iroh::SecretKey::generate(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        relay: None,
        alpns: vec![],
        lookup: None,
    })
    .await
    .expect("bind")
}

fn digest(c: &Cluster) -> String {
    c.json(&["node", "status", &c.nodes[0].id]).expect("node status")["state_digest"].to_string()
}

#[test]
fn unknown_keys_and_bad_tickets_are_refused() {
    let mut c = Cluster::new();
    c.init();
    let t = c.ticket("voter", "10m");
    c.join(1, &t).expect("join");
    c.refresh_client_ticket();
    // Make every ticket up front: issuing one is itself a write.
    let learner = c.ticket("learner", "10m");
    let expiring = c.ticket("voter", "1s");
    let client = c.client_ticket.clone().expect("client ticket");
    let mut other = Cluster::new();
    other.init();
    let foreign = other.ticket("voter", "10m");
    std::thread::sleep(Duration::from_millis(1200)); // let `expiring` expire
    let before = digest(&c);
    let members_before = members(&c.status().expect("status")).len();

    let target = Ticket::decode(&t).expect("ticket").peers[0].clone();
    let rt = runtime();
    rt.block_on(async {
        let ep = stranger().await;
        // Raft and the client API refuse an unknown key before reading anything.
        for a in [alpn::RAFT, alpn::CLIENT] {
            let pool = Pool::new(ep.clone(), a);
            let r: Result<ClientResponse, RpcError> =
                pool.call(&target.id, &target.addrs, &ClientRequest::Status, Duration::from_secs(5)).await;
            assert!(matches!(r, Err(RpcError::Refused { .. })), "{}: {r:?}", String::from_utf8_lossy(a));
        }
        // Gossip, blobs and the image have-state sit behind the same gate: the handshake
        // completes (the key is authenticated), then the connection is closed as
        // unauthorised, unused.
        for a in [alpn::GOSSIP, blixard_images::ALPN, blixard_images::HAVE_ALPN] {
            let addr = blixard_mesh::endpoint_addr(&target.id, &target.addrs).expect("addr");
            let name = String::from_utf8_lossy(a).to_string();
            let conn = ep.connect(addr, a).await.expect("handshake");
            let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .unwrap_or_else(|_| panic!("{name}: connection from a stranger stayed open"));
            match reason {
                iroh::endpoint::ConnectionError::ApplicationClosed(c) => assert_eq!(
                    c.error_code,
                    iroh::endpoint::VarInt::from_u32(blixard_mesh::rpc::CLOSE_UNAUTHORIZED),
                    "{name}: {c:?}"
                ),
                other => panic!("{name}: closed for another reason: {other:?}"),
            }
        }
        // Join is open, but only to valid tickets of this cluster with the right role.
        let join = Pool::new(ep.clone(), alpn::JOIN);
        let ask = |ticket: Ticket| {
            let join = join.clone();
            let target = target.clone();
            async move {
                let req = JoinRequest::Node { ticket, info: Default::default() };
                join.call::<_, JoinResponse>(&target.id, &target.addrs, &req, Duration::from_secs(10)).await
            }
        };
        let expect_refused = |r: Result<JoinResponse, RpcError>, want: &str| match r {
            Ok(JoinResponse::Refused(reason)) => assert!(reason.contains(want), "wanted {want:?}, got {reason:?}"),
            other => panic!("wanted a refusal containing {want:?}, got {other:?}"),
        };
        let mut guessed = Ticket::decode(&t).expect("ticket");
        guessed.secret = [7; 32];
        expect_refused(ask(guessed).await, "unknown ticket");
        expect_refused(ask(Ticket::decode(&expiring).expect("ticket")).await, "expired");
        let mut promoted = Ticket::decode(&learner).expect("ticket");
        promoted.role = Role::Voter;
        expect_refused(ask(promoted).await, "grants the learner role");
        let mut wrong = Ticket::decode(&foreign).expect("ticket");
        wrong.peers = Ticket::decode(&t).expect("ticket").peers;
        expect_refused(ask(wrong).await, "is for cluster");
        expect_refused(ask(Ticket::decode(&client).expect("ticket")).await, "client ticket cannot make a node join");
        // A node ticket does not authorise a CLI key.
        let req = JoinRequest::Client { ticket: Ticket::decode(&t).expect("ticket") };
        let r = join.call::<_, JoinResponse>(&target.id, &target.addrs, &req, Duration::from_secs(10)).await;
        expect_refused(r, "grants the voter role, not client");
        // Garbage on the join protocol closes the connection; the node keeps serving.
        let r: Result<JoinResponse, RpcError> =
            join.call(&target.id, &target.addrs, &vec![0xffu8; 64], Duration::from_secs(5)).await;
        assert!(r.is_err(), "{r:?}");
        ep.close().await;
    });

    // A tampered ticket string is caught before any connection (checksum).
    let mut bad = t.clone().into_bytes();
    let i = bad.len() / 2;
    bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
    let bad = String::from_utf8(bad).expect("ascii");
    let err = c.spawn(&c.node_dir(7), &["--join", &bad]).expect_err("tampered ticket must fail");
    assert!(err.contains("checksum") || err.contains("base32"), "{err}");

    // Nothing changed.
    assert_eq!(digest(&c), before, "cluster state changed after refused requests");
    assert_eq!(members(&c.status().expect("status")).len(), members_before);

    // A revoked ticket is refused from then on.
    let made = c.json(&["cluster", "ticket", "--role", "voter"]).expect("ticket");
    c.cli_ok(&["cluster", "revoke-ticket", made["id"].as_str().expect("id")]);
    let err = c.spawn(&c.node_dir(8), &["--join", made["ticket"].as_str().expect("ticket")]).expect_err("revoked");
    assert!(err.contains("revoked"), "{err}");
    // The failed join left nothing to resume: a plain restart says so; a valid ticket works.
    let err = c.spawn(&c.node_dir(8), &[]).expect_err("nothing to resume");
    assert!(err.contains("holds no cluster yet"), "{err}");
    let fresh = c.ticket("voter", "10m");
    c.spawn(&c.node_dir(8), &["--join", &fresh]).expect("join after a failed join");

    // Secrets never appear in logs: no ticket string, no part of it.
    for n in c.nodes.iter().chain(other.nodes.iter()) {
        let log = c.log_of(&n.dir) + &other.log_of(&n.dir);
        for secret in [&t, &learner, &expiring, &client, &foreign] {
            assert!(!log.contains(&secret[7..40]), "a ticket appears in the log of {}", n.dir.display());
        }
    }
}
