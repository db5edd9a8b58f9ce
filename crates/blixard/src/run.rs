//! `blixard node run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use blixard_node::{Node, NodeConfig, StartMode};
use blixard_types::Ticket;
use tracing::info;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// UDP address to listen on (default: the last one used, else 127.0.0.1 on a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Bootstrap a new cluster with this node as its first voter.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join a cluster with a node ticket.
    #[arg(long)]
    join: Option<String>,
    /// vCPUs offered to VMs (default: all of the host's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory offered to VMs in MiB (default: all of the host's).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk offered to VMs in GiB (default: free space of the data dir).
    #[arg(long)]
    disk_gib: Option<u64>,
    /// A label used by placement (repeatable), k=v.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// An operator-run iroh relay (default: none; peers are dialled directly).
    #[arg(long)]
    relay: Option<iroh::RelayUrl>,
}

pub async fn run(data_dir: PathBuf, args: RunArgs) -> anyhow::Result<()> {
    let mode = match (&args.join, args.init) {
        (Some(t), _) => StartMode::Join(Ticket::decode(t).context("invalid --join ticket")?),
        (None, true) => StartMode::Init,
        (None, false) => StartMode::Resume,
    };
    let mut cfg = NodeConfig::new(&data_dir, mode);
    cfg.listen = args.listen;
    cfg.relay = args.relay;
    if let Some(c) = args.cpus {
        cfg.resources.cpus = c;
    }
    if let Some(m) = args.memory_mib {
        cfg.resources.memory_mib = m;
    }
    if let Some(d) = args.disk_gib {
        cfg.resources.disk_gib = d;
    }
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l.split_once('=').with_context(|| format!("label {l:?} must be k=v"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    cfg.labels = labels;

    let node = Node::start(cfg).await.context("node failed to start")?;
    // One line on stdout for scripts: who we are and where we listen.
    println!("node {} listening on {:?}", node.id(), node.ctx().addrs());
    if args.init {
        println!("client ticket written to {}", data_dir.join("admin.ticket").display());
    }
    // Ready: the node has bootstrapped, joined or resumed, and serves its protocols.
    if let Err(e) = crate::notify::notify("READY=1") {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }
    shutdown_signal().await?;
    info!("shutting down");
    let _ = crate::notify::notify("STOPPING=1");
    node.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
