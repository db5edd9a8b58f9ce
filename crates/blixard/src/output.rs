//! Terminal and JSON output.

use std::io::Write;

use blixard_types::rpc::{ClusterStatus, ImageInfo, NodeStatus, VmInfo};
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

fn short_hash(h: &str) -> &str {
    &h[..h.len().min(12)]
}

pub fn images(list: &[ImageInfo]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<12} {:<20} {:<11} {:>10} {:>5} {:>4}", "HASH", "NAMES", "KIND", "SIZE", "NODES", "VMS")?;
    for i in list {
        let names = if i.names.is_empty() { "-".to_string() } else { i.names.join(",") };
        writeln!(
            out,
            "{:<12} {:<20} {:<11} {:>10} {:>5} {:>4}",
            short_hash(&i.hash),
            names,
            i.kind,
            crate::progress::human(i.size),
            i.nodes.len(),
            i.vms.len()
        )?;
    }
    Ok(())
}

pub fn image(i: &ImageInfo) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "hash:      {}", i.hash)?;
    writeln!(out, "names:     {}", if i.names.is_empty() { "-".into() } else { i.names.join(", ") })?;
    writeln!(out, "kind:      {}", i.kind)?;
    writeln!(out, "size:      {} ({} bytes)", crate::progress::human(i.size), i.size)?;
    writeln!(out, "publisher: {}", i.publisher.short())?;
    writeln!(out, "nodes:     {}", i.nodes.iter().map(|n| n.short()).collect::<Vec<_>>().join(", "))?;
    writeln!(out, "vms:       {}", i.vms.join(", "))?;
    Ok(())
}

pub fn vms(list: &[VmInfo]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<20} {:<9} {:<8} {:<12} {:>5} {:>7} {:<7} {:<14} ERROR", "NAME", "STATE", "DESIRED", "NODE", "VCPUS", "MEM_MIB", "HEALTHY", "IMAGE")?;
    for v in list {
        writeln!(
            out,
            "{:<20} {:<9} {:<8} {:<12} {:>5} {:>7} {:<7} {:<14} {}",
            v.name,
            v.state,
            v.desired,
            v.node.map(|n| n.short()).unwrap_or_else(|| "-".into()),
            v.vcpus,
            v.memory_mib,
            match v.healthy {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            v.image,
            v.error.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

pub fn vm(v: &VmInfo) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "name:      {}", v.name)?;
    writeln!(out, "state:     {} (desired {})", v.state, v.desired)?;
    writeln!(out, "node:      {}", v.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into()))?;
    writeln!(out, "image:     {} ({})", v.image, short_hash(&v.image_hash))?;
    writeln!(out, "resources: {} vcpus, {} MiB memory, {} GiB disk", v.vcpus, v.memory_mib, v.disk_gib)?;
    writeln!(out, "healthy:   {}", v.healthy.map(|h| h.to_string()).unwrap_or_else(|| "-".into()))?;
    writeln!(out, "restart:   {} ({} restarts)", v.restart, v.restarts)?;
    if let Some(h) = &v.health_check {
        writeln!(out, "health:    {h}")?;
    }
    if let Some(e) = &v.error {
        writeln!(out, "error:     {e}")?;
    }
    Ok(())
}
