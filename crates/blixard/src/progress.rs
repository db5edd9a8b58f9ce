//! A one-line progress bar on stderr (bytes, rate, ETA), drawn only on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Bar {
    label: &'static str,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
}

impl Bar {
    pub fn new(label: &'static str) -> Self {
        Self { label, started: Instant::now(), last_draw: None, tty: std::io::stderr().is_terminal() }
    }

    /// Redraws at most 10 times a second.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.tty || self.last_draw.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        self.last_draw = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(0) as usize;
        let eta = if rate > 0.0 && total > done { format!("{:.0}s", (total - done) as f64 / rate) } else { "-".into() };
        let bar: String = (0..30).map(|i| if i * 100 / 30 < pct { '#' } else { '.' }).collect();
        let _ = write!(
            std::io::stderr().lock(),
            "\r{:<9} [{bar}] {:>3}% {} / {}  {}/s  ETA {eta}   ",
            self.label,
            pct,
            human(done),
            human(total),
            human(rate as u64)
        );
    }

    /// Ends the line.
    pub fn finish(&mut self, done: u64) {
        if self.tty {
            self.last_draw = None;
            self.update(done, done);
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

/// Bytes in binary units.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
