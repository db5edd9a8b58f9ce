//! A 3-node Blixard cluster of real `blixard node run` processes on loopback, driven by
//! the real CLI, and the in-process write worker.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blixard_node::client::Client;
use blixard_types::rpc::{ClientRequest, ClientResponse};
use serde_json::Value;

use crate::procs::Procs;
use crate::workload::Worker;

pub struct BlixardCluster {
    pub procs: Procs,
    pub bin: PathBuf,
    pub dirs: Vec<PathBuf>,
    /// Node ids, in start order.
    pub ids: Vec<String>,
    /// BLIXARD_CONFIG_DIR of the CLI runs (its key).
    pub cli_config: PathBuf,
}

/// Starts node 0 with `--init`, two more joining as voters, and waits until the status
/// shows 3 healthy voters.
pub fn start(bin: &Path, root: &Path) -> anyhow::Result<BlixardCluster> {
    let mut c = BlixardCluster {
        procs: Procs::default(),
        bin: bin.to_path_buf(),
        dirs: (0..3).map(|i| root.join(format!("n{i}"))).collect(),
        ids: Vec::new(),
        cli_config: root.join("cli"),
    };
    c.spawn(0, &["--init"])?;
    let join = c.cli_stdout(&["cluster", "ticket", "--role", "voter"])?;
    for i in 1..3 {
        c.spawn(i, &["--join", &join])?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last;
    loop {
        c.procs.check_alive()?;
        match c.status() {
            Ok(s) => {
                let members = s["members"].as_array().cloned().unwrap_or_default();
                let ok = members.iter().filter(|m| m["role"] == "voter" && m["healthy"] == true).count();
                if ok >= 3 && s["leader"].is_string() {
                    return Ok(c);
                }
                last = format!("{ok} healthy voters");
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("the blixard cluster did not reach 3 healthy voters within 60 s ({last})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl BlixardCluster {
    fn spawn(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        let dir = &self.dirs[i];
        let mut cmd = Command::new(&self.bin);
        cmd.args(["node", "run", "--data-dir"]).arg(dir).args(extra);
        let log = dir.with_extension("log");
        let line = self.procs.spawn_first_line(&format!("blixard node {i}"), cmd, &log, Duration::from_secs(60))?;
        // "node <ID> listening on [...]"
        let id = match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["node", id, "listening", ..] => id.to_string(),
            _ => bail!("unexpected first line from blixard node {i}: {line:?}"),
        };
        self.ids.push(id);
        Ok(())
    }

    /// Runs `blixard --data-dir N0 ARGS` (the admin ticket of node 0).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.bin)
            .env("BLIXARD_CONFIG_DIR", &self.cli_config)
            .env_remove("BLIXARD_TICKET")
            .arg("--data-dir")
            .arg(&self.dirs[0])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))
    }

    pub fn cli_stdout(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("blixard {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `blixard --json cluster status`.
    pub fn status(&self) -> anyhow::Result<Value> {
        let s = self.cli_stdout(&["--json", "cluster", "status"])?;
        serde_json::from_str(&s).context("cluster status is not JSON")
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.list.iter().map(|p| p.pid()).collect()
    }
}

/// A worker writing label `k<worker>` = counter on one node, through a shared client.
pub struct BlixardWorker {
    pub client: Arc<Client>,
    pub node: String,
    pub key: String,
}

impl Worker for BlixardWorker {
    fn op(&mut self, i: u64) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + '_>> {
        Box::pin(async move {
            let req = ClientRequest::Label {
                node: self.node.clone(),
                set: BTreeMap::from([(self.key.clone(), i.to_string())]),
                remove: vec![],
            };
            match self.client.request(&req).await? {
                ClientResponse::Ok => Ok(()),
                other => bail!("unexpected answer to a label write: {other:?}"),
            }
        })
    }
}
