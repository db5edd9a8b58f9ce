//! `blixard vm ...`: create VMs and change what they should be; `--wait` follows them
//! until they are there (or failed, with the reason).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blixard_node::client::Client;
use blixard_types::rpc::{ApiError, ClientRequest, ClientResponse, VmInfo};
use blixard_types::vm::{Desired, HealthCheck, RestartPolicy, VmSpec};

use crate::output;

#[derive(clap::Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM from an image; the cluster places it and its node boots it.
    Create(CreateArgs),
    /// Start a stopped (or failed) VM.
    Start(Target),
    /// Stop a VM (the guest gets 10 s to power off).
    Stop(Target),
    /// Pause a VM's vCPUs.
    Pause(Target),
    /// Resume a paused VM.
    Resume(Target),
    /// Reset a VM's guest.
    Reboot(Target),
    /// Stop a VM and remove it everywhere.
    Delete(Target),
    /// One VM: what it is, what it should be, where, and its last error.
    Info { name: String },
    /// Every VM.
    List,
    /// A VM's serial console output.
    Logs {
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct Target {
    name: String,
    /// Return only when the VM got there (or failed, with the reason).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. 90s, 5m.
    #[arg(long, default_value = "5m", value_parser = crate::parse_duration_ms)]
    timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    name: String,
    /// Image: a name, a hash or a unique hash prefix (see `blixard image list`).
    #[arg(long)]
    image: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Disk the VM needs on its node, in GiB.
    #[arg(long, default_value_t = 0)]
    disk_gib: u64,
    /// A label of the VM (repeatable), k=v.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// A node label the VM requires (repeatable), k=v.
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// VMs of one group are placed on different nodes.
    #[arg(long)]
    anti_affinity: Option<String>,
    #[arg(long, default_value = "always")]
    restart: RestartPolicy,
    /// When the VM is ready: console:TEXT (default: its console shows output).
    #[arg(long)]
    health: Option<HealthCheck>,
    /// Record the VM stopped instead of starting it.
    #[arg(long)]
    no_start: bool,
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value = "5m", value_parser = crate::parse_duration_ms)]
    timeout: u64,
}

pub async fn run(cmd: VmCmd, client: &Client, json: bool) -> anyhow::Result<()> {
    let (name, req, wait, timeout, goal) = match cmd {
        VmCmd::Create(a) => {
            let spec = VmSpec {
                name: a.name.clone(),
                image: a.image,
                vcpus: a.vcpus,
                memory_mib: a.memory_mib,
                disk_gib: a.disk_gib,
                labels: pairs(&a.labels)?,
                constraints: pairs(&a.constraints)?,
                anti_affinity: a.anti_affinity,
                restart: a.restart,
                health: a.health,
            };
            spec.validate()?;
            let goal = if a.no_start { Goal::Stopped } else { Goal::Ready };
            (a.name, ClientRequest::VmCreate { spec, start: !a.no_start }, a.wait, a.timeout, goal)
        }
        VmCmd::Start(t) => set(t, Desired::Running, Goal::Ready),
        VmCmd::Stop(t) => set(t, Desired::Stopped, Goal::Stopped),
        VmCmd::Pause(t) => set(t, Desired::Paused, Goal::Paused),
        VmCmd::Resume(t) => set(t, Desired::Running, Goal::Ready),
        VmCmd::Reboot(t) => (t.name.clone(), ClientRequest::VmReboot { name: t.name }, t.wait, t.timeout, Goal::Ready),
        VmCmd::Delete(t) => (t.name.clone(), ClientRequest::VmDelete { name: t.name }, t.wait, t.timeout, Goal::Gone),
        VmCmd::Info { name } => {
            let v = info(client, &name).await?;
            return if json { output::json(&v) } else { output::vm(&v) };
        }
        VmCmd::List => {
            let ClientResponse::Vms(list) = client.request(&ClientRequest::VmList).await? else { bail!("unexpected answer") };
            return if json { output::json(&list) } else { output::vms(&list) };
        }
        VmCmd::Logs { name, follow } => return logs(client, &name, follow).await,
    };
    match client.request(&req).await? {
        ClientResponse::Ok => {}
        other => bail!("unexpected answer {other:?}"),
    }
    if !wait {
        return if json { output::json(&serde_json::json!({ "ok": true })) } else { Ok(()) };
    }
    let v = wait_for(client, &name, goal, Duration::from_millis(timeout)).await?;
    if json {
        output::json(&v)
    } else {
        let node = v.as_ref().and_then(|v| v.node).map(|n| n.short()).unwrap_or_default();
        match v {
            Some(v) => output::line(&format!("{} {} on {node}", v.name, v.state)),
            None => output::line(&format!("{name} deleted")),
        }
    }
}

fn set(t: Target, desired: Desired, goal: Goal) -> (String, ClientRequest, bool, u64, Goal) {
    (t.name.clone(), ClientRequest::VmSetDesired { name: t.name, desired }, t.wait, t.timeout, goal)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Goal {
    /// Running and healthy.
    Ready,
    Paused,
    Stopped,
    Gone,
}

async fn info(client: &Client, name: &str) -> anyhow::Result<VmInfo> {
    match client.request(&ClientRequest::VmInfo { name: name.to_string() }).await? {
        ClientResponse::Vm(v) => Ok(v),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Polls the VM until it reaches `goal`; a failed VM ends the wait with its error.
async fn wait_for(client: &Client, name: &str, goal: Goal, timeout: Duration) -> anyhow::Result<Option<VmInfo>> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = match client.request(&ClientRequest::VmInfo { name: name.to_string() }).await {
            Ok(ClientResponse::Vm(v)) => v,
            Err(blixard_node::client::ClientError::Api(ApiError::Refused(_))) if goal == Goal::Gone => return Ok(None),
            Ok(other) => bail!("unexpected answer {other:?}"),
            // A member that does not answer for a moment (restarting, an election) does not
            // end the wait; the deadline does.
            Err(e @ blixard_node::client::ClientError::Unreachable(_)) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "vm info failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let reached = match goal {
            Goal::Ready => v.state == "running" && v.healthy == Some(true),
            Goal::Paused => v.state == "paused",
            Goal::Stopped => v.state == "stopped",
            Goal::Gone => false,
        };
        if reached {
            return Ok(Some(v));
        }
        if v.state == "failed" && goal != Goal::Gone {
            bail!("VM {name} failed: {}", v.error.as_deref().unwrap_or("no error recorded"));
        }
        if Instant::now() >= deadline {
            let why = v.error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
            bail!("VM {name} is still {} after {}s{why}", v.state, timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn logs(client: &Client, name: &str, follow: bool) -> anyhow::Result<()> {
    let mut offset = 0;
    loop {
        let req = ClientRequest::VmLogs { name: name.to_string(), offset, max_bytes: 256 * 1024 };
        let ClientResponse::Logs(chunk) = client.request(&req).await? else { bail!("unexpected answer") };
        if chunk.skipped > 0 && offset > 0 {
            eprintln!("[{} bytes of older output rotated away]", chunk.skipped);
        }
        std::io::stdout().lock().write_all(&chunk.data).context("writing to stdout")?;
        let more = chunk.next > offset && !chunk.data.is_empty();
        offset = chunk.next;
        if !more {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn pairs(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    args.iter()
        .map(|a| {
            a.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).with_context(|| format!("{a:?} must be k=v"))
        })
        .collect()
}
