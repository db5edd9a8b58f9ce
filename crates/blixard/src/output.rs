//! Terminal and JSON output.

use std::io::Write;

use blixard_types::rpc::{ClusterStatus, NodeStatus};
use serde::Serialize;

/// Prints one JSON document.
pub fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub fn line(s: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{s}")?;
    Ok(())
}

pub fn status(s: &ClusterStatus) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let leader = s.leader.map(|l| l.short()).unwrap_or_else(|| "none".into());
    writeln!(out, "cluster {}  leader {}  term {}  commit {}", s.cluster_id, leader, s.term, s.commit_index)?;
    writeln!(out, "{:<12} {:<8} {:<12} {:<7} {:<22} {:>5} {:>8} LABELS", "ID", "ROLE", "STATE", "HEALTHY", "ADDR", "CPUS", "MEM_MIB")?;
    for m in &s.members {
        let addr = m.addrs.first().map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            out,
            "{:<12} {:<8} {:<12} {:<7} {:<22} {:>5} {:>8} {}",
            m.id.short(),
            m.role,
            m.state,
            if m.healthy { "yes" } else { "no" },
            addr,
            m.cpus_free,
            m.memory_mib_free,
            labels.join(",")
        )?;
    }
    Ok(())
}

pub fn node_status(n: &NodeStatus) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let leader = n.leader.map(|l| l.short()).unwrap_or_else(|| "none".into());
    writeln!(out, "node {}", n.id)?;
    writeln!(out, "state {}  term {}  leader {}", n.state, n.term, leader)?;
    writeln!(out, "last log {}  applied {}  members {}", n.last_log_index, n.last_applied, n.members)?;
    writeln!(out, "state digest {}", n.state_digest)?;
    Ok(())
}
