//! The node's configuration: an optional TOML file with the same settings as the flags of
//! `node run`. Flags override the file; the file overrides defaults; no environment
//! variable changes a node's configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blixard_node::executor::BackendChoice;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Settings shared by `node run` and `node config`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct NodeFlags {
    /// A TOML file with any of these settings (flags given here win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// UDP address to listen on (default: the last one used, else 127.0.0.1 on a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// vCPUs offered to VMs (default: all of the host's).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory offered to VMs in MiB (default: all of the host's).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Disk offered to VMs in GiB (default: free space of the data dir).
    #[arg(long)]
    pub disk_gib: Option<u64>,
    /// A label used by placement (repeatable), k=v.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// An operator-run iroh relay URL (default: none; peers are dialled directly).
    #[arg(long)]
    pub relay: Option<String>,
    /// Where to serve Prometheus metrics, or `off` (default: 127.0.0.1:9464).
    #[arg(long, value_parser = parse_metrics)]
    pub metrics_listen: Option<MetricsListen>,
    /// VM backends to run: auto (both: a Nix-closure image runs on microvm, a bundle on
    /// qemu), microvm or qemu.
    #[arg(long)]
    pub backend: Option<BackendChoice>,
}

/// `--metrics-listen`: an address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricsListen {
    Addr(SocketAddr),
    #[serde(with = "off")]
    Off,
}

mod off {
    pub fn serialize<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("off")
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        if s == "off" {
            Ok(())
        } else {
            Err(serde::de::Error::custom("expected an address or \"off\""))
        }
    }
}

fn parse_metrics(s: &str) -> Result<MetricsListen, String> {
    if s == "off" {
        return Ok(MetricsListen::Off);
    }
    s.parse().map(MetricsListen::Addr).map_err(|_| format!("invalid metrics address {s:?}: expected IP:PORT or off"))
}

/// Metrics are served on localhost unless configured otherwise.
pub const DEFAULT_METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// The file format. Unknown keys are errors, so a typo is not silently ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub relay: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
    pub metrics_listen: Option<MetricsListen>,
    pub backend: Option<BackendChoice>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The effective configuration: file and flags merged, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub data_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub relay: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// `None`: the free space of the data dir at start.
    pub disk_gib: Option<u64>,
    pub metrics_listen: MetricsListen,
    pub backend: BackendChoice,
    pub labels: BTreeMap<String, String>,
}

/// Merges `flags` over the config file (if any) over defaults.
pub fn effective(data_dir_flag: Option<PathBuf>, flags: &NodeFlags) -> anyhow::Result<Effective> {
    let file = match &flags.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    merge(file, data_dir_flag, flags)
}

fn merge(file: FileConfig, data_dir_flag: Option<PathBuf>, flags: &NodeFlags) -> anyhow::Result<Effective> {
    let host = blixard_node::config::host_resources();
    let data_dir = data_dir_flag
        .or(file.data_dir)
        .context("no data dir: pass --data-dir DIR or set data_dir in the config file")?;
    let mut labels = file.labels;
    for l in &flags.labels {
        let (k, v) = l.split_once('=').with_context(|| format!("label {l:?} must be k=v"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    for (k, v) in &labels {
        blixard_types::command::validate_label(k, v)?;
    }
    let relay = flags.relay.clone().or(file.relay);
    if let Some(r) = &relay {
        r.parse::<iroh::RelayUrl>().with_context(|| format!("invalid relay URL {r:?}"))?;
    }
    Ok(Effective {
        data_dir,
        listen: flags.listen.or(file.listen),
        relay,
        cpus: flags.cpus.or(file.cpus).unwrap_or(host.cpus),
        memory_mib: flags.memory_mib.or(file.memory_mib).unwrap_or(host.memory_mib),
        disk_gib: flags.disk_gib.or(file.disk_gib),
        metrics_listen: flags.metrics_listen.or(file.metrics_listen).unwrap_or(MetricsListen::Addr(DEFAULT_METRICS)),
        backend: flags.backend.or(file.backend).unwrap_or_default(),
        labels,
    })
}

impl Effective {
    /// The effective configuration in the config file's own format.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let file = FileConfig {
            data_dir: Some(self.data_dir.clone()),
            listen: self.listen,
            relay: self.relay.clone(),
            cpus: Some(self.cpus),
            memory_mib: Some(self.memory_mib),
            disk_gib: self.disk_gib,
            metrics_listen: Some(self.metrics_listen),
            backend: Some(self.backend),
            labels: self.labels.clone(),
        };
        Ok(toml::to_string(&file)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).expect("valid toml")
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let f = file("data_dir = \"/srv/a\"\nlisten = \"10.0.0.1:7000\"\ncpus = 4\n[labels]\nzone = \"a\"\nrack = \"1\"\n");
        let flags = NodeFlags { cpus: Some(8), labels: vec!["zone=b".into()], ..Default::default() };
        let e = merge(f.clone(), None, &flags).expect("merge");
        assert_eq!(e.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(e.listen, Some("10.0.0.1:7000".parse().expect("addr")));
        assert_eq!(e.cpus, 8);
        assert_eq!(e.labels["zone"], "b");
        assert_eq!(e.labels["rack"], "1");
        assert_eq!(e.memory_mib, blixard_node::config::host_resources().memory_mib);
        let e = merge(f, Some("/srv/b".into()), &NodeFlags::default()).expect("merge");
        assert_eq!(e.data_dir, PathBuf::from("/srv/b"));
        assert_eq!(e.cpus, 4);
    }

    #[test]
    fn bad_files_and_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("cpu = 4").is_err(), "typo must not be ignored");
        assert!(toml::from_str::<FileConfig>("cpus = \"many\"").is_err());
        assert!(merge(FileConfig::default(), None, &NodeFlags::default()).is_err(), "no data dir");
        let flags = NodeFlags { labels: vec!["novalue".into()], ..Default::default() };
        assert!(merge(FileConfig::default(), Some("/x".into()), &flags).is_err());
        let flags = NodeFlags { relay: Some("not a url".into()), ..Default::default() };
        assert!(merge(FileConfig::default(), Some("/x".into()), &flags).is_err());
    }

    #[test]
    fn metrics_listen_default_off_and_address() {
        let e = merge(FileConfig::default(), Some("/x".into()), &NodeFlags::default()).expect("merge");
        assert_eq!(e.metrics_listen, MetricsListen::Addr(DEFAULT_METRICS));
        let e = merge(file("metrics_listen = \"off\""), Some("/x".into()), &NodeFlags::default()).expect("merge");
        assert_eq!(e.metrics_listen, MetricsListen::Off);
        let flags = NodeFlags { metrics_listen: Some(parse_metrics("0.0.0.0:9100").expect("addr")), ..Default::default() };
        let e = merge(file("metrics_listen = \"off\""), Some("/x".into()), &flags).expect("merge");
        assert_eq!(e.metrics_listen, MetricsListen::Addr("0.0.0.0:9100".parse().expect("addr")));
        assert!(parse_metrics("nope").is_err());
        assert!(toml::from_str::<FileConfig>("metrics_listen = \"on\"").is_err());
    }

    #[test]
    fn printed_config_reads_back() {
        let f = file("data_dir = \"/srv/a\"\ncpus = 4\n[labels]\nzone = \"a\"\n");
        let e = merge(f, None, &NodeFlags::default()).expect("merge");
        let back = file(&e.to_toml().expect("toml"));
        assert_eq!(merge(back, None, &NodeFlags::default()).expect("merge"), e);
    }
}
