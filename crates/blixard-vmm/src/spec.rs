//! What a VM is: [`VmSpec`] and its validation.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// Longest VM name. Names become directory names and parts of socket paths.
pub const MAX_NAME_LEN: usize = 48;
/// Smallest memory a VM may ask for.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Longest kernel command line accepted.
pub const MAX_CMDLINE_LEN: usize = 2048;

/// The description of one VM. Serializable so the node can store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique per node: 1-48 chars of `[a-z0-9-]`, starting with a letter or digit.
    pub name: String,
    /// Virtual CPUs (>= 1).
    pub vcpus: u32,
    /// Memory in MiB (>= 16).
    pub memory_mib: u64,
    /// What to boot.
    pub boot: Boot,
    /// A tap on the node bridge with an address from the pool; `None` = no network.
    #[serde(default)]
    pub network: Option<NetworkRequest>,
    /// Health checks run while the VM runs.
    #[serde(default)]
    pub health: Vec<HealthCheck>,
    /// How long a graceful stop may take before the hypervisor is killed (ms).
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
}

fn default_stop_timeout_ms() -> u64 {
    10_000
}

impl VmSpec {
    /// A spec with defaults: no network, no health checks, 10 s stop timeout.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: u64, boot: Boot) -> Self {
        VmSpec {
            name: name.into(),
            vcpus,
            memory_mib,
            boot,
            network: None,
            health: Vec::new(),
            stop_timeout_ms: default_stop_timeout_ms(),
        }
    }
}

/// How the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Boot {
    /// A kernel/initrd/disk bundle, run by the qemu backend.
    Bundle(Bundle),
    /// A microvm.nix runner directory, run by the microvm backend.
    Runner(Runner),
}

/// Kernel + initrd + optional root disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Uncompressed or bzImage kernel.
    pub kernel: PathBuf,
    /// Optional initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Optional raw root disk (virtio-blk `/dev/vda`).
    #[serde(default)]
    pub root_disk: Option<Disk>,
    /// Kernel command line. `console=ttyS0` is needed to see the guest's console.
    #[serde(default)]
    pub cmdline: String,
}

impl Bundle {
    /// Load a bundle directory laid out like `images/test-guest` builds it:
    /// `kernel`, `initrd.cpio.gz` (optional), `disk.img` (optional, attached read-only),
    /// `cmdline` (optional).
    pub fn from_dir(dir: &Path) -> Result<Bundle, SpecError> {
        let kernel = dir.join("kernel");
        if !kernel.is_file() {
            return Err(SpecError::Missing {
                what: "bundle kernel",
                path: kernel,
                hint: "; a bundle dir holds kernel, initrd.cpio.gz, disk.img, cmdline".into(),
            });
        }
        let initrd = Some(dir.join("initrd.cpio.gz")).filter(|p| p.is_file());
        let root_disk = Some(dir.join("disk.img"))
            .filter(|p| p.is_file())
            .map(|path| Disk {
                path,
                read_only: true,
            });
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "console=ttyS0 panic=-1".to_string());
        Ok(Bundle {
            kernel,
            initrd,
            root_disk,
            cmdline,
        })
    }
}

/// A raw disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Image path.
    pub path: PathBuf,
    /// Attach read-only (lets several VMs share one image).
    #[serde(default)]
    pub read_only: bool,
}

/// A microvm.nix runner: a directory with `bin/microvm-run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runner {
    /// The runner directory (a store path in the Nix world).
    pub path: PathBuf,
    /// Override hypervisor detection (see docs/vmm.md, "Control socket convention").
    #[serde(default)]
    pub hypervisor: Option<Hypervisor>,
    /// Override the control socket path (relative paths are relative to the VM state dir).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
}

/// The hypervisor a runner execs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    /// qemu, controlled through QMP.
    Qemu,
    /// Cloud Hypervisor, controlled through its REST API.
    CloudHypervisor,
    /// Firecracker, controlled through its REST API.
    Firecracker,
    /// Anything else (crosvm, kvmtool, ...): start/stop only.
    Other,
}

impl Hypervisor {
    /// Parse microvm.nix's hypervisor name.
    pub fn from_name(s: &str) -> Hypervisor {
        match s.trim() {
            "qemu" => Hypervisor::Qemu,
            "cloud-hypervisor" => Hypervisor::CloudHypervisor,
            "firecracker" => Hypervisor::Firecracker,
            _ => Hypervisor::Other,
        }
    }
}

impl std::fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Firecracker => "firecracker",
            Hypervisor::Other => "other",
        })
    }
}

/// Networking wanted by a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRequest {
    /// Drop traffic between this VM and other VMs on the bridge (default true).
    #[serde(default = "yes")]
    pub isolated: bool,
}

fn yes() -> bool {
    true
}

impl Default for NetworkRequest {
    fn default() -> Self {
        NetworkRequest { isolated: true }
    }
}

/// A health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HealthCheck {
    /// Healthy once `marker` appeared on the console since the last (re)boot.
    ConsoleMarker {
        /// The text to look for.
        marker: String,
    },
    /// Healthy when a TCP connect to `host:port` succeeds (host defaults to the VM's address).
    Tcp {
        /// Host; default: the VM's leased address.
        #[serde(default)]
        host: Option<IpAddr>,
        /// Port.
        port: u16,
    },
    /// Healthy when `GET path` answers a 2xx status (or `expect_status`).
    Http {
        /// Host; default: the VM's leased address.
        #[serde(default)]
        host: Option<IpAddr>,
        /// Port.
        port: u16,
        /// Path, starting with '/'.
        path: String,
        /// Exact status expected; default any 2xx.
        #[serde(default)]
        expect_status: Option<u16>,
    },
}

/// Check a VM name: 1-48 chars of `[a-z0-9-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let bad = |reason: &str| {
        Err(SpecError::InvalidName {
            name: name.chars().take(80).collect(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("longer than {MAX_NAME_LEN} bytes"));
    }
    if name.contains('/') || name.contains('\\') {
        return bad("contains a path separator");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("use only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') {
        return bad("must start with a letter or digit");
    }
    Ok(())
}

/// Validate a whole spec against limits (the node's total capacity). Does not touch the disk.
pub fn validate_spec(spec: &VmSpec, max_vcpus: u32, max_memory_mib: u64) -> Result<(), SpecError> {
    validate_name(&spec.name)?;
    if spec.vcpus == 0 || spec.vcpus > max_vcpus.min(255) {
        return Err(SpecError::Vcpus {
            got: spec.vcpus,
            max: max_vcpus.min(255),
        });
    }
    if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > max_memory_mib {
        return Err(SpecError::Memory {
            got: spec.memory_mib,
            min: MIN_MEMORY_MIB,
            max: max_memory_mib,
        });
    }
    match &spec.boot {
        Boot::Bundle(b) => {
            absolute("kernel", &b.kernel)?;
            if let Some(i) = &b.initrd {
                absolute("initrd", i)?;
            }
            if let Some(d) = &b.root_disk {
                absolute("root disk", &d.path)?;
                if d.path.to_string_lossy().contains(',') {
                    return Err(SpecError::Missing {
                        what: "root disk",
                        path: d.path.clone(),
                        hint: "; paths with ',' are not supported by qemu -drive".into(),
                    });
                }
            }
            if b.cmdline.len() > MAX_CMDLINE_LEN {
                return Err(SpecError::Cmdline(format!(
                    "{} bytes, at most {MAX_CMDLINE_LEN}",
                    b.cmdline.len()
                )));
            }
            if b.cmdline.chars().any(|c| c.is_control()) {
                return Err(SpecError::Cmdline(
                    "contains control characters (newline, NUL, ...)".into(),
                ));
            }
        }
        Boot::Runner(r) => absolute("runner", &r.path)?,
    }
    for check in &spec.health {
        match check {
            HealthCheck::ConsoleMarker { marker } => {
                if marker.is_empty() || marker.len() > 256 {
                    return Err(SpecError::HealthCheck(
                        "console marker must be 1-256 bytes".into(),
                    ));
                }
            }
            HealthCheck::Tcp { port, .. } => {
                if *port == 0 {
                    return Err(SpecError::HealthCheck("tcp port 0".into()));
                }
            }
            HealthCheck::Http { port, path, .. } => {
                if *port == 0 {
                    return Err(SpecError::HealthCheck("http port 0".into()));
                }
                if !path.starts_with('/')
                    || path.len() > 1024
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(SpecError::HealthCheck(format!(
                        "http path {path:?} must start with '/' and contain no spaces"
                    )));
                }
            }
        }
    }
    Ok(())
}

fn absolute(what: &'static str, p: &Path) -> Result<(), SpecError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(SpecError::NotAbsolute {
            what,
            path: p.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bundle_spec(name: &str, vcpus: u32, mem: u64) -> VmSpec {
        VmSpec::new(
            name,
            vcpus,
            mem,
            Boot::Bundle(Bundle {
                kernel: "/k".into(),
                initrd: None,
                root_disk: None,
                cmdline: "console=ttyS0".into(),
            }),
        )
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(48)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a/b",
            "../x",
            "a\\b",
            "A",
            "a b",
            "a.b",
            "a_b",
            &"x".repeat(49),
            "é",
        ] {
            assert!(
                matches!(validate_name(bad), Err(SpecError::InvalidName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn resources() {
        assert!(validate_spec(&bundle_spec("a", 1, 64), 4, 1024).is_ok());
        assert!(matches!(
            validate_spec(&bundle_spec("a", 0, 64), 4, 1024),
            Err(SpecError::Vcpus { .. })
        ));
        assert!(matches!(
            validate_spec(&bundle_spec("a", 5, 64), 4, 1024),
            Err(SpecError::Vcpus { .. })
        ));
        assert!(matches!(
            validate_spec(&bundle_spec("a", 1, 0), 4, 1024),
            Err(SpecError::Memory { .. })
        ));
        assert!(matches!(
            validate_spec(&bundle_spec("a", 1, 2048), 4, 1024),
            Err(SpecError::Memory { .. })
        ));
        let mut s = bundle_spec("a", 1, 64);
        s.boot = Boot::Bundle(Bundle {
            kernel: "rel/kernel".into(),
            initrd: None,
            root_disk: None,
            cmdline: String::new(),
        });
        assert!(matches!(
            validate_spec(&s, 4, 1024),
            Err(SpecError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn spec_json_roundtrip() {
        let mut s = bundle_spec("a", 1, 64);
        s.network = Some(NetworkRequest::default());
        s.health.push(HealthCheck::Http {
            host: None,
            port: 8080,
            path: "/".into(),
            expect_status: None,
        });
        let j = serde_json::to_string(&s).expect("serialize");
        let back: VmSpec = serde_json::from_str(&j).expect("parse");
        assert_eq!(s, back);
    }

    proptest! {
        #[test]
        fn name_validation_never_panics_and_accepts_only_safe_names(name in ".{0,80}") {
            if validate_name(&name).is_ok() {
                prop_assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
                prop_assert!(!name.contains('/') && !name.contains(".."));
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            }
        }

        #[test]
        fn spec_validation_never_panics(
            name in "[a-z0-9/._-]{0,60}",
            vcpus in any::<u32>(),
            mem in any::<u64>(),
            cmdline in ".{0,100}",
            max_v in any::<u32>(),
            max_m in any::<u64>(),
        ) {
            let mut s = bundle_spec(&name, vcpus, mem);
            if let Boot::Bundle(b) = &mut s.boot { b.cmdline = cmdline; }
            if validate_spec(&s, max_v, max_m).is_ok() {
                prop_assert!(vcpus >= 1 && vcpus <= max_v);
                prop_assert!(mem >= MIN_MEMORY_MIB && mem <= max_m);
            }
        }

        #[test]
        fn spec_json_parse_never_panics(s in ".{0,200}") {
            let _ = serde_json::from_str::<VmSpec>(&s);
        }
    }
}
