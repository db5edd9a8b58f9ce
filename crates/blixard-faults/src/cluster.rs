//! Blixard node processes, one per namespace, and the CLI run from the clients' namespace.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::net::Net;
use crate::Error;

/// How long one CLI call may take before the harness gives up on it (outcome unknown).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct NodeProc {
    child: Option<Child>,
    stopped: bool,
}

/// A cluster of node processes in `net`.
#[derive(Debug)]
pub struct Cluster {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub net: Net,
    nodes: Vec<NodeProc>,
    /// Node ids, by index.
    pub ids: Vec<String>,
    /// A client ticket listing every member.
    pub ticket: String,
}

impl Cluster {
    /// Starts `n` nodes: node 0 initialises the cluster, the others join it as voters.
    pub fn start(bin: &Path, root: &Path, net: Net, n: usize) -> Result<Self, Error> {
        let mut c = Cluster { bin: bin.to_path_buf(), root: root.to_path_buf(), net, nodes: Vec::new(), ids: Vec::new(), ticket: String::new() };
        let id = c.spawn(0, &["--init"])?;
        c.ids.push(id);
        // The admin ticket of node 0 reaches node 0 only; enough to issue tickets.
        let admin = ["--data-dir".to_string(), c.node_dir(0).display().to_string()];
        let voter = c.ticket(&admin, "voter", "10m")?;
        for i in 1..n {
            let id = c.spawn(i, &["--join", &voter])?;
            c.ids.push(id);
        }
        c.ticket = c.ticket(&admin, "client", "24h")?;
        c.wait_healthy(Duration::from_secs(60))?;
        Ok(c)
    }

    /// Issues a ticket of `role` through the CLI.
    fn ticket(&self, reach: &[String], role: &str, ttl: &str) -> Result<String, Error> {
        let out = self.cli_with(reach, &["cluster", "ticket", "--role", role, "--ttl", ttl])?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| Error::Cli { args: "cluster ticket".into(), stderr: e.to_string() })?;
        v["ticket"].as_str().map(str::to_string).ok_or_else(|| Error::Cli { args: "cluster ticket".into(), stderr: format!("no ticket in {v}") })
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}"))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.log"))
    }

    /// Starts node `i` in its namespace; returns its id once it says it is ready.
    fn spawn(&mut self, i: usize, extra: &[&str]) -> Result<String, Error> {
        let listen = format!("{}:7000", self.net.ip_of(i));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).map_err(Error::Io)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.net.ns(i)])
            .arg(&self.bin)
            .args(["node", "run", "--data-dir"])
            .arg(self.node_dir(i))
            .args(["--listen", &listen, "--metrics-listen", "off"])
            .args(extra)
            .env("RUST_LOG", "info,openraft=warn,iroh=warn,iroh_blobs=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(Error::Io)?;
        let stdout = child.stdout.take().ok_or_else(|| Error::NodeStart { node: i, detail: "no stdout".into() })?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the node never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(Ok(l))) => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::NodeStart { node: i, detail: format!("no ready line; see {}", self.log_path(i).display()) });
            }
        };
        let id = line.split_whitespace().nth(1).ok_or_else(|| Error::NodeStart { node: i, detail: format!("bad ready line {line:?}") })?;
        let proc_ = NodeProc { child: Some(child), stopped: false };
        match self.nodes.get_mut(i) {
            Some(slot) => *slot = proc_,
            None => self.nodes.push(proc_),
        }
        Ok(id.to_string())
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].stopped = false;
    }

    /// Restarts a killed node from its data dir.
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        if self.nodes[i].child.is_none() {
            self.spawn(i, &[])?;
        }
        Ok(())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) node `i`.
    pub fn pause(&mut self, i: usize, stop: bool) {
        if let Some(c) = &self.nodes[i].child {
            let _ = Command::new("kill").arg(if stop { "-STOP" } else { "-CONT" }).arg(c.id().to_string()).status();
            self.nodes[i].stopped = stop;
        }
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].stopped
    }

    /// Runs the CLI in the clients' namespace with the client ticket.
    pub fn cli(&self, args: &[&str]) -> Result<Output, Error> {
        self.cli_with(&["--ticket".to_string(), self.ticket.clone()], args)
    }

    fn cli_with(&self, reach: &[String], args: &[&str]) -> Result<Output, Error> {
        run_cli(&self.bin, &self.net.clients_ns(), &self.root.join("cli"), reach, args)
    }

    /// The cluster status, as JSON.
    pub fn status(&self) -> Result<Value, Error> {
        let out = self.cli(&["cluster", "status"])?;
        serde_json::from_slice(&out.stdout).map_err(|e| Error::Cli { args: "cluster status".into(), stderr: e.to_string() })
    }

    /// Waits until every node is a healthy voter and there is a leader.
    pub fn wait_healthy(&self, within: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + within;
        let n = self.ids.len();
        while Instant::now() < deadline {
            if let Ok(s) = self.status() {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                let voters = members.iter().filter(|m| m["role"] == "voter" && m["healthy"] == true).count();
                if voters == n && !s["leader"].is_null() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(Error::Timeout(format!("{n} healthy voters and a leader within {within:?}")))
    }
}

/// Runs the CLI (`--json`) in namespace `ns`, reaching the cluster with `reach` (`--ticket T`
/// or `--data-dir D`); gives up after [`CLI_TIMEOUT`].
pub fn run_cli(bin: &Path, ns: &str, config: &Path, reach: &[String], args: &[&str]) -> Result<Output, Error> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .arg("--json")
        .args(reach)
        .args(args)
        .env("BLIXARD_CONFIG_DIR", config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Io)?;
    let deadline = Instant::now() + CLI_TIMEOUT;
    loop {
        if child.try_wait().map_err(Error::Io)?.is_some() {
            let out = child.wait_with_output().map_err(Error::Io)?;
            return if out.status.success() {
                Ok(out)
            } else {
                Err(Error::Cli { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::CliTimeout { args: args.join(" ") });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.pause(i, false);
            self.kill9(i);
        }
    }
}
