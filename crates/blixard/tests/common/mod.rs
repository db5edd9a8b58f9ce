//! A harness that runs real `blixard` node processes on loopback, each with its own data
//! dir, and drives them through the real CLI.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_blixard");

pub struct NodeProc {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub id: String,
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    /// Ticket used by the CLI; refreshed to list all members.
    pub client_ticket: Option<String>,
}

impl Cluster {
    pub fn new() -> Self {
        Self { root: tempfile::tempdir().expect("tempdir"), nodes: Vec::new(), client_ticket: None }
    }

    pub fn cli_config(&self) -> PathBuf {
        self.root.path().join("cli")
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("n{i}"))
    }

    /// Starts a node process with `args` after `node run --data-dir DIR`; waits for its
    /// "node ID listening" line.
    pub fn spawn(&mut self, dir: &Path, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(BIN);
        cmd.args(["node", "run", "--data-dir"]).arg(dir).args(["--metrics-listen", "127.0.0.1:0"]).args(args);
        // BLIXARD_TEST_LOG overrides the nodes' log filter when a test is being investigated.
        let filter = std::env::var("BLIXARD_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn,iroh_blobs=warn".into());
        cmd.env("RUST_LOG", filter).stdin(Stdio::null()).stdout(Stdio::piped());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("{}.log", dir.file_name().and_then(|n| n.to_str()).unwrap_or("node"))))
            .map_err(|e| e.to_string())?;
        cmd.stderr(log);
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the node never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(Ok(l))) => l,
            _ => {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!("node exited ({status}) before it was ready; log: {}", self.log_of(dir)));
            }
        };
        let id = line.split_whitespace().nth(1).ok_or("bad ready line")?.to_string();
        let idx = self.nodes.iter().position(|n| n.dir == dir);
        let proc_ = NodeProc { dir: dir.to_path_buf(), child: Some(child), id: id.clone() };
        match idx {
            Some(i) => self.nodes[i] = proc_,
            None => self.nodes.push(proc_),
        }
        Ok(id)
    }

    pub fn log_of(&self, dir: &Path) -> String {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("node");
        std::fs::read_to_string(self.root.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `node run --init` as node 0.
    pub fn init(&mut self) -> String {
        let dir = self.node_dir(0);
        self.spawn(&dir, &["--init"]).expect("init node")
    }

    /// Issues a ticket of `role` through the CLI.
    pub fn ticket(&self, role: &str, ttl: &str) -> String {
        let out = self.cli_ok(&["cluster", "ticket", "--role", role, "--ttl", ttl]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Starts node `i` joining with `ticket`.
    pub fn join(&mut self, i: usize, ticket: &str) -> Result<String, String> {
        let dir = self.node_dir(i);
        self.spawn(&dir, &["--join", ticket])
    }

    /// Runs the CLI against the cluster (admin ticket of node 0, or the refreshed client
    /// ticket).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.env("BLIXARD_CONFIG_DIR", self.cli_config()).env_remove("BLIXARD_TICKET");
        match &self.client_ticket {
            Some(t) => cmd.arg("--ticket").arg(t),
            None => cmd.arg("--data-dir").arg(self.node_dir(0)),
        };
        cmd.args(args).stdin(Stdio::null()).output().expect("run cli")
    }

    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "blixard {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        out
    }

    pub fn json(&self, args: &[&str]) -> Result<Value, String> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    pub fn status(&self) -> Result<Value, String> {
        self.json(&["cluster", "status"])
    }

    /// Makes the CLI use a client ticket listing all current members.
    pub fn refresh_client_ticket(&mut self) {
        self.client_ticket = Some(self.ticket("client", "1h"));
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "node {i} exited with {status} on SIGTERM");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("node {i} did not stop within 10 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Restarts node `i` from its data dir (resume).
    pub fn restart(&mut self, i: usize) -> String {
        let dir = self.nodes[i].dir.clone();
        self.spawn(&dir, &[]).expect("restart node")
    }

    pub fn index_of(&self, id: &str) -> usize {
        self.nodes.iter().position(|n| n.id == id).expect("known node")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            // BLIXARD_TEST_KEEP=DIR keeps the whole logs of a failed test for investigation.
            if let Ok(keep) = std::env::var("BLIXARD_TEST_KEEP") {
                for n in &self.nodes {
                    let name = n.dir.file_name().and_then(|n| n.to_str()).unwrap_or("node");
                    let _ = std::fs::create_dir_all(&keep);
                    let _ = std::fs::write(Path::new(&keep).join(format!("{name}.log")), self.log_of(&n.dir));
                }
            }
            for n in &self.nodes {
                eprintln!("==== log of {} ====\n{}", n.dir.display(), tail(&self.log_of(&n.dir), 60));
            }
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn members(status: &Value) -> Vec<Value> {
    status["members"].as_array().cloned().unwrap_or_default()
}

pub fn count_role(status: &Value, role: &str) -> usize {
    members(status).iter().filter(|m| m["role"] == role).count()
}

pub fn leader(status: &Value) -> Option<String> {
    status["leader"].as_str().map(str::to_string)
}

/// Init one node, join two by ticket: 3 voters, one leader, healthy.
pub fn three_nodes() -> Cluster {
    let mut c = Cluster::new();
    c.init();
    let t = c.ticket("voter", "10m");
    c.join(1, &t).expect("join 1");
    c.join(2, &t).expect("join 2");
    wait_for("3 healthy voters", Duration::from_secs(20), || {
        let s = c.status().ok()?;
        let healthy = members(&s).iter().filter(|m| m["healthy"] == true).count();
        (count_role(&s, "voter") == 3 && healthy == 3 && leader(&s).is_some()).then_some(())
    });
    c.refresh_client_ticket();
    c
}


/// GETs /metrics from the node whose data dir is `dir` (its address is in node.json).
pub fn scrape(dir: &std::path::Path) -> String {
    use std::io::{Read, Write};
    let local: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("node.json")).expect("node.json")).expect("json");
    let addr = local["metrics"].as_str().expect("metrics address recorded");
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The value of an unlabelled or labelled sample (`name` or `name{labels}`) in a scrape.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.split_whitespace().next() == Some(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// CI sets `BLIXARD_REQUIRE_REAL=1`: a missing prerequisite fails the test instead of
/// skipping it.
pub fn require_real() -> bool {
    std::env::var("BLIXARD_REQUIRE_REAL").is_ok_and(|v| v == "1")
}

/// Whether `bin` is on PATH.
pub fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}
