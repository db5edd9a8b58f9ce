//! Client-chosen request ids, with a real node (iroh on loopback, redb) and the real client:
//! a write sent again under the same id, after another write, is not carried out again.

use std::collections::BTreeMap;
use std::time::Duration;

use blixard_node::client::Client;
use blixard_node::{Node, NodeConfig, StartMode};
use blixard_types::rpc::{ClientRequest, ClientResponse};
use blixard_types::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_again_under_its_id_is_carried_out_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let a = Node::start(NodeConfig::new(root.path().join("a"), StartMode::Init)).await.expect("init");
    let ticket = blixard_node::client_api::issue_ticket(a.ctx(), a.id(), Role::Client, u64::MAX).await.expect("ticket");
    let client = Client::new(iroh::SecretKey::from_bytes(&rand::random()), ticket).await.expect("client");
    let label = |v: &str| ClientRequest::Label { node: a.id().to_string(), set: BTreeMap::from([("k".to_string(), v.to_string())]), remove: vec![] };
    let t = Duration::from_secs(15);
    client.request_as(7, &label("first"), t).await.expect("first");
    client.request(&label("second")).await.expect("second");
    // The first write again, as a client does after a lost answer: acknowledged, not redone.
    client.request_as(7, &label("first"), t).await.expect("first, again");
    let ClientResponse::Status(s) = client.request(&ClientRequest::Status).await.expect("status") else { panic!("not a status") };
    let me = s.members.iter().find(|m| m.id == a.id()).expect("member");
    assert_eq!(me.labels.get("k").map(String::as_str), Some("second"));
    // A new id is a new write.
    client.request_as(8, &label("first"), t).await.expect("third");
    let ClientResponse::Status(s) = client.request(&ClientRequest::Status).await.expect("status") else { panic!("not a status") };
    assert_eq!(s.members.iter().find(|m| m.id == a.id()).expect("member").labels.get("k").map(String::as_str), Some("first"));
    a.shutdown().await;
}
