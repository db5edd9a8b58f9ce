//! VM specifications as the cluster records them (what the user asked for), and their
//! validation. How a node runs them is `blixard-vmm`'s business.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest VM name.
pub const MAX_NAME_LEN: usize = 48;
/// Most vCPUs one VM may have.
pub const MAX_VCPUS: u32 = 256;
/// Least and most memory one VM may have, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;

/// What to do when a VM stops without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Restart whenever it stops (the default for services).
    #[default]
    Always,
    /// Restart only after a failure (crash, failed health check).
    OnFailure,
    /// Never restart.
    Never,
}

impl FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "on-failure" => Ok(Self::OnFailure),
            "never" => Ok(Self::Never),
            _ => Err(format!("unknown restart policy {s:?}: expected always, on-failure or never")),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::Never => "never",
        })
    }
}

/// How the cluster decides a VM is ready and healthy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthCheck {
    /// The serial console printed this text.
    Console(String),
    /// A TCP connection to this guest port succeeds.
    Tcp(u16),
    /// An HTTP GET of this port and path answers 2xx.
    Http { port: u16, path: String },
}

impl FromStr for HealthCheck {
    type Err = String;
    /// `console:TEXT`, `tcp:PORT` or `http:PORT/PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid health check {s:?}: expected console:TEXT, tcp:PORT or http:PORT/PATH");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "console" if !rest.is_empty() && rest.len() <= 256 => Ok(Self::Console(rest.to_string())),
            "tcp" => rest.parse().ok().filter(|p| *p > 0).map(Self::Tcp).ok_or_else(bad),
            "http" => {
                let (port, path) = match rest.split_once('/') {
                    Some((p, path)) => (p, format!("/{path}")),
                    None => (rest, "/".to_string()),
                };
                let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
                if path.len() > 1024 || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad());
                }
                Ok(Self::Http { port, path })
            }
            _ => Err(bad()),
        }
    }
}

/// What the user wants a VM to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Desired {
    Running,
    Paused,
    Stopped,
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Desired::Running => "running",
            Desired::Paused => "paused",
            Desired::Stopped => "stopped",
        })
    }
}

/// What a VM actually is, as its node reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Recorded, not placed or not yet picked up by its node.
    #[default]
    Pending,
    /// Its node is fetching the image.
    Fetching,
    /// Booting, not yet ready.
    Starting,
    Running,
    Paused,
    Stopped,
    /// Failed and not restarting (see the last error).
    Failed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Pending => "pending",
            VmState::Fetching => "fetching",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        })
    }
}

/// A node's report about one VM it hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    pub state: VmState,
    pub healthy: Option<bool>,
    /// The last error, if the VM failed or a restart is pending.
    pub error: Option<String>,
    pub restarts: u32,
    /// The reboot requests the node has carried out.
    pub reboots_done: u64,
    /// The node has removed the VM (after a delete).
    pub deleted: bool,
}

/// A VM as the user specified it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    /// Image reference: a name or a content hash.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Disk the VM needs on its node (its root disk and overlays), in GiB.
    pub disk_gib: u64,
    /// Labels of the VM itself.
    pub labels: BTreeMap<String, String>,
    /// Node labels the VM requires (`k=v`, all must match).
    pub constraints: BTreeMap<String, String>,
    /// VMs sharing a group are placed on different nodes.
    pub anti_affinity: Option<String>,
    pub restart: RestartPolicy,
    pub health: Option<HealthCheck>,
}

/// Why a VM spec is invalid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SpecError {
    #[error("invalid VM name {0:?}: use 1-{MAX_NAME_LEN} characters of a-z, 0-9 and '-', starting with a letter or digit")]
    Name(String),
    #[error("invalid image reference {0:?}")]
    Image(String),
    #[error("vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u32),
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, not {0}")]
    Memory(u64),
    #[error("invalid label or constraint: {0}")]
    Label(String),
    #[error("invalid anti-affinity group {0:?}")]
    Group(String),
}

/// Checks a VM name: DNS-label-like, so it is safe as a file name, a tap suffix and a
/// hostname.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.chars().take(80).collect()))
    }
}

impl VmSpec {
    /// Validates every field; a spec is checked when it is submitted, before it reaches Raft.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        let image_ok = !self.image.is_empty()
            && self.image.len() <= 128
            && self.image.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
        if !image_ok {
            return Err(SpecError::Image(self.image.chars().take(80).collect()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Memory(self.memory_mib));
        }
        for (k, v) in self.labels.iter().chain(self.constraints.iter()) {
            crate::command::validate_label(k, v).map_err(|e| SpecError::Label(e.to_string()))?;
        }
        if let Some(g) = &self.anti_affinity {
            crate::command::validate_label(g, "").map_err(|_| SpecError::Group(g.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            image: "test-guest".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            labels: BTreeMap::new(),
            constraints: BTreeMap::new(),
            anti_affinity: None,
            restart: RestartPolicy::Always,
            health: None,
        }
    }

    #[test]
    fn names() {
        for ok in ["web", "web-1", "0db", &"a".repeat(48)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a/b", "../x", "Web", "a b", "a.b", &"a".repeat(49), "x\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resources_are_bounded() {
        let mut s = spec("vm");
        assert!(s.validate().is_ok());
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(SpecError::Vcpus(0)));
        s.vcpus = MAX_VCPUS + 1;
        assert!(s.validate().is_err());
        s.vcpus = 2;
        s.memory_mib = 1;
        assert_eq!(s.validate(), Err(SpecError::Memory(1)));
        s.memory_mib = u64::MAX;
        assert!(s.validate().is_err());
    }

    #[test]
    fn health_checks_parse() {
        assert_eq!("tcp:8080".parse(), Ok(HealthCheck::Tcp(8080)));
        assert_eq!("http:80/healthz".parse(), Ok(HealthCheck::Http { port: 80, path: "/healthz".into() }));
        assert_eq!("http:80".parse(), Ok(HealthCheck::Http { port: 80, path: "/".into() }));
        assert_eq!("console:READY".parse(), Ok(HealthCheck::Console("READY".into())));
        for bad in ["", "tcp:", "tcp:0", "tcp:99999", "http:x/y", "console:", "udp:1", "http:80/a b"] {
            assert!(bad.parse::<HealthCheck>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,80}") {
            let _ = s.parse::<HealthCheck>();
            let _ = s.parse::<RestartPolicy>();
            let _ = validate_name(&s);
        }

        #[test]
        fn spec_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = postcard::from_bytes::<VmSpec>(&bytes);
        }
    }
}
