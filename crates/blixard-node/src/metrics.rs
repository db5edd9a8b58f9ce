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
const APPLY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Upper bounds of the VM boot histogram (start to ready), in seconds.
const BOOT_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Cumulative: bucket i counts observations <= bounds[i].
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(), count: AtomicU64::new(0), sum_us: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            if secs <= *b {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", n.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Counters the node updates as it works.
#[derive(Debug)]
pub struct Metrics {
    /// Time from proposing a command to it being applied, on the leader.
    pub apply: Histogram,
    /// Time from starting a VM to its guest being ready.
    pub boot: Histogram,
    pub leader_changes: AtomicU64,
    /// Image payload bytes received, per providing peer.
    pub fetch_bytes_by_peer: std::sync::Mutex<std::collections::BTreeMap<blixard_types::NodeId, u64>>,
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

impl Default for Metrics {
    fn default() -> Self {
        Self {
            apply: Histogram::new(APPLY_BUCKETS),
            boot: Histogram::new(BOOT_BUCKETS),
            leader_changes: Default::default(),
            fetch_bytes_by_peer: Default::default(),
            vm_ops: Default::default(),
            vm_op_failures: Default::default(),
            image_fetches: Default::default(),
            image_fetch_failures: Default::default(),
            image_fetch_bytes: Default::default(),
            placements: Default::default(),
            placement_failures: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts one image fetch and what it received.
    pub fn observe_fetch<E>(&self, r: &Result<blixard_images::FetchStats, E>) {
        self.image_fetches.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(s) => {
                self.image_fetch_bytes.fetch_add(s.bytes_transferred, Ordering::Relaxed);
                let mut by_peer = self.fetch_bytes_by_peer.lock().unwrap_or_else(|p| p.into_inner());
                for p in s.providers.iter().filter(|p| p.bytes > 0) {
                    *by_peer.entry(blixard_mesh::node_id(&p.id)).or_default() += p.bytes;
                }
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
        self.apply.observe(d);
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
    let held = ctx.images.held();
    let held_bytes: u64 = {
        let st = ctx.state.read().unwrap_or_else(|p| p.into_inner());
        held.iter().filter_map(|h| st.state.images.get(h)).map(|i| i.size).sum()
    };
    gauge("blixard_node_images_held", "Images held complete on this node.", "gauge", held.len() as u64);
    gauge("blixard_node_image_store_bytes", "Bytes of the catalogued images held on this node.", "gauge", held_bytes);
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
    ctx.metrics.apply.render(&mut out, "blixard_raft_apply_latency_seconds", "Time from proposing a command to it being applied, on the leader.");
    ctx.metrics.boot.render(&mut out, "blixard_node_vm_boot_seconds", "Time from starting a VM on this node to its guest being ready.");
    let name = "blixard_node_image_fetch_peer_bytes_total";
    let _ = writeln!(out, "# HELP {name} Image bytes received from each peer.\n# TYPE {name} counter");
    for (peer, bytes) in ctx.metrics.fetch_bytes_by_peer.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "{name}{{peer=\"{peer}\"}} {bytes}");
    }
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
