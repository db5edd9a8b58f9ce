//! Shared helpers for the real-guest tests: build the test guest, skip (or fail under
//! `BLIXARD_REQUIRE_REAL=1`) when prerequisites are missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use blixard_vmm::*;

/// Paths of the built test guest.
#[derive(Debug, Clone)]
pub struct Guest {
    pub dir: PathBuf,
}

impl Guest {
    pub fn bundle(&self) -> Bundle {
        Bundle::from_dir(&self.dir.join("bundle")).expect("bundle")
    }
    pub fn runner(&self, variant: &str) -> Runner {
        Runner {
            path: self.dir.join(variant),
            hypervisor: None,
            control_socket: None,
        }
    }
}

pub fn require_real() -> bool {
    std::env::var("BLIXARD_REQUIRE_REAL").is_ok_and(|v| v == "1")
}

/// Print a visible SKIP line, or panic when real tests are required.
pub fn skip(test: &str, why: &str) {
    if require_real() {
        panic!("{test}: prerequisite missing and BLIXARD_REQUIRE_REAL=1: {why}");
    }
    // Written to the real stderr (not `eprintln!`, which the test harness captures), so
    // the skip is visible in a plain `cargo test` run.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

fn build_lock() -> &'static Mutex<Option<Result<Guest, String>>> {
    static L: OnceLock<Mutex<Option<Result<Guest, String>>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(None))
}

/// Build (once per test binary; the recipe itself skips up-to-date builds) the test guest.
pub fn guest() -> Result<Guest, String> {
    let mut g = build_lock().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = g.as_ref() {
        return r.clone();
    }
    let r = build_guest();
    *g = Some(r.clone());
    r
}

fn build_guest() -> Result<Guest, String> {
    if which("qemu-system-x86_64").is_none() {
        return Err("qemu-system-x86_64 not found (apt-get install qemu-system-x86)".into());
    }
    let dir = match std::env::var_os("BLIXARD_TEST_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("blixard-test-guest"),
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/test-guest/build.sh");
    let out = std::process::Command::new("sh")
        .arg(&script)
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "test guest build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Guest { dir })
}

pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Root with `ip` and `nft`: networking tests can run.
pub fn net_capable() -> Result<(), String> {
    if !rustix_is_root() {
        return Err("networking tests need root (CAP_NET_ADMIN)".into());
    }
    for t in ["ip", "nft"] {
        if which(t).is_none()
            && !Path::new("/usr/sbin").join(t).exists()
            && !Path::new("/sbin").join(t).exists()
        {
            return Err(format!(
                "`{t}` not installed (apt-get install iproute2 nftables)"
            ));
        }
    }
    Ok(())
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("blixard_vmm=info")),
        )
        .with_test_writer()
        .try_init();
}

pub fn config(dir: &Path) -> BackendConfig {
    let mut c = BackendConfig::new(
        dir,
        Capacity {
            vcpus: 8,
            memory_mib: 4096,
        },
    );
    c.health_interval = Duration::from_millis(500);
    c
}

pub const READY: &str = "BLIXARD-GUEST-READY";
/// Generous: TCG boots take ~2.5 s alone, more when tests run in parallel.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Poll the status until `pred` holds.
pub async fn wait_status(
    b: &dyn VmBackend,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&VmStatus) -> bool,
) -> VmStatus {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let st = b.status(name).await.expect("status");
        if pred(&st) {
            return st;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("status of {name} never matched: {st:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything a deleted VM must not leave behind.
pub fn assert_no_leftovers(data_dir: &Path, name: &str, pid: Option<u32>, taps: &[String]) {
    let dir = data_dir.join("vms").join(name);
    assert!(!dir.exists(), "{} still exists", dir.display());
    if let Some(pid) = pid {
        assert!(!pid_alive(pid), "hypervisor {pid} still alive");
    }
    for t in taps {
        assert!(!link_exists(t), "tap {t} still exists");
    }
}

/// Kills every hypervisor recorded under a data dir (and removes test bridges/tables)
/// when dropped, so a failing test does not leak qemu processes or interfaces.
pub struct Janitor {
    pub data: tempfile::TempDir,
    pub bridges: Vec<String>,
    pub tables: Vec<String>,
}

impl Janitor {
    pub fn new() -> Janitor {
        Janitor {
            data: tempfile::tempdir().expect("tempdir"),
            bridges: Vec::new(),
            tables: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.data.path().join("vms")) {
            for e in rd.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                    let pid = pid.trim();
                    let _ = std::process::Command::new("kill")
                        .args(["-9", "--", &format!("-{pid}")])
                        .status();
                }
            }
        }
        for t in &self.tables {
            for fam in ["bridge", "inet"] {
                let _ = std::process::Command::new("nft")
                    .args(["delete", "table", fam, t])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        for b in &self.bridges {
            if link_exists(b) {
                let _ = std::process::Command::new("ip")
                    .args(["link", "del", b])
                    .status();
            }
        }
    }
}

/// Print to the real stderr (visible without `--nocapture`): accelerator, timings.
pub fn say(msg: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
