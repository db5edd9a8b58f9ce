//! What the replicated state machine applies ([`Request`]) and answers ([`Response`]).
//!
//! This is the Raft log format: an API boundary. Variants are only ever appended.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::id::{ClusterId, NodeId};
use crate::ticket::Role;
use crate::image::ImageKind;
use crate::vm::{Desired, VmReport, VmSpec};

/// One log entry's payload: a command, who asked for it and when.
///
/// `at_ms` is stamped by the node that proposes the entry, so `apply` never reads a clock
/// and every replica computes the same result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub at_ms: u64,
    /// The authenticated key on whose behalf the command is proposed.
    pub by: NodeId,
    pub cmd: Command,
    /// Random, one per operation, kept when a proposal is sent again (a forward that timed
    /// out may have committed): the state machine applies each id once. 0: never
    /// deduplicated.
    pub id: u128,
}


/// A node's declared capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// What a joining or bootstrapping node says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub addrs: Vec<SocketAddr>,
    pub resources: Resources,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The first entry of a new cluster: its id and first member.
    Bootstrap { cluster_id: ClusterId, node: NodeId, info: NodeInfo },
    /// Records a ticket by the hash of its secret.
    CreateTicket { secret_hash: [u8; 32], role: Role, expires_at_ms: u64 },
    /// Revokes the ticket whose id (see `ticket::ticket_id`) is given.
    RevokeTicket { id: String },
    /// Admits a node presenting a ticket; it becomes a member (learner, then voter).
    AdmitNode { node: NodeId, info: NodeInfo, secret_hash: [u8; 32], role: Role },
    /// Authorises a CLI key presenting a client ticket.
    AuthorizeClient { key: NodeId, secret_hash: [u8; 32] },
    /// Removes a member for good: its key is refused from then on.
    RemoveNode { node: NodeId },
    /// A member's addresses changed (it restarted on another port).
    UpdateAddrs { node: NodeId, addrs: Vec<SocketAddr> },
    /// Adds, updates (`set`) and removes labels of a node.
    SetLabels { node: NodeId, set: BTreeMap<String, String>, remove: Vec<String> },
    /// Records a new VM (validated spec, unique name); `start` sets it desired running.
    CreateVm { spec: VmSpec, start: bool },
    /// Records where the leader placed a VM (checked again against capacity).
    PlaceVm { name: String, node: NodeId },
    /// Changes what the user wants a VM to be.
    SetDesired { name: String, desired: Desired },
    /// Asks for a reboot (the hosting node reboots once per request).
    RebootVm { name: String },
    /// Deletes a VM: it stops and its record goes once its node confirms (or at once if
    /// it was never placed).
    DeleteVm { name: String },
    /// The hosting node reports what a VM actually is.
    ReportVm { name: String, report: VmReport },
    /// A drained node takes no new VMs.
    SetDrain { node: NodeId, drain: bool },
    /// The leader could not place a VM: why (shown until it is placed).
    PlacementFailed { name: String, reason: String },
    /// Records an image in the catalogue (after a member fetched and verified it); `name`,
    /// if given, now points at it.
    PublishImage { hash: String, size: u64, kind: ImageKind, name: Option<String> },
    /// Removes an image (by full hash) and the names pointing at it; refused while a VM
    /// uses it.
    RemoveImage { hash: String },
    /// Up to [`MAX_BATCH`] VM commands in one entry, applied in order, all or none: if one
    /// is refused, those before it are undone and the batch is refused. A leader placing
    /// thousands of VMs commits them in a few entries instead of one each.
    Batch { commands: Vec<VmCommand> },
}

/// Most commands in one [`Command::Batch`]: a batch of created VMs stays well under the
/// frame limit (`frame::MAX_FRAME`) even when openraft sends several in one append.
pub const MAX_BATCH: usize = 1_000;

/// The commands a [`Command::Batch`] may hold: those that change nothing but one VM record
/// (and the usage its placement charges), so that a refused batch is undone exactly. Not a
/// [`Command`] itself, so a batch cannot nest (decoding stays flat).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmCommand {
    CreateVm { spec: VmSpec, start: bool },
    PlaceVm { name: String, node: NodeId },
    SetDesired { name: String, desired: Desired },
    PlacementFailed { name: String, reason: String },
}

impl From<VmCommand> for Command {
    fn from(c: VmCommand) -> Command {
        match c {
            VmCommand::CreateVm { spec, start } => Command::CreateVm { spec, start },
            VmCommand::PlaceVm { name, node } => Command::PlaceVm { name, node },
            VmCommand::SetDesired { name, desired } => Command::SetDesired { name, desired },
            VmCommand::PlacementFailed { name, reason } => Command::PlacementFailed { name, reason },
        }
    }
}

impl VmCommand {
    /// The VM it changes.
    pub fn vm(&self) -> &str {
        match self {
            VmCommand::CreateVm { spec, .. } => &spec.name,
            VmCommand::PlaceVm { name, .. }
            | VmCommand::SetDesired { name, .. }
            | VmCommand::PlacementFailed { name, .. } => name,
        }
    }
}

impl Command {
    /// A short name for logs and audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Bootstrap { .. } => "bootstrap",
            Command::CreateTicket { .. } => "create-ticket",
            Command::RevokeTicket { .. } => "revoke-ticket",
            Command::AdmitNode { .. } => "admit-node",
            Command::AuthorizeClient { .. } => "authorize-client",
            Command::RemoveNode { .. } => "remove-node",
            Command::UpdateAddrs { .. } => "update-addrs",
            Command::SetLabels { .. } => "set-labels",
            Command::CreateVm { .. } => "create-vm",
            Command::PlaceVm { .. } => "place-vm",
            Command::SetDesired { .. } => "set-desired",
            Command::RebootVm { .. } => "reboot-vm",
            Command::DeleteVm { .. } => "delete-vm",
            Command::ReportVm { .. } => "report-vm",
            Command::SetDrain { .. } => "set-drain",
            Command::PlacementFailed { .. } => "placement-failed",
            Command::PublishImage { .. } => "publish-image",
            Command::RemoveImage { .. } => "remove-image",
            Command::Batch { .. } => "batch",
        }
    }
}

/// The outcome of applying one command. A refused command changes nothing.
pub type Response = CommandResult;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Ok,
    Refused(Refusal),
}

/// Why the state machine refused a command. Deterministic: every replica agrees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("the cluster is not bootstrapped yet")]
    NotBootstrapped,
    #[error("unknown ticket: it was never issued by this cluster")]
    UnknownTicket,
    #[error("the ticket expired; ask an operator for a new one (`blixard cluster ticket`)")]
    TicketExpired,
    #[error("the ticket was revoked")]
    TicketRevoked,
    #[error("the ticket grants the {granted} role, not {requested}")]
    RoleMismatch { granted: Role, requested: Role },
    #[error("node {0} was removed from the cluster and cannot come back with the same key")]
    NodeRemoved(NodeId),
    #[error("no such node: {0}")]
    UnknownNode(NodeId),
    #[error("no ticket with id {0:?}")]
    UnknownTicketId(String),
    #[error("invalid label: {0}")]
    InvalidLabel(String),
    #[error("a ticket with this secret already exists")]
    DuplicateTicket,
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("a VM named {0:?} already exists")]
    VmExists(String),
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    #[error("VM {name:?} does not fit on node {node}: {reason}")]
    DoesNotFit { name: String, node: NodeId, reason: String },
    #[error("VM {0:?} is being deleted")]
    VmDeleting(String),
    #[error("node {by} does not host VM {name:?}")]
    NotHost { name: String, by: NodeId },
    #[error("no image {0:?} in the catalogue; push it with `blixard image push`, see `blixard image list`")]
    UnknownImage(String),
    #[error("image reference {0:?} matches more than one image; give more characters of the hash")]
    AmbiguousImage(String),
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("image {image} is used by VM(s) {vms}; delete them first")]
    ImageInUse { image: String, vms: String },
    #[error("a batch holds at most {max} commands, not {len}")]
    BatchTooLarge { len: u64, max: u64 },
    /// The batch was undone: command `index` (from 0) was refused for `reason`.
    #[error("batch refused, nothing applied: command {index} ({kind} of VM {vm:?}) was refused: {reason}")]
    InBatch { index: u64, kind: String, vm: String, reason: String },
}

/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 63;

/// Checks a label key and value: 1–63 characters of `[A-Za-z0-9._/-]` for keys,
/// 0–63 printable characters without `=` or whitespace for values.
pub fn validate_label(key: &str, value: &str) -> Result<(), Refusal> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_LABEL_LEN
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
    if !key_ok {
        return Err(Refusal::InvalidLabel(format!(
            "key {key:?} must be 1-{MAX_LABEL_LEN} characters of letters, digits, '.', '_', '/', '-'"
        )));
    }
    let value_ok = value.len() <= MAX_LABEL_LEN && value.chars().all(|c| c.is_ascii_graphic() && c != '=');
    if !value_ok {
        return Err(Refusal::InvalidLabel(format!(
            "value {value:?} of {key:?} must be at most {MAX_LABEL_LEN} printable characters without '='"
        )));
    }
    Ok(())
}
