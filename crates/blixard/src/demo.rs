//! `blixard demo`: a local cluster of real node processes on loopback, in one directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blixard_node::client::Client;
use blixard_types::rpc::{ClientRequest, ClientResponse};
use blixard_types::{Role, Ticket};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where the nodes keep their data (default: a new directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How many nodes to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
    nodes: u8,
    /// Stop the nodes after printing the status instead of running until Ctrl-C.
    #[arg(long)]
    exit: bool,
    /// A bundle dir of the test guest (default: build it with images/test-guest/build.sh,
    /// found from the current directory).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Only start the cluster; boot no VM.
    #[arg(long)]
    no_vm: bool,
}

/// Node processes that are killed when dropped, so a failed demo leaves nothing running.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("blixard-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the blixard executable")?;
    let mut procs = Procs(Vec::new());

    eprintln!("starting {} nodes in {}", args.nodes, dir.display());
    let first = dir.join("n1");
    let resume = first.join("raft.redb").exists();
    procs.0.push(spawn(&exe, &dir, &first, if resume { &[] } else { &["--init"] })?);
    let admin = std::fs::read_to_string(first.join("admin.ticket")).context("reading admin.ticket")?;
    let key = blixard_mesh::identity::load_or_create(&dir.join("cli/cli.key"))?;
    let client = Client::new(key.clone(), Ticket::decode(&admin)?).await?;
    let join = match client.request(&ClientRequest::CreateTicket { role: Role::Voter, ttl_ms: 600_000 }).await? {
        ClientResponse::Ticket { ticket, .. } => ticket,
        other => bail!("unexpected answer {other:?}"),
    };
    // The ticket goes through a private file, not the command line (visible in `ps`).
    let join_file = dir.join("join.ticket");
    blixard_node::config::write_atomic(&join_file, join.as_bytes(), 0o600)?;
    let join_file = join_file.to_string_lossy().into_owned();
    for i in 2..=args.nodes {
        let d = dir.join(format!("n{i}"));
        let join_args: Vec<&str> = if d.join("raft.redb").exists() { vec![] } else { vec!["--join-file", &join_file] };
        procs.0.push(spawn(&exe, &dir, &d, &join_args)?);
    }
    // A client ticket naming every member, so the CLI works while any one is down.
    let ticket = match client.request(&ClientRequest::CreateTicket { role: Role::Client, ttl_ms: 7 * 86_400_000 }).await? {
        ClientResponse::Ticket { ticket, .. } => ticket,
        other => bail!("unexpected answer {other:?}"),
    };
    std::fs::write(dir.join("client.ticket"), &ticket)?;
    let status = wait_healthy(&client, args.nodes as usize).await?;
    client.close().await;
    let vm = if args.no_vm {
        None
    } else {
        let bundle = match args.guest {
            Some(g) => g,
            None => build_guest(&dir)?,
        };
        Some(boot_vm(&exe, &dir, &ticket, &bundle, &status)?)
    };
    let (image, vm) = match vm {
        Some((i, v)) => (Some(i), Some(v)),
        None => (None, None),
    };
    if json {
        crate::output::json(&serde_json::json!({ "cluster": status, "image": image, "vm": vm }))?;
    } else {
        let cli = |args: &[&str]| -> anyhow::Result<()> {
            let out = cli_command(&exe, &dir, &ticket).args(args).output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            Ok(())
        };
        println!("$ blixard cluster status");
        cli(&["cluster", "status"])?;
        if vm.is_some() {
            println!("\n$ blixard vm list");
            cli(&["vm", "list"])?;
            println!("\n$ blixard vm logs demo | tail -3");
            let out = cli_command(&exe, &dir, &ticket).args(["vm", "logs", "demo"]).output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(3)..] {
                println!("{l}");
            }
        }
        println!();
        println!("Try:  export BLIXARD_TICKET=$(cat {})", dir.join("client.ticket").display());
        println!("      blixard vm list; blixard vm pause demo --wait; blixard vm logs demo --follow");
    }
    if args.exit {
        return Ok(());
    }
    eprintln!("nodes running; logs in {}/*.log; Ctrl-C stops them", dir.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The demo's CLI: its own key under DIR/cli, the demo's client ticket.
fn cli_command(exe: &Path, dir: &Path, ticket: &str) -> Command {
    let mut c = Command::new(exe);
    c.env("BLIXARD_CONFIG_DIR", dir.join("cli")).arg("--ticket").arg(ticket).stdin(Stdio::null());
    c
}

/// Builds the test guest with `images/test-guest/build.sh`, looked for from the current
/// directory upwards (the demo is run from the repository).
fn build_guest(dir: &Path) -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    let script = cwd
        .ancestors()
        .map(|d| d.join("images/test-guest/build.sh"))
        .find(|p| p.is_file())
        .context("cannot find images/test-guest/build.sh: run the demo from the Blixard repository, or pass --guest BUNDLE_DIR")?;
    let out = dir.join("guest");
    eprintln!("building the test guest ({})", script.display());
    // Its chatter goes to stderr: stdout is for the demo's output (one JSON document with --json).
    let st = Command::new("sh").arg(&script).arg(&out).stdout(std::io::stderr()).status().context("running build.sh")?;
    if !st.success() {
        bail!("the test guest build failed (it needs linux-image-cloud-amd64, busybox-static, e2fsprogs, cpio; see its message above)");
    }
    Ok(out.join("bundle"))
}

/// Pushes the guest through the CLI (to the first node), then creates a VM that must run on
/// another node, so it boots from an image fetched from a peer. Returns the pushed image's
/// and the VM's info.
fn boot_vm(
    exe: &Path,
    dir: &Path,
    ticket: &str,
    bundle: &Path,
    status: &blixard_types::rpc::ClusterStatus,
) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let cli = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = cli_command(exe, dir, ticket).arg("--json").args(args).stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("blixard {} failed", args.join(" "));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    eprintln!("pushing the test guest image");
    let image = cli(&["image", "push", &bundle.to_string_lossy(), "--name", "test-guest"])?;
    let holder = image["nodes"][0].as_str().unwrap_or_default().to_string();
    let host = status.members.iter().map(|m| m.id.to_string()).find(|id| *id != holder);
    let mut create = vec!["vm", "create", "demo", "--image", "test-guest", "--health", "console:BLIXARD-GUEST-READY", "--wait", "--timeout", "5m"];
    if let Some(h) = &host {
        cli(&["node", "label", h, "demo-host=yes"])?;
        create.extend(["--constraint", "demo-host=yes"]);
    }
    eprintln!("creating VM demo (the image is on {}; the VM must run elsewhere, so its node fetches the image from a peer)", &holder[..holder.len().min(10)]);
    let started = Instant::now();
    let vm = cli(&create)?;
    eprintln!("VM demo ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok((image, vm))
}

fn spawn(exe: &Path, root: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("node").to_string();
    let log = std::fs::File::create(root.join(format!("{name}.log")))?;
    let mut child = Command::new(exe)
        .args(["node", "run", "--data-dir"])
        .arg(dir)
        // Several nodes on one host: each serves metrics on a port of its own.
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start a node process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(l)) if l.starts_with("node ") => eprintln!("  {name}: {l}"),
        _ => bail!("node {name} failed to start; see {}/{name}.log", root.display()),
    }
    // Keep draining stdout so the node never blocks on it.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

async fn wait_healthy(client: &Client, n: usize) -> anyhow::Result<blixard_types::rpc::ClusterStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let ClientResponse::Status(s) = client.request(&ClientRequest::Status).await? {
            if s.members.len() == n && s.members.iter().all(|m| m.healthy) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("the cluster did not become healthy within 30 s");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
