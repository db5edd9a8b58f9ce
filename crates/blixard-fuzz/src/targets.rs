//! The decoders under test, each with valid encodings to mutate. A target must never
//! panic and never hang, whatever the bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blixard_images::manifest::{
    Bundle, ChunkedFile, FilePart, Image, Manifest, ManifestV1, NixClosure, StorePathEntry,
};
use blixard_images::have::HaveMsg;
use blixard_images::Hash;
use blixard_raft::network::{RaftRpc, RaftRpcResponse};
use blixard_state::ClusterState;
use blixard_types::command::{NodeInfo, Resources, VmCommand};
use blixard_types::gossip::{GossipMessage, NodeHealth};
use blixard_types::rpc::{ClientRequest, ClientResponse, JoinRequest, JoinResponse};
use blixard_types::ticket::PeerAddr;
use blixard_types::vm::VmSpec;
use blixard_types::{frame, ClusterId, Command, NodeId, Request, Role, Ticket};

/// Runs one input through a decoder; true if it decoded.
pub type Decoder = Box<dyn Fn(&[u8]) -> bool>;

pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    /// Whether the input decoded (the share that does shows how deep the mutations reach).
    pub run: Decoder,
}

fn ticket() -> Ticket {
    Ticket {
        cluster_id: ClusterId([3; 16]),
        role: Role::Voter,
        expires_at_ms: 1_900_000_000_000,
        secret: [9; 32],
        peers: vec![PeerAddr {
            id: NodeId([5; 32]),
            addrs: vec!["127.0.0.1:4433".parse().unwrap_or_else(|_| unreachable!())],
        }],
    }
}

fn spec() -> VmSpec {
    VmSpec {
        name: "web-1".into(),
        image: "app".into(),
        vcpus: 2,
        memory_mib: 512,
        disk_gib: 4,
        labels: BTreeMap::from([("tier".into(), "web".into())]),
        constraints: BTreeMap::from([("zone".into(), "a".into())]),
        anti_affinity: Some("web".into()),
        restart: Default::default(),
        health: None,
    }
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

/// The length prefix of a frame is checked on its own (`body_len`); targets see bodies.
fn prefix_ok(b: &[u8]) -> bool {
    b.first_chunk::<4>()
        .is_some_and(|p| frame::body_len(*p).is_ok())
}

/// NAR strings: length (u64 LE), bytes, zero padding to 8.
fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

fn nar_sample() -> Vec<u8> {
    let mut n = Vec::new();
    for s in [
        "nix-archive-1",
        "(",
        "type",
        "directory",
        "entry",
        "(",
        "name",
        "bin",
        "node",
        "(",
        "type",
        "regular",
        "executable",
        "",
        "contents",
    ] {
        nar_str(&mut n, s.as_bytes());
    }
    nar_str(&mut n, b"#!/bin/sh\necho hi\n");
    for s in [
        ")", ")", "entry", "(", "name", "link", "node", "(", "type", "symlink", "target", "bin",
        ")", ")", ")",
    ] {
        nar_str(&mut n, s.as_bytes());
    }
    n
}

fn manifests() -> Vec<Vec<u8>> {
    let a = "/nix/store/09pmdb5hvvn7gvd2dhwnqi3kc6vb4zi6-initrd.txt".to_string();
    let b = "/nix/store/kb0gpxyssfqcnzsflnqa9g0yq0gr6zig-microvm-runner".to_string();
    let closure = Manifest::V1(ManifestV1 {
        parts_size: 10,
        image: Image::NixClosure(NixClosure {
            entry: b.clone(),
            paths: vec![
                StorePathEntry {
                    store_path: a.clone(),
                    nar_hash: [1; 32],
                    nar_size: 5,
                    references: vec![],
                    blob: Hash::new(b"a"),
                },
                StorePathEntry {
                    store_path: b,
                    nar_hash: [2; 32],
                    nar_size: 5,
                    references: vec![a],
                    blob: Hash::new(b"b"),
                },
            ],
        }),
    });
    let bundle = Manifest::V1(ManifestV1 {
        parts_size: 30,
        image: Image::Bundle(Bundle {
            kernel: FilePart {
                blob: Hash::new(b"k"),
                size: 10,
            },
            initrd: FilePart {
                blob: Hash::new(b"i"),
                size: 10,
            },
            disk: Some(ChunkedFile {
                chunks: Hash::new(b"c"),
                size: 10,
                chunk_count: 2,
            }),
            cmdline: "console=ttyS0".into(),
        }),
    });
    vec![closure.encode(), bundle.encode()]
}

fn cluster_state() -> Vec<u8> {
    let mut s = ClusterState::default();
    let n = NodeId([1; 32]);
    let info = NodeInfo {
        addrs: vec![],
        resources: Resources {
            cpus: 8,
            memory_mib: 8192,
            disk_gib: 100,
        },
        labels: BTreeMap::new(),
    };
    let at = |cmd| Request {
        at_ms: 1,
        by: n,
        cmd,
        id: 0,
    };
    s.apply(&at(Command::Bootstrap {
        cluster_id: ClusterId([1; 16]),
        node: n,
        info,
    }));
    s.apply(&at(Command::PublishImage {
        hash: "ab".repeat(32),
        size: 1,
        kind: blixard_types::image::ImageKind::Bundle,
        name: Some("app".into()),
    }));
    s.apply(&at(Command::CreateVm {
        spec: spec(),
        start: true,
    }));
    s.apply(&at(Command::PlaceVm {
        name: "web-1".into(),
        node: n,
    }));
    enc(&s)
}

pub fn all(scratch: &Path) -> Vec<Target> {
    let key = iroh_base::SecretKey::from_bytes(&[4; 32]);
    let health = GossipMessage::Health(NodeHealth {
        seq: 7,
        incarnation: 9,
        free: Resources {
            cpus: 4,
            memory_mib: 4096,
            disk_gib: 10,
        },
        vms_running: vec!["web-1".into()],
        images: vec!["ab".repeat(32)],
        hears: vec![blixard_types::NodeId([5; 32])],
    });
    let nar_dir: PathBuf = scratch.join("nar");
    vec![
        Target {
            name: "ticket",
            seeds: vec![ticket().encode().into_bytes()],
            run: Box::new(|b| {
                Ticket::decode(&String::from_utf8_lossy(b)).is_ok()
            }),
        },
        Target {
            name: "client-rpc",
            seeds: vec![
                enc(&ClientRequest::Status),
                enc(&ClientRequest::CreateTicket { role: Role::Learner, ttl_ms: 60_000 }),
                enc(&ClientResponse::Error(blixard_types::rpc::ApiError::NoLeader)),
            ],
            run: Box::new(|b| {
                let _ = prefix_ok(b);
                frame::decode::<ClientRequest>(b).is_ok() | frame::decode::<ClientResponse>(b).is_ok()
            }),
        },
        Target {
            name: "join-rpc",
            seeds: vec![
                enc(&JoinRequest::Node { ticket: ticket(), info: NodeInfo::default() }),
                enc(&JoinResponse::Admitted { cluster_id: ClusterId([3; 16]), role: Role::Voter }),
            ],
            run: Box::new(|b| {
                frame::decode::<JoinRequest>(b).is_ok() | frame::decode::<JoinResponse>(b).is_ok()
            }),
        },
        Target {
            name: "raft-rpc",
            seeds: vec![Vec::new()],
            run: Box::new(|b| {
                frame::decode::<RaftRpc>(b).is_ok() | frame::decode::<RaftRpcResponse>(b).is_ok()
            }),
        },
        Target {
            name: "raft-entry",
            seeds: vec![
                enc(&Request { at_ms: 5, by: NodeId([1; 32]), cmd: Command::CreateVm { spec: spec(), start: true }, id: 7 }),
                enc(&Request { at_ms: 5, by: NodeId([1; 32]), cmd: Command::AdmitNode { node: NodeId([2; 32]), info: NodeInfo::default(), secret_hash: [3; 32], role: Role::Voter }, id: 0 }),
                enc(&Request {
                    at_ms: 5,
                    by: NodeId([1; 32]),
                    cmd: Command::Batch {
                        commands: vec![
                            VmCommand::CreateVm { spec: spec(), start: true },
                            VmCommand::PlaceVm { name: "web-1".into(), node: NodeId([2; 32]) },
                        ],
                    },
                    id: 9,
                }),
            ],
            run: Box::new(|b| {
                postcard::from_bytes::<Request>(b).is_ok()
            }),
        },
        Target {
            name: "snapshot",
            seeds: vec![cluster_state()],
            run: Box::new(|b| {
                postcard::from_bytes::<ClusterState>(b).is_ok()
            }),
        },
        Target {
            name: "manifest",
            seeds: manifests(),
            run: Box::new(|b| {
                Manifest::decode(b).is_ok()
            }),
        },
        Target {
            name: "image-have",
            seeds: vec![
                enc(&HaveMsg::Bits { n: 20, bits: vec![0b1010_0101, 0xff, 0x0f] }),
                enc(&HaveMsg::Parts(vec![1, 7, 4_000_000])),
                enc(&HaveMsg::All),
            ],
            run: Box::new(|b| {
                HaveMsg::decode(b).is_ok_and(|m| match m {
                    HaveMsg::Bits { n, bits } => blixard_images::have::HaveBits::from_msg(n, bits).is_some(),
                    _ => true,
                })
            }),
        },
        Target {
            name: "gossip",
            seeds: vec![blixard_mesh::signed::sign(&key, enc(&health))],
            run: Box::new(|b| {
                // Forged signatures stop at verify; decode the body as well, so the message
                // decoder sees mutated bytes too.
                blixard_mesh::signed::verify(b).is_ok() | postcard::from_bytes::<GossipMessage>(b).is_ok()
            }),
        },
        Target {
            name: "nar",
            seeds: vec![nar_sample()],
            run: Box::new(move |b| {
                let _ = std::fs::remove_dir_all(&nar_dir);
                blixard_images::nix::unpack_nar(b, &nar_dir).is_ok()
            }),
        },
        Target {
            name: "vm-spec",
            seeds: vec![enc(&spec())],
            run: Box::new(|b| {
                postcard::from_bytes::<VmSpec>(b).is_ok_and(|s| s.validate().is_ok())
            }),
        },
        Target {
            name: "vmm-spec-json",
            seeds: vec![br#"{"name":"vm1","vcpus":1,"memory_mib":256,"boot":{"kind":"bundle","kernel":"/k","initrd":"/i","cmdline":"console=ttyS0"},"health":[],"stop_timeout_ms":5000}"#.to_vec()],
            run: Box::new(|b| {
                serde_json::from_slice::<blixard_vmm::spec::VmSpec>(b).is_ok()
            }),
        },
        Target {
            name: "qmp",
            seeds: vec![br#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}"#.to_vec(), br#"{"return": {"status": "running", "running": true}, "id": 3}"#.to_vec()],
            run: Box::new(|b| {
                blixard_vmm::qmp::parse_qmp_line(&String::from_utf8_lossy(b)).is_ok()
            }),
        },
        Target {
            name: "http",
            seeds: vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}".to_vec()],
            run: Box::new(|b| {
                blixard_vmm::http::parse_response(b, false).is_ok() | blixard_vmm::http::parse_response(b, true).is_ok()
            }),
        },
    ]
}
