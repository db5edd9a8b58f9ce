//! Prometheus metrics: `GET /metrics` in the text exposition format, on a TCP address
//! bound to localhost by default. Families: Raft (term, commit/applied index, leadership,
//! leader changes, apply latency), mesh (connections accepted/refused, dials, RPC bytes),
//! cluster (members, VMs, images), this node's VMs by state and VM operations, images
//! (held, fetches, bytes), placement (on the leader).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_mesh::rpc::counters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::node::NodeCtx;

/// Upper bounds of the apply-latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Counters the node updates as it works.
#[derive(Debug, Default)]
pub struct Metrics {
    apply_buckets: [AtomicU64; BUCKETS.len()],
    apply_count: AtomicU64,
    apply_sum_us: AtomicU64,
    pub leader_changes: AtomicU64,
    /// VM operations the executor carried out (create, start, stop, ...), and those that failed.
    pub vm_ops: AtomicU64,
    pub vm_op_failures: AtomicU64,
    /// Image fetches onto this node, failed ones, and payload bytes received.
    pub image_fetches: AtomicU64,
    pub image_fetch_failures: AtomicU64,
    pub image_fetch_bytes: AtomicU64,
    /// Placements recorded by this node as leader, and VMs it could not place.
    pub placements: AtomicU64,
    pub placement_failures: AtomicU64,
}

impl Metrics {
    /// Counts one image fetch and what it received.
    pub fn observe_fetch<E>(&self, r: &Result<blixard_images::FetchStats, E>) {
        self.image_fetches.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(s) => {
                self.image_fetch_bytes.fetch_add(s.bytes_transferred, Ordering::Relaxed);
            }
            Err(_) => {
                self.image_fetch_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Metrics {
    /// Records how long a proposal took from submission to being applied.
    pub fn observe_apply(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.apply_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.apply_count.fetch_add(1, Ordering::Relaxed);
        self.apply_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Renders every family.
pub fn render(ctx: &NodeCtx) -> String {
    let m = ctx.raft.metrics().borrow().clone();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    gauge("blixard_raft_term", "Current Raft term.", "gauge", m.current_term);
    gauge("blixard_raft_last_log_index", "Index of the last log entry.", "gauge", m.last_log_index.unwrap_or(0));
    gauge("blixard_raft_commit_index", "Index of the last applied (committed) entry.", "gauge", m.last_applied.map(|l| l.index).unwrap_or(0));
    gauge("blixard_raft_is_leader", "1 if this node is the leader.", "gauge", u64::from(m.current_leader == Some(ctx.id)));
    gauge("blixard_raft_leader_changes_total", "Leader changes seen by this node.", "counter", ctx.metrics.leader_changes.load(Ordering::Relaxed));
    gauge("blixard_mesh_connections_accepted_total", "Inbound connections accepted after the key check.", "counter", counters::get(&counters::ACCEPTED));
    gauge("blixard_mesh_connections_refused_total", "Inbound connections refused for an unauthorised key.", "counter", counters::get(&counters::REFUSED));
    gauge("blixard_mesh_dials_total", "Outbound connection attempts.", "counter", counters::get(&counters::DIALS));
    gauge("blixard_mesh_dial_failures_total", "Outbound connection attempts that failed.", "counter", counters::get(&counters::DIAL_FAILURES));
    gauge("blixard_mesh_rpc_bytes_sent_total", "Bytes of RPC frames sent.", "counter", counters::get(&counters::BYTES_SENT));
    gauge("blixard_mesh_rpc_bytes_received_total", "Bytes of RPC frames received.", "counter", counters::get(&counters::BYTES_RECEIVED));
    let (members, vms, images, mut by_state) = {
        let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
        let mut by_state = std::collections::BTreeMap::new();
        for v in st.state.vms.values().filter(|v| v.node == Some(ctx.id)) {
            *by_state.entry(v.state.to_string()).or_insert(0u64) += 1;
        }
        (st.state.nodes.len() as u64, st.state.vms.len() as u64, st.state.images.len() as u64, by_state)
    };
    gauge("blixard_cluster_members", "Members in the applied cluster state.", "gauge", members);
    gauge("blixard_cluster_vms", "VMs in the applied cluster state.", "gauge", vms);
    gauge("blixard_cluster_images", "Images in the catalogue.", "gauge", images);
    gauge("blixard_node_images_held", "Images held complete on this node.", "gauge", ctx.images.held().len() as u64);
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let m2 = &ctx.metrics;
    gauge("blixard_node_vm_operations_total", "VM operations carried out by this node's reconciler.", "counter", c(&m2.vm_ops));
    gauge("blixard_node_vm_operation_failures_total", "VM operations that failed.", "counter", c(&m2.vm_op_failures));
    gauge("blixard_node_image_fetches_total", "Image fetches onto this node.", "counter", c(&m2.image_fetches));
    gauge("blixard_node_image_fetch_failures_total", "Image fetches that failed.", "counter", c(&m2.image_fetch_failures));
    gauge("blixard_node_image_fetch_bytes_total", "Image bytes received from peers.", "counter", c(&m2.image_fetch_bytes));
    gauge("blixard_placements_total", "VMs placed by this node as leader.", "counter", c(&m2.placements));
    gauge("blixard_placement_failures_total", "Placement attempts that found no node.", "counter", c(&m2.placement_failures));
    let name = "blixard_node_vms";
    let _ = writeln!(out, "# HELP {name} VMs placed on this node, by the state it reported.\n# TYPE {name} gauge");
    for st in ["pending", "fetching", "starting", "running", "paused", "stopped", "failed"] {
        let _ = writeln!(out, "{name}{{state=\"{st}\"}} {}", by_state.remove(st).unwrap_or(0));
    }
    let name = "blixard_raft_apply_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Time from proposing a command to it being applied, on the leader.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", ctx.metrics.apply_buckets[i].load(Ordering::Relaxed));
    }
    let count = ctx.metrics.apply_count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", ctx.metrics.apply_sum_us.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {count}");
    out
}

/// Binds the metrics listener; a failure is logged, not fatal (metrics are optional).
pub async fn bind(addr: SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve metrics (use --metrics-listen ADDR, or off)");
            None
        }
    }
}

/// Serves `GET /metrics` until the listener is dropped.
pub async fn serve(listener: TcpListener, ctx: NodeCtx) {
    loop {
        let Ok((mut sock, peer)) = listener.accept().await else { return };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                ("200 OK", render(&ctx))
            } else {
                ("404 Not Found", "only /metrics is served here\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                debug!(%peer, error = %e, "metrics client went away");
            }
        });
    }
}

/// Counts leader changes seen in the Raft metrics.
pub async fn watch_leader(ctx: NodeCtx, metrics: Arc<Metrics>) {
    let mut rx = ctx.raft.metrics();
    let mut last = rx.borrow().current_leader;
    while rx.changed().await.is_ok() {
        let now = rx.borrow().current_leader;
        if now != last && now.is_some() {
            metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
        last = now;
    }
}
