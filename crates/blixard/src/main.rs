//! `blixard`: the node daemon (`node run`) and the CLI that talks to a cluster over iroh.
//!
//! **Invariant:** the only crate that knows clap and terminal output. Errors are printed
//! once, with their cause chain, by `main`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use blixard_node::client::Client;
use blixard_types::rpc::{ClientRequest, ClientResponse};
use blixard_types::{Role, Ticket};
use clap::{Parser, Subcommand};

mod config;
mod demo;
mod image;
mod progress;
mod vm;
mod notify;
mod output;
mod run;

#[derive(Parser, Debug)]
#[command(name = "blixard", version, about = "Run micro-VMs on a mesh of machines that trust nothing but keys")]
struct Cli {
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Client ticket to reach the cluster (else $BLIXARD_TICKET, else DATA_DIR/admin.ticket).
    #[arg(long, global = true, env = "BLIXARD_TICKET", hide_env_values = true)]
    ticket: Option<String>,
    /// A node's data dir (for `node run`; for other commands, where admin.ticket is read).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run and manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster membership and tickets.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// VM images on the mesh.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Start a local cluster of node processes on loopback, boot a VM, show its status.
    Demo(demo::DemoArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) of blixard.
    Man,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Run a node in the foreground (stops cleanly on SIGTERM/SIGINT).
    Run(run::RunArgs),
    /// Show the effective configuration (config file, then flags, then defaults).
    Config {
        /// Print it (as TOML, or JSON with --json).
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        node: config::NodeFlags,
    },
    /// One node's own view: its Raft state, applied index and state digest.
    Status { node: String },
    /// Take no new VMs and move this node's VMs elsewhere (`--undo` ends the drain).
    Drain {
        node: String,
        #[arg(long)]
        undo: bool,
    },
    /// Add or update labels (k=v), or remove them (k-).
    Label {
        node: String,
        #[arg(required = true)]
        labels: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Print a ticket that lets a node join (voter, learner) or a CLI connect (client).
    Ticket {
        #[arg(long, default_value = "voter")]
        role: Role,
        /// How long the ticket is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration_ms)]
        ttl: u64,
    },
    /// Revoke a ticket by its id (printed when it was made).
    RevokeTicket { id: String },
    /// Cluster id, leader, term and members.
    Status,
    /// Remove a node for good: its key is refused from then on.
    Remove { node: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_run = matches!(cli.cmd, Cmd::Node(NodeCmd::Run(_)) | Cmd::Demo(_));
    // The CLI's contract is one line on stderr per error: iroh's internal complaints about
    // abandoned dials stay out of it unless RUST_LOG asks for them.
    init_tracing(if is_run { "info,openraft=warn,iroh_blobs=warn" } else { "warn,iroh=off" });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: logs in files and the journal stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Node(NodeCmd::Run(args)) => run::run(cli.data_dir, args).await,
        Cmd::Node(NodeCmd::Config { print, node }) => {
            let eff = config::effective(cli.data_dir, &node)?;
            if cli.json {
                output::json(&eff)
            } else if print {
                output::line(eff.to_toml()?.trim_end())
            } else {
                bail!("nothing to do: pass --print")
            }
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "blixard", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Cmd::Demo(args) => demo::run(args, cli.json).await,
        Cmd::Image(cmd) => {
            let client = connect(&cli.ticket, &cli.data_dir).await?;
            let r = image::run(cmd, &client, cli.json).await;
            client.close().await;
            r
        }
        Cmd::Vm(cmd) => {
            let client = connect(&cli.ticket, &cli.data_dir).await?;
            let r = vm::run(cmd, &client, cli.json).await;
            client.close().await;
            r
        }
        Cmd::Node(NodeCmd::Drain { node, undo }) => {
            expect_ok(request(&cli.ticket, &cli.data_dir, &ClientRequest::NodeDrain { node, drain: !undo }).await?, cli.json)
        }
        Cmd::Node(NodeCmd::Label { node, labels }) => {
            let (set, remove) = parse_labels(&labels)?;
            let req = ClientRequest::Label { node, set, remove };
            expect_ok(request(&cli.ticket, &cli.data_dir, &req).await?, cli.json)
        }
        Cmd::Node(NodeCmd::Status { node }) => {
            let resp = request(&cli.ticket, &cli.data_dir, &ClientRequest::NodeStatus { node }).await?;
            let ClientResponse::Node(n) = resp else { bail!("unexpected answer: {resp:?}") };
            if cli.json {
                output::json(&n)
            } else {
                output::node_status(&n)
            }
        }
        Cmd::Cluster(ClusterCmd::Ticket { role, ttl }) => {
            let resp = request(&cli.ticket, &cli.data_dir, &ClientRequest::CreateTicket { role, ttl_ms: ttl }).await?;
            let ClientResponse::Ticket { ticket, id, expires_at_ms } = resp else {
                bail!("unexpected answer: {resp:?}")
            };
            if cli.json {
                output::json(&serde_json::json!({ "ticket": ticket, "id": id, "role": role.as_str(), "expires_at_ms": expires_at_ms }))
            } else {
                output::line(&ticket)
            }
        }
        Cmd::Cluster(ClusterCmd::RevokeTicket { id }) => {
            expect_ok(request(&cli.ticket, &cli.data_dir, &ClientRequest::RevokeTicket { id }).await?, cli.json)
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let resp = request(&cli.ticket, &cli.data_dir, &ClientRequest::Status).await?;
            let ClientResponse::Status(status) = resp else { bail!("unexpected answer: {resp:?}") };
            if cli.json {
                output::json(&status)
            } else {
                output::status(&status)
            }
        }
        Cmd::Cluster(ClusterCmd::Remove { node }) => {
            expect_ok(request(&cli.ticket, &cli.data_dir, &ClientRequest::RemoveNode { node }).await?, cli.json)
        }
    }
}

fn expect_ok(resp: ClientResponse, json: bool) -> anyhow::Result<()> {
    match resp {
        ClientResponse::Ok if json => output::json(&serde_json::json!({ "ok": true })),
        ClientResponse::Ok => Ok(()),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// Finds the client ticket: `--ticket`, `$BLIXARD_TICKET`, or `DATA_DIR/admin.ticket`.
fn find_ticket(ticket: &Option<String>, data_dir: &Option<PathBuf>) -> anyhow::Result<Ticket> {
    let text = match (ticket, data_dir) {
        (Some(t), _) => t.clone(),
        (None, Some(dir)) => {
            let path = dir.join("admin.ticket");
            std::fs::read_to_string(&path).with_context(|| format!("cannot read the client ticket {}", path.display()))?
        }
        (None, None) => bail!("no cluster given: pass --ticket T, set BLIXARD_TICKET, or pass --data-dir of a node"),
    };
    Ticket::decode(&text).context("invalid ticket")
}

/// The CLI's own key, created on first use in `$BLIXARD_CONFIG_DIR` (default
/// `~/.config/blixard`).
fn cli_key() -> anyhow::Result<iroh::SecretKey> {
    let dir = match std::env::var_os("BLIXARD_CONFIG_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set; set BLIXARD_CONFIG_DIR")?;
            PathBuf::from(home).join(".config/blixard")
        }
    };
    Ok(blixard_mesh::identity::load_or_create(&dir.join("cli.key"))?)
}

async fn connect(ticket: &Option<String>, data_dir: &Option<PathBuf>) -> anyhow::Result<Client> {
    let ticket = find_ticket(ticket, data_dir)?;
    Ok(Client::new(cli_key()?, ticket).await?)
}

async fn request(ticket: &Option<String>, data_dir: &Option<PathBuf>, req: &ClientRequest) -> anyhow::Result<ClientResponse> {
    let client = connect(ticket, data_dir).await?;
    let resp = client.request(req).await;
    client.close().await;
    Ok(resp?)
}

/// `k=v` sets a label, `k-` removes one.
fn parse_labels(args: &[String]) -> anyhow::Result<(BTreeMap<String, String>, Vec<String>)> {
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            set.insert(k.to_string(), v.to_string());
        } else if let Some(k) = a.strip_suffix('-') {
            remove.push(k.to_string());
        } else {
            bail!("label {a:?} must be k=v (set) or k- (remove)");
        }
    }
    Ok((set, remove))
}

/// Parses `90s`, `30m`, `12h`, `7d` (or plain seconds) into milliseconds.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 30m, 12h, 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(secs * 1000).filter(|&ms| ms > 0).ok_or_else(|| format!("duration {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        assert!(parse_duration_ms("0s").is_err());
        assert!(parse_duration_ms("3w").is_err());
        assert!(parse_duration_ms("").is_err());
        assert!(parse_duration_ms("99999999999999999999d").is_err());
    }

    #[test]
    fn labels() {
        let (set, rm) = parse_labels(&["a=b".into(), "c-".into()]).expect("parse");
        assert_eq!(set.get("a").map(String::as_str), Some("b"));
        assert_eq!(rm, vec!["c".to_string()]);
        assert!(parse_labels(&["nope".into()]).is_err());
    }
}
