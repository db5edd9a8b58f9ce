//! The closed-loop write workload: N workers, each sending one write at a time, for a
//! warm-up and then a measured window. Only requests that start and finish inside the
//! window count.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One write of one worker: `op(i)` performs write number `i`.
pub trait Worker: Send + 'static {
    fn op(&mut self, i: u64) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + '_>>;
}

/// How long one write may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub system: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub writes: u64,
    pub writes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

struct WorkerResult {
    lat_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `workers` concurrently: `warmup` unmeasured, then `duration` measured.
pub async fn run<W: Worker>(system: &str, workers: Vec<W>, warmup: Duration, duration: Duration) -> anyhow::Result<Stats> {
    let concurrency = workers.len();
    let start = Instant::now();
    let from = start + warmup;
    let until = from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut w in workers {
        tasks.spawn(async move {
            let mut res = WorkerResult { lat_us: Vec::with_capacity(1 << 16), errors: 0, first_error: None };
            let mut i = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let r = tokio::time::timeout(OP_TIMEOUT, w.op(i)).await;
                let t1 = Instant::now();
                i += 1;
                let err = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some(format!("no answer within {OP_TIMEOUT:?}")),
                };
                match err {
                    None if t0 >= from && t1 <= until => {
                        res.lat_us.push(u32::try_from((t1 - t0).as_micros()).unwrap_or(u32::MAX))
                    }
                    None => {}
                    Some(e) => {
                        if t0 >= from {
                            res.errors += 1;
                        }
                        res.first_error.get_or_insert(e);
                        // Do not spin on a persistent failure.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            res
        });
    }
    let mut lat: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        let r = r.map_err(|e| anyhow::anyhow!("a worker panicked: {e}"))?;
        lat.extend_from_slice(&r.lat_us);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    lat.sort_unstable();
    let secs = duration.as_secs_f64();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    let mean = if lat.is_empty() { f64::NAN } else { lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0 };
    Ok(Stats {
        system: system.to_string(),
        concurrency,
        seconds: secs,
        writes: lat.len() as u64,
        writes_per_s: lat.len() as f64 / secs,
        p50_ms: pct(50.0),
        p99_ms: pct(99.0),
        mean_ms: mean,
        max_ms: lat.last().map(|&x| x as f64 / 1000.0).unwrap_or(f64::NAN),
        errors,
        first_error,
    })
}

/// Median and p90 of a sample, in the sample's unit.
pub fn median_p90(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    let p90 = v[((0.9 * n as f64).ceil() as usize).clamp(1, n) - 1];
    (median, p90)
}
