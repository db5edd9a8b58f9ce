//! `blixard node run`.

use std::path::PathBuf;

use anyhow::Context;
use blixard_node::{Node, NodeConfig, StartMode};
use blixard_types::Ticket;
use tracing::info;

use crate::config::NodeFlags;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Bootstrap a new cluster with this node as its first voter.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join a cluster with a node ticket (visible to local users in `ps`: prefer
    /// --join-file).
    #[arg(long, conflicts_with = "join_file")]
    join: Option<String>,
    /// Join a cluster with the node ticket in this file.
    #[arg(long, conflicts_with = "init")]
    join_file: Option<PathBuf>,
    #[command(flatten)]
    node: NodeFlags,
}

pub async fn run(data_dir: Option<PathBuf>, args: RunArgs) -> anyhow::Result<()> {
    let eff = crate::config::effective(data_dir, &args.node)?;
    let data_dir = eff.data_dir.clone();
    let join = match (&args.join, &args.join_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(p)) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("cannot read the join ticket {}", p.display()))?)
        }
        (None, None) => None,
    };
    let mode = match (&join, args.init) {
        (Some(t), _) => StartMode::Join(Ticket::decode(t).context("invalid join ticket")?),
        (None, true) => StartMode::Init,
        (None, false) => StartMode::Resume,
    };
    let mut cfg = NodeConfig::new(&data_dir, mode);
    cfg.listen = eff.listen;
    cfg.relay = eff.relay.as_deref().map(str::parse).transpose().context("invalid relay URL")?;
    cfg.resources.cpus = eff.cpus;
    cfg.resources.memory_mib = eff.memory_mib;
    cfg.resources.disk_gib = eff.disk_gib.unwrap_or(0);
    cfg.labels = eff.labels;
    cfg.backend = eff.backend;
    cfg.metrics = match eff.metrics_listen {
        crate::config::MetricsListen::Addr(a) => Some(a),
        crate::config::MetricsListen::Off => None,
    };

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
    // A Raft that stopped on a fatal error does not come back by itself: the node exits with
    // an error instead of serving on without it, so that its supervisor (systemd
    // `Restart=on-failure`) restarts it, and Raft recovers from the store.
    let stopped = tokio::select! {
        r = shutdown_signal() => {
            r?;
            None
        }
        fatal = node.ctx().raft_stopped() => Some(fatal),
    };
    info!("shutting down");
    let _ = crate::notify::notify("STOPPING=1");
    node.shutdown().await;
    match stopped {
        None => Ok(()),
        Some(fatal) => anyhow::bail!("raft stopped on a fatal error ({fatal}); restart the node to recover it from its store"),
    }
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
