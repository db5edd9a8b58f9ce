//! The reconciler's decisions: (what the cluster wants on this node, what the node has,
//! what the reconciler remembers, now) → actions. Pure: the node's loop observes, calls
//! [`plan`], and carries the actions out; the simulator calls the same function.
//!
//! Rules, per VM:
//! - deleted in the cluster, or not placed here (any more): stop and remove it locally
//!   (fencing: a VM moved away while this node was cut off stops here first);
//! - wanted running: fetch its image, create, start; resume if paused; reboot once per
//!   reboot request; if it stopped or failed on its own, restart per its policy with
//!   exponential backoff, and give up (failed, with the error) after [`MAX_RESTARTS`];
//! - wanted paused: start if needed, then pause; wanted stopped: stop;
//! - report what it actually is whenever that differs from what the cluster records.
//!
//! **Invariant:** only VMs the backend lists (its own) are ever touched.

use std::collections::BTreeMap;

pub mod fence;
pub mod liveness;

use blixard_types::vm::{Desired, RestartPolicy, VmReport, VmSpec, VmState};

/// Restarts within one failure streak before a VM is declared failed.
pub const MAX_RESTARTS: u32 = 5;
/// First restart delay; doubles each time up to [`MAX_BACKOFF_MS`].
pub const BASE_BACKOFF_MS: u64 = 1_000;
pub const MAX_BACKOFF_MS: u64 = 60_000;

/// What the cluster wants of one VM placed on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub spec: VmSpec,
    pub desired: Desired,
    pub deleting: bool,
    pub reboots_requested: u64,
    /// What the cluster currently records as the VM's actual state (to report changes).
    pub recorded: VmReport,
}

/// What the local backend says about a VM it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Created,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

/// One VM as the node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `None`: the backend has no such VM.
    pub local: Option<Local>,
    pub healthy: Option<bool>,
    pub error: Option<String>,
}

/// Whether a VM's image is on this node, verified and materialised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ImageState {
    #[default]
    Missing,
    Fetching,
    Ready,
    Failed(String),
}

/// What the reconciler remembers between rounds (per VM; lost on restart, which is safe:
/// it only delays a restart or repeats a report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub image: ImageState,
    /// Reboot requests carried out.
    pub reboots_done: u64,
    /// Restarts in the current failure streak.
    pub restarts: u32,
    /// Not before this time (ms) may the VM be restarted.
    pub next_restart_ms: u64,
    /// The node stopped it on purpose (so a stopped VM is not a crash).
    pub stopped_on_purpose: bool,
    /// Out of restarts: stays failed until the user starts it again.
    pub gave_up: bool,
    pub last_error: Option<String>,
}

impl Memory {
    /// An operation on the VM (create, start, ...) failed: count it like a crash, so the
    /// next attempt waits out the backoff and the VM fails for good after [`MAX_RESTARTS`].
    pub fn record_failure(&mut self, error: String, now_ms: u64) {
        self.last_error = Some(error);
        self.restarts += 1;
        if self.restarts >= MAX_RESTARTS {
            self.gave_up = true;
        } else {
            self.next_restart_ms = now_ms + backoff_ms(self.restarts);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    FetchImage(String),
    Create(String),
    Start(String),
    Stop(String),
    Pause(String),
    Resume(String),
    Reboot(String),
    /// Stop if needed, then remove everything local.
    Remove(String),
    Report(String, VmReport),
}

impl Action {
    /// The VM the action is about.
    pub fn vm(&self) -> &str {
        match self {
            Action::FetchImage(n)
            | Action::Create(n)
            | Action::Start(n)
            | Action::Stop(n)
            | Action::Pause(n)
            | Action::Resume(n)
            | Action::Reboot(n)
            | Action::Remove(n)
            | Action::Report(n, _) => n,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Action::FetchImage(_) => "fetch",
            Action::Create(_) => "create",
            Action::Start(_) => "start",
            Action::Stop(_) => "stop",
            Action::Pause(_) => "pause",
            Action::Resume(_) => "resume",
            Action::Reboot(_) => "reboot",
            Action::Remove(_) => "remove",
            Action::Report(..) => "report",
        }
    }
}

/// The delay before restart number `n` (1-based).
pub fn backoff_ms(n: u32) -> u64 {
    BASE_BACKOFF_MS.saturating_mul(1u64 << n.saturating_sub(1).min(16)).min(MAX_BACKOFF_MS)
}

/// Decides the actions for this round. `memory` is updated for decisions that need
/// remembering (restart counting, reboots, purposeful stops).
pub fn plan(
    wanted: &BTreeMap<String, Wanted>,
    observed: &BTreeMap<String, Observed>,
    memory: &mut BTreeMap<String, Memory>,
    now_ms: u64,
) -> Vec<Action> {
    let mut actions = Vec::new();
    // Fencing: VMs this node has but the cluster does not want here.
    for (name, o) in observed {
        if o.local.is_some() && !wanted.contains_key(name) {
            actions.push(Action::Remove(name.clone()));
        }
    }
    memory.retain(|name, _| wanted.contains_key(name));
    for (name, w) in wanted {
        let o = observed.get(name).cloned().unwrap_or_default();
        let m = memory.entry(name.clone()).or_default();
        plan_one(name, w, &o, m, now_ms, &mut actions);
    }
    actions
}

fn plan_one(name: &str, w: &Wanted, o: &Observed, m: &mut Memory, now: u64, out: &mut Vec<Action>) {
    let n = || name.to_string();
    let report = |state: VmState, m: &Memory, deleted: bool| VmReport {
        state,
        healthy: o.healthy,
        error: m.last_error.clone().or_else(|| o.error.clone()),
        restarts: m.restarts,
        reboots_done: m.reboots_done,
        deleted,
    };
    let push_report = |r: VmReport, out: &mut Vec<Action>| {
        if r != w.recorded {
            out.push(Action::Report(n(), r));
        }
    };

    if w.deleting {
        if o.local.is_some() {
            out.push(Action::Remove(n()));
        } else {
            push_report(report(VmState::Stopped, m, true), out);
        }
        return;
    }
    // A user's new start clears a failure streak (the state machine moves a failed VM
    // back to pending when it is started again).
    if w.desired == Desired::Running && w.recorded.state == VmState::Pending && m.gave_up {
        *m = Memory { image: m.image.clone(), reboots_done: m.reboots_done, ..Memory::default() };
    }
    match w.desired {
        Desired::Stopped => {
            m.restarts = 0;
            m.gave_up = false;
            match o.local {
                Some(Local::Running | Local::Paused | Local::Starting) => {
                    m.stopped_on_purpose = true;
                    out.push(Action::Stop(n()));
                }
                Some(Local::Stopping) => {}
                _ => push_report(report(VmState::Stopped, m, false), out),
            }
        }
        Desired::Running | Desired::Paused => {
            match &m.image {
                ImageState::Missing => {
                    m.image = ImageState::Fetching;
                    out.push(Action::FetchImage(n()));
                    push_report(report(VmState::Fetching, m, false), out);
                    return;
                }
                ImageState::Fetching => {
                    push_report(report(VmState::Fetching, m, false), out);
                    return;
                }
                ImageState::Failed(e) => {
                    // A failed fetch (no holder reachable, a full disk) is tried again like a
                    // failed start: after a backoff, up to MAX_RESTARTS times; then the VM
                    // stays failed until the user starts it again.
                    if !m.gave_up && m.next_restart_ms == 0 {
                        m.record_failure(format!("image: {e}"), now);
                    }
                    if m.gave_up {
                        push_report(report(VmState::Failed, m, false), out);
                    } else if now >= m.next_restart_ms {
                        m.next_restart_ms = 0;
                        m.image = ImageState::Fetching;
                        out.push(Action::FetchImage(n()));
                        push_report(report(VmState::Fetching, m, false), out);
                    } else {
                        push_report(report(VmState::Fetching, m, false), out);
                    }
                    return;
                }
                ImageState::Ready => {}
            }
            if m.gave_up {
                push_report(report(VmState::Failed, m, false), out);
                return;
            }
            let waiting = m.next_restart_ms > now;
            match o.local {
                None | Some(Local::Created) if waiting => {
                    // A failed create/start waits out its backoff.
                    push_report(report(VmState::Starting, m, false), out);
                }
                None => {
                    m.stopped_on_purpose = false;
                    out.push(Action::Create(n()));
                    out.push(Action::Start(n()));
                    push_report(report(VmState::Starting, m, false), out);
                }
                Some(Local::Created) => {
                    out.push(Action::Start(n()));
                    push_report(report(VmState::Starting, m, false), out);
                }
                Some(Local::Stopped) if m.stopped_on_purpose || w.recorded.state == VmState::Stopped && m.restarts == 0 => {
                    // Stopped by us (or before): start as asked.
                    m.stopped_on_purpose = false;
                    out.push(Action::Start(n()));
                    push_report(report(VmState::Starting, m, false), out);
                }
                Some(l @ (Local::Stopped | Local::Failed)) => {
                    // It stopped on its own: the restart policy decides.
                    let failed = l == Local::Failed || o.healthy == Some(false);
                    let restart = match w.spec.restart {
                        RestartPolicy::Always => true,
                        RestartPolicy::OnFailure => failed,
                        RestartPolicy::Never => false,
                    };
                    if o.error.is_some() {
                        m.last_error = o.error.clone();
                    }
                    if !restart {
                        let state = if failed { VmState::Failed } else { VmState::Stopped };
                        push_report(report(state, m, false), out);
                    } else if m.next_restart_ms != 0 {
                        // A restart is scheduled: wait out the backoff.
                        if now >= m.next_restart_ms {
                            m.next_restart_ms = 0;
                            out.push(Action::Start(n()));
                            push_report(report(VmState::Starting, m, false), out);
                        }
                    } else if m.restarts >= MAX_RESTARTS {
                        m.gave_up = true;
                        push_report(report(VmState::Failed, m, false), out);
                    } else {
                        // First sight of this stop: schedule the restart.
                        m.restarts += 1;
                        m.next_restart_ms = now + backoff_ms(m.restarts);
                        push_report(report(VmState::Starting, m, false), out);
                    }
                }
                Some(Local::Starting | Local::Stopping) => {}
                Some(Local::Running) => {
                    if w.reboots_requested > m.reboots_done {
                        m.reboots_done = w.reboots_requested;
                        out.push(Action::Reboot(n()));
                    }
                    if w.desired == Desired::Paused {
                        out.push(Action::Pause(n()));
                    } else {
                        // A healthy run ends a failure streak.
                        if o.healthy != Some(false) {
                            m.next_restart_ms = 0;
                            if m.restarts > 0 && o.healthy == Some(true) {
                                m.restarts = 0;
                            }
                        }
                        m.last_error = None;
                        push_report(report(VmState::Running, m, false), out);
                    }
                }
                Some(Local::Paused) => {
                    if w.desired == Desired::Running {
                        out.push(Action::Resume(n()));
                    } else {
                        push_report(report(VmState::Paused, m, false), out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
