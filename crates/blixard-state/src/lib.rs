//! The replicated cluster state and its deterministic `apply`.
//!
//! This crate is the home of all cluster state (members, clients, tickets, and later VMs,
//! images and placements). **Invariant:** `apply` is a pure function of the state and the
//! request: no clock (time arrives in `Request::at_ms`), no randomness, no I/O. A refused
//! command leaves the state untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use blixard_types::command::{validate_label, NodeInfo, Refusal, Resources};
use blixard_types::ticket::ticket_id;
use blixard_types::{ClusterId, Command, CommandResult, NodeId, Request, Role};
use serde::{Deserialize, Serialize};

/// Format version of [`ClusterState`] inside snapshots.
pub const STATE_VERSION: u32 = 1;

/// A cluster member as recorded in Raft state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub addrs: Vec<SocketAddr>,
    pub resources: Resources,
    pub labels: BTreeMap<String, String>,
    /// The role its ticket granted (voter or learner).
    pub role: Role,
    pub joined_at_ms: u64,
}

/// An issued ticket; only the hash of its secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    pub role: Role,
    pub expires_at_ms: u64,
    pub created_at_ms: u64,
    pub created_by: NodeId,
    pub revoked: bool,
}

/// A CLI key allowed to use the client API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub authorized_at_ms: u64,
    pub ticket_id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: Option<ClusterId>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Keys removed for good.
    pub removed: BTreeSet<NodeId>,
    pub clients: BTreeMap<NodeId, ClientRecord>,
    /// Keyed by the BLAKE3 hash of the secret.
    pub tickets: BTreeMap<[u8; 32], TicketRecord>,
}

impl ClusterState {
    /// True if `key` is a current member (may speak raft and internal protocols).
    pub fn is_member(&self, key: &NodeId) -> bool {
        self.nodes.contains_key(key)
    }

    /// True if `key` may use the client API.
    pub fn is_client(&self, key: &NodeId) -> bool {
        self.clients.contains_key(key) || self.is_member(key)
    }

    /// Resolves a node id or unique hex prefix to a member.
    pub fn resolve_node(&self, prefix: &str) -> Result<NodeId, ResolveError> {
        let mut hits = self.nodes.keys().filter(|id| id.matches_prefix(prefix));
        match (hits.next(), hits.next()) {
            (Some(id), None) => Ok(*id),
            (None, _) => Err(ResolveError::NoMatch),
            (Some(_), Some(_)) => Err(ResolveError::Ambiguous),
        }
    }

    /// Checks that `hash` names a ticket usable for `requested` at `at_ms`.
    pub fn check_ticket(&self, hash: &[u8; 32], requested: Role, at_ms: u64) -> Result<&TicketRecord, Refusal> {
        let t = self.tickets.get(hash).ok_or(Refusal::UnknownTicket)?;
        if t.revoked {
            return Err(Refusal::TicketRevoked);
        }
        if at_ms >= t.expires_at_ms {
            return Err(Refusal::TicketExpired);
        }
        if t.role != requested {
            return Err(Refusal::RoleMismatch { granted: t.role, requested });
        }
        Ok(t)
    }

    /// Applies one request. Deterministic; a refusal changes nothing.
    pub fn apply(&mut self, req: &Request) -> CommandResult {
        match self.try_apply(req) {
            Ok(()) => CommandResult::Ok,
            Err(r) => CommandResult::Refused(r),
        }
    }

    fn try_apply(&mut self, req: &Request) -> Result<(), Refusal> {
        let at = req.at_ms;
        if self.cluster_id.is_none() && !matches!(req.cmd, Command::Bootstrap { .. }) {
            return Err(Refusal::NotBootstrapped);
        }
        match &req.cmd {
            Command::Bootstrap { cluster_id, node, info } => {
                if self.cluster_id.is_some() {
                    return Err(Refusal::AlreadyBootstrapped);
                }
                validate_labels(&info.labels)?;
                self.cluster_id = Some(*cluster_id);
                self.nodes.insert(*node, record(info, Role::Voter, at));
            }
            Command::CreateTicket { secret_hash, role, expires_at_ms } => {
                if self.tickets.contains_key(secret_hash) {
                    return Err(Refusal::DuplicateTicket);
                }
                self.tickets.insert(
                    *secret_hash,
                    TicketRecord {
                        role: *role,
                        expires_at_ms: *expires_at_ms,
                        created_at_ms: at,
                        created_by: req.by,
                        revoked: false,
                    },
                );
            }
            Command::RevokeTicket { id } => {
                let t = self
                    .tickets
                    .iter_mut()
                    .find(|(h, _)| ticket_id(h) == *id)
                    .ok_or_else(|| Refusal::UnknownTicketId(id.clone()))?;
                t.1.revoked = true;
            }
            Command::AdmitNode { node, info, secret_hash, role } => {
                if self.removed.contains(node) {
                    return Err(Refusal::NodeRemoved(*node));
                }
                self.check_ticket(secret_hash, *role, at)?;
                validate_labels(&info.labels)?;
                // A member re-presenting a ticket (e.g. a retried join) keeps its record
                // but updates its addresses.
                match self.nodes.get_mut(node) {
                    Some(existing) => existing.addrs = info.addrs.clone(),
                    None => {
                        self.nodes.insert(*node, record(info, *role, at));
                    }
                }
            }
            Command::AuthorizeClient { key, secret_hash } => {
                if self.removed.contains(key) {
                    return Err(Refusal::NodeRemoved(*key));
                }
                self.check_ticket(secret_hash, Role::Client, at)?;
                self.clients
                    .entry(*key)
                    .or_insert(ClientRecord { authorized_at_ms: at, ticket_id: ticket_id(secret_hash) });
            }
            Command::RemoveNode { node } => {
                if self.nodes.remove(node).is_none() && !self.clients.contains_key(node) {
                    return Err(Refusal::UnknownNode(*node));
                }
                self.clients.remove(node);
                self.removed.insert(*node);
            }
            Command::UpdateAddrs { node, addrs } => {
                let n = self.nodes.get_mut(node).ok_or(Refusal::UnknownNode(*node))?;
                n.addrs = addrs.clone();
            }
            Command::SetLabels { node, set, remove } => {
                validate_labels(set)?;
                let n = self.nodes.get_mut(node).ok_or(Refusal::UnknownNode(*node))?;
                for k in remove {
                    n.labels.remove(k);
                }
                n.labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Ok(())
    }
}

/// Why a node reference did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NoMatch,
    Ambiguous,
}

fn record(info: &NodeInfo, role: Role, at: u64) -> NodeRecord {
    NodeRecord {
        addrs: info.addrs.clone(),
        resources: info.resources,
        labels: info.labels.clone(),
        role,
        joined_at_ms: at,
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Refusal> {
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

#[cfg(test)]
mod tests;
