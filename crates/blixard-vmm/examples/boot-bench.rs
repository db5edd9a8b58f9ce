//! Boot benchmark: time from `VmBackend::start` to the guest's readiness marker, through
//! the qemu backend (bundle) and the microvm backend (runner), against bare qemu started
//! directly with the same kernel, initrd, disk and command line, interleaved in one run.
//!
//! ## Usage
//! `cargo run --release -p blixard-vmm --example boot-bench -- --boots 10`
//!
//! Options: `--boots N` (default 10), `--guest-dir DIR` (default `$BLIXARD_TEST_GUEST_DIR`
//! or `/tmp/blixard-test-guest`; built with `images/test-guest/build.sh` when needed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use blixard_vmm::qemu::detect_accel;
use blixard_vmm::*;

const MARKER: &str = "BLIXARD-GUEST-READY";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn stats(v: &[Duration]) -> (Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2
    };
    (s[0], median)
}

async fn bare_boot(spec: &VmSpec, accel: Accel, dir: &std::path::Path) -> Result<Duration, String> {
    blixard_vmm::qemu::bare_boot(spec, accel, dir, MARKER).await
}

async fn backend_boot(b: &dyn VmBackend, name: &str) -> Result<Duration, String> {
    let from = b
        .status(name)
        .await
        .map_err(|e| e.to_string())?
        .console_bytes;
    let t0 = Instant::now();
    b.start(name).await.map_err(|e| e.to_string())?;
    b.wait_console(name, MARKER, from, Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())?;
    let took = t0.elapsed();
    b.stop(name, StopOptions::forced())
        .await
        .map_err(|e| e.to_string())?;
    Ok(took)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let boots: usize = arg("--boots").and_then(|v| v.parse().ok()).unwrap_or(10);
    let guest_dir = arg("--guest-dir")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("BLIXARD_TEST_GUEST_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp/blixard-test-guest"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../images/test-guest/build.sh");
    let st = std::process::Command::new("sh")
        .arg(&script)
        .arg(&guest_dir)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !st.success() {
        return Err("test guest build failed".into());
    }
    let (accel, warning) = detect_accel(AccelMode::Auto);
    println!(
        "accelerator: {accel}{}",
        warning.map(|w| format!(" ({w})")).unwrap_or_default()
    );

    let data = std::env::temp_dir().join(format!("blixard-boot-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let cap = Capacity {
        vcpus: 4,
        memory_mib: 4096,
    };
    let qb = QemuBackend::open(
        BackendConfig::new(data.join("qemu"), cap),
        QemuOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mb = MicrovmBackend::open(BackendConfig::new(data.join("microvm"), cap))
        .await
        .map_err(|e| e.to_string())?;
    let bundle = Bundle::from_dir(&guest_dir.join("bundle")).map_err(|e| e.to_string())?;
    let spec = VmSpec::new("bench", 1, 256, Boot::Bundle(bundle));
    qb.create(spec.clone()).await.map_err(|e| e.to_string())?;
    let runner = Runner {
        path: guest_dir.join("runner"),
        hypervisor: None,
        control_socket: None,
    };
    mb.create(VmSpec::new("bench", 1, 256, Boot::Runner(runner)))
        .await
        .map_err(|e| e.to_string())?;

    let (mut bare, mut viaq, mut viam) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up round (page cache), not counted.
    bare_boot(&spec, accel, &data).await?;
    backend_boot(&qb, "bench").await?;
    backend_boot(&mb, "bench").await?;
    for i in 0..boots {
        let b = bare_boot(&spec, accel, &data).await?;
        let q = backend_boot(&qb, "bench").await?;
        let m = backend_boot(&mb, "bench").await?;
        println!(
            "boot {i:2}: bare {b:>10.3?}  qemu-backend {q:>10.3?}  microvm-backend {m:>10.3?}"
        );
        bare.push(b);
        viaq.push(q);
        viam.push(m);
    }
    let (bmin, bmed) = stats(&bare);
    let (qmin, qmed) = stats(&viaq);
    let (mmin, mmed) = stats(&viam);
    println!();
    println!("start -> {MARKER}, {boots} boots each, accelerator {accel}");
    println!(
        "{:<18} {:>10} {:>10} {:>14}",
        "", "min", "median", "ratio(median)"
    );
    println!(
        "{:<18} {:>10.3?} {:>10.3?} {:>14}",
        "bare qemu", bmin, bmed, "1.00"
    );
    println!(
        "{:<18} {:>10.3?} {:>10.3?} {:>14.3}",
        "qemu backend",
        qmin,
        qmed,
        qmed.as_secs_f64() / bmed.as_secs_f64()
    );
    println!(
        "{:<18} {:>10.3?} {:>10.3?} {:>14.3}",
        "microvm backend",
        mmin,
        mmed,
        mmed.as_secs_f64() / bmed.as_secs_f64()
    );
    println!(
        "ratio(min): qemu backend {:.3}, microvm backend {:.3}",
        qmin.as_secs_f64() / bmin.as_secs_f64(),
        mmin.as_secs_f64() / bmin.as_secs_f64()
    );
    println!(
        "bench process RSS: {} KiB now, {} KiB peak (VmHWM)",
        rss_kib("VmRSS:"),
        rss_kib("VmHWM:")
    );
    qb.delete("bench").await.map_err(|e| e.to_string())?;
    mb.delete("bench").await.map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
