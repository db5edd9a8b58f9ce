//! Child processes that never outlive the benchmark: killed when dropped (also while
//! unwinding from a panic), and on SIGINT/SIGTERM by a signal task that kills every live
//! child and removes the temp dir before exiting.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What the signal task must clean up: pids of live children and the temp dir.
#[derive(Default)]
struct Registry {
    pids: Vec<u32>,
    root: Option<PathBuf>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    f(&mut registry().lock().unwrap_or_else(|p| p.into_inner()))
}

/// Records the temp dir so that an interrupted run removes it too.
pub fn register_root(root: &Path) {
    with_registry(|r| r.root = Some(root.to_path_buf()));
}

/// Spawns a task that, on SIGINT or SIGTERM, kills every registered child, removes the
/// temp dir and exits with 130.
pub fn install_signal_handler(rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _guard = rt.enter();
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("\ninterrupted: stopping all cluster processes");
        let (pids, root) = with_registry(|r| (std::mem::take(&mut r.pids), r.root.take()));
        for pid in &pids {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).stderr(Stdio::null()).status();
        }
        // Give the kernel a moment to reap file handles before removing the data dirs.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(root) = root {
            let _ = std::fs::remove_dir_all(root);
        }
        std::process::exit(130);
    });
    Ok(())
}

/// One child process, with its log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A set of processes stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
#[derive(Default)]
pub struct Procs {
    pub list: Vec<Proc>,
}

impl Procs {
    /// Spawns `cmd` with stdout, stderr going to `log`, and registers it for cleanup.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<&mut Proc> {
        let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        self.push_spawned(name, cmd, log)
    }

    /// Spawns `cmd` with stdout piped (stderr to `log`), waits up to `timeout` for its
    /// first stdout line and returns it. The rest of stdout is drained by a thread.
    pub fn spawn_first_line(&mut self, name: &str, mut cmd: Command, log: &Path, timeout: Duration) -> anyhow::Result<String> {
        let err = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        let p = self.push_spawned(name, cmd, log)?;
        let stdout = p.child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        match rx.recv_timeout(timeout) {
            Ok(Some(Ok(line))) => Ok(line),
            _ => bail!("{name} did not start within {timeout:?}; log:\n{}", tail(log, 30)),
        }
    }

    fn push_spawned(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<&mut Proc> {
        let child = cmd.spawn().with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        with_registry(|r| r.pids.push(child.id()));
        self.list.push(Proc { name: name.to_string(), child, log: log.to_path_buf() });
        let last = self.list.len() - 1;
        Ok(&mut self.list[last])
    }

    /// Fails if any process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.list {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!("{} exited ({status}); log:\n{}", p.name, tail(&p.log, 30));
            }
        }
        Ok(())
    }

    /// SIGTERM all, wait up to 5 s, SIGKILL what is left, reap all.
    pub fn stop_all(&mut self) {
        for p in &mut self.list {
            if let Ok(None) = p.child.try_wait() {
                let _ = Command::new("kill").arg("-TERM").arg(p.pid().to_string()).stderr(Stdio::null()).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.list {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            let pid = p.pid();
            with_registry(|r| r.pids.retain(|x| *x != pid));
        }
        self.list.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Resident set size of `pid` in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    line.split_whitespace().nth(1).context("bad VmRSS line")?.parse().context("bad VmRSS value")
}

/// utime + stime of `pid` in clock ticks (fields 14 and 15 of /proc/PID/stat).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: count fields after its closing ')'.
    let rest = &s[s.rfind(')').context("bad /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11, stime index 12.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if unknown).
pub fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}
