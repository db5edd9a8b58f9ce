//! Node configuration and the data dir layout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blixard_types::command::Resources;
use blixard_types::ticket::PeerAddr;
use blixard_types::Ticket;
use serde::{Deserialize, Serialize};

/// How a node starts.
#[derive(Debug, Clone)]
pub enum StartMode {
    /// Bootstrap a new cluster with this node as its first voter.
    Init,
    /// Join an existing cluster with a node ticket.
    Join(Ticket),
    /// Resume from the data dir.
    Resume,
}

/// Everything `node run` is given.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// UDP address to listen on; `None` reuses the last one (or 127.0.0.1 with a free port).
    pub listen: Option<SocketAddr>,
    pub relay: Option<iroh::RelayUrl>,
    pub mode: StartMode,
    pub resources: Resources,
    pub labels: BTreeMap<String, String>,
    /// Raft timing; tests may shorten it.
    pub raft: openraft::Config,
    /// Where to serve Prometheus metrics (`None`: not at all).
    pub metrics: Option<SocketAddr>,
    /// How long a node may be dead before its VMs are placed elsewhere.
    pub placement_grace: std::time::Duration,
    /// Which VM backends to run.
    pub backend: crate::executor::BackendChoice,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>, mode: StartMode) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: None,
            relay: None,
            mode,
            resources: host_resources(),
            labels: BTreeMap::new(),
            raft: blixard_raft::storage::default_config(),
            metrics: None,
            placement_grace: crate::placer::GRACE,
            backend: Default::default(),
        }
    }
}

/// Files inside a node's data dir.
#[derive(Debug, Clone)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn key(&self) -> PathBuf {
        self.0.join("node.key")
    }
    pub fn raft_db(&self) -> PathBuf {
        self.0.join("raft.redb")
    }
    pub fn local_state(&self) -> PathBuf {
        self.0.join("node.json")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.0.join("audit.log")
    }
    pub fn admin_ticket(&self) -> PathBuf {
        self.0.join("admin.ticket")
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// What a node remembers locally, outside Raft: where it listened (so peers find it again
/// after a restart) and whom to trust while it joins (the ticket's members).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalState {
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub join_peers: Vec<PeerAddr>,
    /// Where metrics are served, if they are (for tools and tests).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

impl LocalState {
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{} is corrupt: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        write_atomic(path, &bytes, 0o644).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// Writes a file through a temporary and a rename, so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// What this host has: all CPUs, total memory, and the free space of the data dir's
/// filesystem are the defaults for `--cpus`, `--memory-mib`, `--disk-gib`.
pub fn host_resources() -> Resources {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    Resources { cpus, memory_mib, disk_gib: 0 }
}
