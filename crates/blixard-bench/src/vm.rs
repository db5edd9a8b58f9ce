//! VM boot through the cluster against bare qemu, in one run:
//! - warm: `vm create --wait` (image already on the node) → ready, vs a bare qemu boot of
//!   the same bundle to the same console marker;
//! - cold: the same, with the image fetched from a peer first, vs `image pull` to a node
//!   plus a bare boot.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use blixard_vmm::qemu::{bare_boot, detect_accel};
use blixard_vmm::{AccelMode, Boot, Bundle, VmSpec};
use serde::Serialize;
use serde_json::Value;

use crate::blixard::BlixardCluster;

const MARKER: &str = "BLIXARD-GUEST-READY";

#[derive(Debug, Serialize)]
pub struct VmStats {
    pub boots: usize,
    pub accelerator: String,
    pub bare_median_s: f64,
    pub warm_median_s: f64,
    pub warm_ratio: f64,
    pub cold_median_s: f64,
    pub fetch_median_s: f64,
    pub cold_baseline_median_s: f64,
    pub cold_ratio: f64,
    pub image_bytes: u64,
}

/// Builds the test guest with the repository's recipe.
fn guest(root: &Path) -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/test-guest/build.sh");
    let out = root.join("guest");
    let st = std::process::Command::new("sh")
        .arg(&script)
        .arg(&out)
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !st.success() {
        bail!("the test guest build failed (needs qemu-system-x86, linux-image-cloud-amd64, busybox-static, e2fsprogs, cpio)");
    }
    Ok(out.join("bundle"))
}

fn json(c: &BlixardCluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&c.cli_stdout(&a)?).context("not JSON")
}

fn timed(c: &BlixardCluster, args: &[&str]) -> anyhow::Result<f64> {
    let t = Instant::now();
    c.cli_stdout(args)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Pushes the guest and returns a node that does not hold it (labelled `benchhost=TAG`).
fn push_elsewhere(c: &BlixardCluster, bundle: &Path, tag: &str) -> anyhow::Result<(String, u64)> {
    let img = json(c, &["image", "push", &bundle.to_string_lossy(), "--name", "bench"])?;
    let holder = img["nodes"][0].as_str().unwrap_or_default();
    let other = c.ids.iter().find(|id| id.as_str() != holder).context("no second node")?.clone();
    c.cli_stdout(&["node", "label", &other, &format!("benchhost={tag}")])?;
    Ok((other, img["size"].as_u64().unwrap_or(0)))
}

fn create_wait(c: &BlixardCluster, name: &str, tag: &str) -> anyhow::Result<f64> {
    let constraint = format!("benchhost={tag}");
    let health = format!("console:{MARKER}");
    let t = timed(c, &["vm", "create", name, "--image", "bench", "--constraint", &constraint, "--health", &health, "--wait", "--timeout", "5m"])?;
    c.cli_stdout(&["vm", "delete", name, "--wait"])?;
    Ok(t)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(rt: &tokio::runtime::Runtime, c: &BlixardCluster, root: &Path, boots: usize) -> anyhow::Result<VmStats> {
    let bundle = guest(root)?;
    let (accel, _) = detect_accel(AccelMode::Auto);
    let bare_dir = root.join("bare");
    std::fs::create_dir_all(&bare_dir)?;
    let spec = VmSpec::new("bare", 1, 256, Boot::Bundle(Bundle::from_dir(&bundle).map_err(|e| anyhow::anyhow!("{e}"))?));
    let bare = || -> anyhow::Result<f64> {
        Ok(rt.block_on(bare_boot(&spec, accel, &bare_dir, MARKER)).map_err(anyhow::Error::msg)?.as_secs_f64())
    };

    // Warm: the image is on the node before the clock starts.
    let (host, size) = push_elsewhere(c, &bundle, "warm")?;
    c.cli_stdout(&["image", "pull", "bench", "--node", &host])?;
    bare()?; // page cache warm-up, not counted
    create_wait(c, "warmup", "warm")?;
    let (mut b, mut w) = (Vec::new(), Vec::new());
    for i in 0..boots {
        b.push(bare()?);
        w.push(create_wait(c, &format!("warm{i}"), "warm")?);
        eprintln!("  warm {i}: bare {:.2} s, vm create --wait {:.2} s", b[i], w[i]);
    }
    c.cli_stdout(&["node", "label", &host, "benchhost-"])?;
    c.cli_stdout(&["image", "rm", "bench"])?;

    // Cold: the node fetches the image from the node the push reached.
    let (mut cold, mut fetch, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..boots {
        let tag = format!("cold{i}");
        let (host, _) = push_elsewhere(c, &bundle, &tag)?;
        cold.push(create_wait(c, &format!("cold{i}"), &tag)?);
        c.cli_stdout(&["node", "label", &host, "benchhost-"])?;
        c.cli_stdout(&["image", "rm", "bench"])?;
        let (host, _) = push_elsewhere(c, &bundle, &tag)?;
        let f = timed(c, &["image", "pull", "bench", "--node", &host])?;
        let bb = bare()?;
        fetch.push(f);
        base.push(f + bb);
        eprintln!("  cold {i}: vm create --wait {:.2} s; pull {f:.2} s + bare {bb:.2} s", cold[i]);
        c.cli_stdout(&["node", "label", &host, "benchhost-"])?;
        c.cli_stdout(&["image", "rm", "bench"])?;
    }
    let bare_median_s = median(b);
    let warm_median_s = median(w);
    let cold_median_s = median(cold);
    let cold_baseline_median_s = median(base);
    Ok(VmStats {
        boots,
        accelerator: accel.to_string(),
        bare_median_s,
        warm_median_s,
        warm_ratio: warm_median_s / bare_median_s,
        cold_median_s,
        fetch_median_s: median(fetch),
        cold_baseline_median_s,
        cold_ratio: cold_median_s / cold_baseline_median_s,
        image_bytes: size,
    })
}

