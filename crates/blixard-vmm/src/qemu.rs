//! The qemu backend: boots a kernel/initrd/disk [`Bundle`](crate::Bundle) with
//! `qemu-system-x86_64 -M microvm`, controlled through QMP on `DATA/vms/NAME/control.sock`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::Accel;
use crate::control::Control;
use crate::engine::{BackendConfig, Engine, Launcher, Plan, PlanCtx};
use crate::error::{SpecError, VmError};
use crate::spec::{Boot, Hypervisor, VmSpec};

/// Which accelerator to ask qemu for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelMode {
    /// KVM when `/dev/kvm` opens and the host is not kvm-pvm, else TCG (with a warning).
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
}

impl std::str::FromStr for AccelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelMode::Auto),
            "kvm" => Ok(AccelMode::Kvm),
            "tcg" => Ok(AccelMode::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

/// Why `auto` picked what it picked.
pub fn detect_accel(mode: AccelMode) -> (Accel, Option<String>) {
    match mode {
        AccelMode::Kvm => (Accel::Kvm, None),
        AccelMode::Tcg => (Accel::Tcg, None),
        AccelMode::Auto => {
            let kvm_opens = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm");
            let pvm = Path::new("/sys/module/kvm_pvm").exists();
            match (kvm_opens, pvm) {
                (Ok(_), false) => (Accel::Kvm, None),
                (Ok(_), true) => (
                    Accel::Tcg,
                    Some("/dev/kvm is kvm-pvm, which cannot boot stock guest kernels: using TCG (slow software emulation)".into()),
                ),
                (Err(e), _) => (
                    Accel::Tcg,
                    Some(format!("/dev/kvm cannot be opened ({e}): using TCG (slow software emulation)")),
                ),
            }
        }
    }
}

/// The host TSC rate in kHz (from `/proc/cpuinfo`), passed to TCG guests as
/// `tsc_early_khz` because their PIT calibration sometimes hangs.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Options specific to the qemu backend.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The qemu binary (a name looked up in PATH, or a path).
    pub qemu_binary: PathBuf,
    /// Accelerator.
    pub accel: AccelMode,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            qemu_binary: "qemu-system-x86_64".into(),
            accel: AccelMode::Auto,
        }
    }
}

/// Find `bin` in PATH (or check it when it has a '/').
pub(crate) fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

#[derive(Debug)]
pub(crate) struct QemuLauncher {
    qemu: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
}

/// Build the qemu command line for a bundle VM (public for the benchmark and docs).
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    tsc_khz: Option<u64>,
    socket: &Path,
    tap: Option<(&str, &str)>,
    extra_cmdline: &str,
) -> Result<Vec<OsString>, SpecError> {
    let Boot::Bundle(b) = &spec.boot else {
        return Err(wrong_boot());
    };
    let mut cmdline = b.cmdline.clone();
    if accel == Accel::Tcg && !cmdline.contains("tsc_early_khz=") {
        if let Some(khz) = tsc_khz {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    if !extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra_cmdline);
    }
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(OsString::from(s));
    push("-name");
    push(&format!("guest={},debug-threads=on", spec.name));
    push("-M");
    push("microvm");
    push("-accel");
    push(match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    });
    if accel == Accel::Kvm {
        push("-cpu");
        push("host");
    }
    push("-smp");
    push(&spec.vcpus.to_string());
    push("-m");
    push(&format!("{}M", spec.memory_mib));
    for s in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        push(s);
    }
    push("-chardev");
    push("stdio,id=con0,signal=off");
    push("-serial");
    push("chardev:con0");
    push("-kernel");
    a.push(b.kernel.clone().into_os_string());
    if let Some(i) = &b.initrd {
        a.push("-initrd".into());
        a.push(i.clone().into_os_string());
    }
    a.push("-append".into());
    a.push(cmdline.into());
    if let Some(d) = &b.root_disk {
        let mut drive = OsString::from("id=root,format=raw,if=none,file=");
        drive.push(&d.path);
        if d.read_only {
            drive.push(",readonly=on");
        }
        a.push("-drive".into());
        a.push(drive);
        a.push("-device".into());
        a.push("virtio-blk-device,drive=root".into());
    }
    if let Some((tap, mac)) = tap {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,ifname={tap},script=no,downscript=no").into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={mac}").into());
    }
    a.push("-qmp".into());
    let mut q = OsString::from("unix:");
    q.push(socket);
    q.push(",server=on,wait=off");
    a.push(q);
    Ok(a)
}

fn wrong_boot() -> SpecError {
    SpecError::WrongBoot {
        backend: "qemu",
        got: "runner",
        hint: "use the microvm backend for microvm.nix runners",
    }
}

fn must_exist(what: &'static str, p: &Path) -> Result<(), SpecError> {
    if p.exists() {
        Ok(())
    } else {
        Err(SpecError::Missing {
            what,
            path: p.to_path_buf(),
            hint: String::new(),
        })
    }
}

impl Launcher for QemuLauncher {
    const KIND: &'static str = "qemu";

    fn check(&self, spec: &VmSpec) -> Result<(), SpecError> {
        let Boot::Bundle(b) = &spec.boot else {
            return Err(wrong_boot());
        };
        must_exist("kernel", &b.kernel)?;
        if let Some(i) = &b.initrd {
            must_exist("initrd", i)?;
        }
        if let Some(d) = &b.root_disk {
            must_exist("root disk", &d.path)?;
        }
        if which(&self.qemu).is_none() {
            return Err(SpecError::Missing {
                what: "qemu binary",
                path: self.qemu.clone(),
                hint: "; install qemu-system-x86 (apt-get install qemu-system-x86) or set QemuOptions::qemu_binary".into(),
            });
        }
        Ok(())
    }

    fn taps(&self, spec: &VmSpec, own_tap: &str) -> Result<Vec<(String, Vec<String>)>, SpecError> {
        Ok(if spec.network.is_some() {
            vec![(own_tap.to_string(), Vec::new())]
        } else {
            Vec::new()
        })
    }

    fn plan(&self, ctx: &PlanCtx<'_>) -> Result<Plan, VmError> {
        let extra = match ctx.net {
            Some(n) => format!("blixard.ip={}/{} blixard.gw={}", n.ip, n.prefix, n.gateway),
            None => String::new(),
        };
        let tap = match (ctx.net, ctx.own_tap) {
            (Some(n), Some(t)) => Some((t, n.mac.as_str())),
            _ => None,
        };
        let args = qemu_args(ctx.spec, self.accel, self.tsc_khz, ctx.socket, tap, &extra)?;
        Ok(Plan {
            program: self.qemu.clone(),
            args,
            env: Vec::new(),
            hypervisor: Hypervisor::Qemu,
            control: Some(Control {
                hypervisor: Hypervisor::Qemu,
                socket: ctx.socket.to_path_buf(),
            }),
            discover_socket: false,
            accel: Some(self.accel),
            shutdown_program: None,
        })
    }
}

/// Runs kernel/initrd/disk bundles under `qemu-system-x86_64 -M microvm`.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    engine: Engine<QemuLauncher>,
    accel: Accel,
}

impl QemuBackend {
    /// Open the backend: resolves the accelerator (warning when `auto` falls back to TCG)
    /// and recovers VM records from `cfg.data_dir`.
    pub async fn open(cfg: BackendConfig, opts: QemuOptions) -> Result<QemuBackend, VmError> {
        let (accel, warning) = detect_accel(opts.accel);
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        let launcher = QemuLauncher {
            qemu: opts.qemu_binary,
            accel,
            tsc_khz: host_tsc_khz(),
        };
        Ok(QemuBackend {
            engine: Engine::open(cfg, launcher).await?,
            accel,
        })
    }

    /// The accelerator every VM of this backend runs under.
    pub fn accelerator(&self) -> Accel {
        self.accel
    }
}

delegate_backend!(QemuBackend);

/// Boots `spec` (a bundle) with bare `qemu-system-x86_64` and the backend's exact
/// arguments, and returns the time from spawn until `marker` appears on its console (then
/// kills it). The baseline of the boot benchmarks.
pub async fn bare_boot(spec: &VmSpec, accel: Accel, dir: &Path, marker: &str) -> Result<Duration, String> {
    use tokio::io::AsyncReadExt;
    let sock = dir.join("bare.sock");
    let _ = std::fs::remove_file(&sock);
    let args = qemu_args(spec, accel, host_tsc_khz(), &sock, None, "").map_err(|e| e.to_string())?;
    let t0 = std::time::Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run qemu: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let n = out.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("qemu exited before the marker".to_string());
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return Ok(t0.elapsed());
            }
        }
    })
    .await
    .map_err(|_| "timeout".to_string())?;
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&sock);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Bundle, Disk};

    #[test]
    fn command_line() {
        let spec = VmSpec::new(
            "web",
            2,
            256,
            Boot::Bundle(Bundle {
                kernel: "/b/kernel".into(),
                initrd: Some("/b/initrd".into()),
                root_disk: Some(Disk {
                    path: "/b/disk.img".into(),
                    read_only: true,
                }),
                cmdline: "console=ttyS0".into(),
            }),
        );
        let args = qemu_args(
            &spec,
            Accel::Tcg,
            Some(2_000_000),
            Path::new("/d/control.sock"),
            Some(("bx1", "02:42:0a:00:00:02")),
            "blixard.ip=10.0.0.2/24",
        )
        .expect("args");
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        let joined = s.join(" ");
        assert!(
            joined.contains("-M microvm -accel tcg -smp 2 -m 256M"),
            "{joined}"
        );
        assert!(
            joined.contains("-append console=ttyS0 tsc_early_khz=2000000 blixard.ip=10.0.0.2/24"),
            "{joined}"
        );
        assert!(joined.contains("file=/b/disk.img,readonly=on"), "{joined}");
        assert!(joined.contains("ifname=bx1,script=no"), "{joined}");
        assert!(
            joined.ends_with("-qmp unix:/d/control.sock,server=on,wait=off"),
            "{joined}"
        );
        let kvm = qemu_args(&spec, Accel::Kvm, Some(1), Path::new("/s"), None, "").expect("args");
        let joined: Vec<String> = kvm
            .iter()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        assert!(joined.join(" ").contains("-accel kvm -cpu host"));
        assert!(!joined.join(" ").contains("tsc_early_khz"));
    }

    #[test]
    fn accel_modes() {
        assert_eq!(detect_accel(AccelMode::Tcg).0, Accel::Tcg);
        assert_eq!(detect_accel(AccelMode::Kvm).0, Accel::Kvm);
        let (a, warn) = detect_accel(AccelMode::Auto);
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(a, Accel::Tcg);
            assert!(warn.is_some());
        }
        assert!("bogus".parse::<AccelMode>().is_err());
    }
}

