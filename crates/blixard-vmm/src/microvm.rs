//! The microvm backend (the default): runs a microvm.nix runner the way
//! `microvm@NAME.service` does — `RUNNER/bin/microvm-run` with the VM's state dir as working
//! directory, in its own process group; `RUNNER/bin/microvm-shutdown` for graceful stops;
//! taps from `RUNNER/share/microvm/tap-interfaces` created before start and removed after.
//!
//! Control socket convention (see docs/vmm.md): the spec's `Runner::control_socket`, else
//! the path in `RUNNER/share/microvm/control-socket`, else `$BLIXARD_VM_CONTROL_SOCKET`
//! (= `STATE/control.sock`, exported to the runner), else the one `*.sock` that appears in
//! the state dir (microvm.nix's default `microvm.socket` is `"${hostName}.sock"`, relative to
//! the working directory).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::control::Control;
use crate::engine::{BackendConfig, Engine, Launcher, Plan, PlanCtx};
use crate::error::{SpecError, VmError};
use crate::spec::{Boot, Hypervisor, Runner, VmSpec};

/// What a runner directory says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    /// `bin/microvm-run`.
    pub run: PathBuf,
    /// `bin/microvm-shutdown`, if present.
    pub shutdown: Option<PathBuf>,
    /// Taps from `share/microvm/tap-interfaces`.
    pub taps: Vec<String>,
    /// Flags from `share/microvm/tap-flags` (`vnet_hdr`, `multi_queue`).
    pub tap_flags: Vec<String>,
    /// The hypervisor.
    pub hypervisor: Hypervisor,
    /// Control socket from `share/microvm/control-socket` (Blixard extension).
    pub control_socket: Option<PathBuf>,
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Hypervisor from a runner's (resolved) store path name `HASH-microvm-HYPERVISOR-HOST`.
pub fn hypervisor_from_store_name(name: &str) -> Option<Hypervisor> {
    let rest = name.split_once("-microvm-").map(|(_, r)| r)?;
    for h in [
        "cloud-hypervisor",
        "firecracker",
        "qemu",
        "crosvm",
        "kvmtool",
        "stratovirt",
        "alioth",
    ] {
        if rest.starts_with(&format!("{h}-")) || rest == h {
            return Some(Hypervisor::from_name(h));
        }
    }
    None
}

/// Inspect a runner directory.
pub fn inspect_runner(r: &Runner) -> Result<RunnerInfo, SpecError> {
    if !r.path.is_dir() {
        return Err(SpecError::Missing {
            what: "runner directory",
            path: r.path.clone(),
            hint: "; build it with `nix build .#nixosConfigurations.NAME.config.microvm.declaredRunner`".into(),
        });
    }
    let run = r.path.join("bin/microvm-run");
    if !is_executable(&run) {
        return Err(SpecError::Missing {
            what: "runner executable",
            path: run,
            hint: "; a microvm.nix runner has an executable bin/microvm-run".into(),
        });
    }
    let shutdown = Some(r.path.join("bin/microvm-shutdown")).filter(|p| is_executable(p));
    let share = r.path.join("share/microvm");
    let taps = read_lines(&share.join("tap-interfaces"));
    for t in &taps {
        crate::net::validate_ifname(t).map_err(|_| SpecError::Missing {
            what: "valid tap name in tap-interfaces",
            path: share.join("tap-interfaces"),
            hint: format!("; {t:?} is not a valid interface name"),
        })?;
    }
    let tap_flags = read_lines(&share.join("tap-flags"));
    let hypervisor = r
        .hypervisor
        .or_else(|| {
            read_lines(&share.join("hypervisor"))
                .first()
                .map(|h| Hypervisor::from_name(h))
        })
        .or_else(|| {
            std::fs::canonicalize(&r.path)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
                .and_then(|n| hypervisor_from_store_name(&n))
        })
        .unwrap_or(Hypervisor::Other);
    let control_socket = r.control_socket.clone().or_else(|| {
        read_lines(&share.join("control-socket"))
            .first()
            .map(PathBuf::from)
    });
    Ok(RunnerInfo {
        run,
        shutdown,
        taps,
        tap_flags,
        hypervisor,
        control_socket,
    })
}

#[derive(Debug)]
pub(crate) struct MicrovmLauncher;

fn runner_of(spec: &VmSpec) -> Result<&Runner, SpecError> {
    match &spec.boot {
        Boot::Runner(r) => Ok(r),
        Boot::Bundle(_) => Err(SpecError::WrongBoot {
            backend: "microvm",
            got: "bundle",
            hint: "use the qemu backend for kernel/initrd bundles",
        }),
    }
}

impl Launcher for MicrovmLauncher {
    const KIND: &'static str = "microvm";

    fn check(&self, spec: &VmSpec) -> Result<(), SpecError> {
        inspect_runner(runner_of(spec)?).map(drop)
    }

    fn taps(&self, spec: &VmSpec, _own_tap: &str) -> Result<Vec<(String, Vec<String>)>, SpecError> {
        let info = inspect_runner(runner_of(spec)?)?;
        Ok(info
            .taps
            .iter()
            .map(|t| (t.clone(), info.tap_flags.clone()))
            .collect())
    }

    fn plan(&self, ctx: &PlanCtx<'_>) -> Result<Plan, VmError> {
        let info = inspect_runner(runner_of(ctx.spec)?)?;
        let explicit = info.control_socket.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                ctx.dir.join(p)
            }
        });
        let exported = explicit.clone().unwrap_or_else(|| ctx.socket.to_path_buf());
        let mut env = vec![
            ("BLIXARD_VM_NAME".to_string(), ctx.spec.name.clone()),
            (
                "BLIXARD_VM_CONTROL_SOCKET".to_string(),
                exported.display().to_string(),
            ),
        ];
        if let Some(n) = ctx.net {
            env.push(("BLIXARD_VM_IP".into(), format!("{}/{}", n.ip, n.prefix)));
            env.push(("BLIXARD_VM_GATEWAY".into(), n.gateway.to_string()));
            env.push(("BLIXARD_VM_MAC".into(), n.mac.clone()));
        }
        Ok(Plan {
            program: info.run,
            args: Vec::new(),
            env,
            hypervisor: info.hypervisor,
            control: Some(Control {
                hypervisor: info.hypervisor,
                socket: exported,
            }),
            discover_socket: explicit.is_none(),
            accel: None,
            shutdown_program: info.shutdown,
        })
    }
}

/// Runs microvm.nix runners.
#[derive(Debug, Clone)]
pub struct MicrovmBackend {
    engine: Engine<MicrovmLauncher>,
}

impl MicrovmBackend {
    /// Open the backend and recover VM records from `cfg.data_dir`.
    pub async fn open(cfg: BackendConfig) -> Result<MicrovmBackend, VmError> {
        Ok(MicrovmBackend {
            engine: Engine::open(cfg, MicrovmLauncher).await?,
        })
    }
}

delegate_backend!(MicrovmBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names() {
        assert_eq!(
            hypervisor_from_store_name("abc123-microvm-cloud-hypervisor-web"),
            Some(Hypervisor::CloudHypervisor)
        );
        assert_eq!(
            hypervisor_from_store_name("abc123-microvm-qemu-my-vm"),
            Some(Hypervisor::Qemu)
        );
        assert_eq!(
            hypervisor_from_store_name("abc123-microvm-firecracker-x"),
            Some(Hypervisor::Firecracker)
        );
        assert_eq!(
            hypervisor_from_store_name("abc123-microvm-crosvm-x"),
            Some(Hypervisor::Other)
        );
        assert_eq!(hypervisor_from_store_name("runner"), None);
    }

    #[test]
    fn inspect_rejects_bad_runners() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Runner {
            path: dir.path().join("nope"),
            hypervisor: None,
            control_socket: None,
        };
        assert!(matches!(inspect_runner(&r), Err(SpecError::Missing { .. })));
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        let r = Runner {
            path: dir.path().to_path_buf(),
            hypervisor: None,
            control_socket: None,
        };
        assert!(matches!(inspect_runner(&r), Err(SpecError::Missing { .. })));
        let run = dir.path().join("bin/microvm-run");
        std::fs::write(&run, "#!/bin/sh\n").expect("write");
        assert!(inspect_runner(&r).is_err(), "not executable");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir_all(dir.path().join("share/microvm")).expect("mkdir");
        std::fs::write(
            dir.path().join("share/microvm/tap-interfaces"),
            "vm-a\n\nvm-b\n",
        )
        .expect("w");
        std::fs::write(dir.path().join("share/microvm/tap-flags"), "vnet_hdr\n").expect("w");
        let info = inspect_runner(&r).expect("ok");
        assert_eq!(info.taps, vec!["vm-a", "vm-b"]);
        assert_eq!(info.tap_flags, vec!["vnet_hdr"]);
        assert_eq!(info.hypervisor, Hypervisor::Other);
        assert!(info.shutdown.is_none());
        std::fs::write(
            dir.path().join("share/microvm/tap-interfaces"),
            "bad/name\n",
        )
        .expect("w");
        assert!(inspect_runner(&r).is_err());
    }
}
