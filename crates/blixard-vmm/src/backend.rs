//! The [`VmBackend`] trait and the types its operations return.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::console::ConsoleChunk;
use crate::error::VmError;
use crate::health::{Health, HealthReport};
use crate::net::NetInfo;
use crate::resources::{Capacity, Usage};
use crate::spec::{Hypervisor, VmSpec};

/// A boxed, `Send` future: keeps [`VmBackend`] object-safe (`Arc<dyn VmBackend>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Lifecycle state of a VM on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, never started.
    #[default]
    Created,
    /// Hypervisor launched, control socket not answering yet.
    Starting,
    /// Running.
    Running,
    /// vcpus paused.
    Paused,
    /// Stop in progress.
    Stopping,
    /// Stopped on request, or the guest powered off.
    Stopped,
    /// The hypervisor died or failed to start; see `last_error`.
    Failed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        })
    }
}

impl VmState {
    /// Whether a hypervisor process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

/// The accelerator a guest runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// qemu's software emulation (slow; used where KVM cannot boot the guest).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How the last stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopKind {
    /// The guest shut down within the timeout.
    Graceful,
    /// The hypervisor was killed.
    Forced,
}

/// Options of [`VmBackend::stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOptions {
    /// How long the guest gets to shut down before the hypervisor is killed.
    pub timeout: Duration,
    /// Skip the graceful attempt.
    pub force: bool,
}

impl StopOptions {
    /// Graceful with this timeout, then forced.
    pub fn graceful(timeout: Duration) -> StopOptions {
        StopOptions {
            timeout,
            force: false,
        }
    }

    /// Kill at once.
    pub fn forced() -> StopOptions {
        StopOptions {
            timeout: Duration::ZERO,
            force: true,
        }
    }
}

/// Everything the backend knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// Backend kind (`qemu` or `microvm`).
    pub backend: String,
    /// Lifecycle state.
    pub state: VmState,
    /// Hypervisor process id (== its process group id) while active.
    pub pid: Option<u32>,
    /// The hypervisor, when known.
    pub hypervisor: Option<Hypervisor>,
    /// The accelerator in use, when known.
    pub accelerator: Option<Accel>,
    /// vcpus.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u64,
    /// Last health observation.
    pub health: Health,
    /// Why the VM failed, or the last operation error worth showing.
    pub last_error: Option<String>,
    /// How the hypervisor last exited.
    pub last_exit: Option<String>,
    /// How the last stop ended.
    pub last_stop: Option<StopKind>,
    /// Boots (starts + reboots) since the backend opened.
    pub boots: u32,
    /// Console bytes captured so far (the offset to follow from).
    pub console_bytes: u64,
    /// Network attachment.
    pub network: Option<NetInfo>,
    /// Control socket while active.
    pub control_socket: Option<PathBuf>,
}

/// The contract every VM backend implements.
///
/// Every operation is idempotent where that makes sense (create with the same spec, start
/// of a running VM, stop of a stopped VM, delete of a missing VM succeed), runs under a
/// `tracing` span, and either completes or leaves nothing behind: the mutating operations
/// run on their own task, so dropping the returned future does not abandon a half-started
/// VM.
pub trait VmBackend: Send + Sync + std::fmt::Debug {
    /// `qemu` or `microvm`.
    fn kind(&self) -> &'static str;
    /// The node capacity VMs are reserved against.
    fn capacity(&self) -> Capacity;
    /// Resources reserved by active VMs.
    fn usage(&self) -> Usage;
    /// Define a VM (validates the spec, checks its files, leases an address).
    fn create(&self, spec: VmSpec) -> BoxFuture<'_, Result<VmStatus, VmError>>;
    /// Launch the VM; returns once the hypervisor's control socket answers.
    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>>;
    /// Stop: graceful (ACPI power button / `microvm-shutdown`) with a timeout, then kill.
    fn stop<'a>(
        &'a self,
        name: &'a str,
        opts: StopOptions,
    ) -> BoxFuture<'a, Result<VmStatus, VmError>>;
    /// Pause the vcpus.
    fn pause<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>>;
    /// Resume the vcpus.
    fn resume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>>;
    /// Hard reset of the guest.
    fn reboot<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>>;
    /// Stop if needed, then remove every trace of the VM (dir, taps, lease).
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), VmError>>;
    /// Current status.
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>>;
    /// Status of every VM.
    fn list(&self) -> BoxFuture<'_, Vec<VmStatus>>;
    /// Console bytes from `offset` (follow by passing `chunk.next` back).
    fn console_log<'a>(
        &'a self,
        name: &'a str,
        offset: u64,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<ConsoleChunk, VmError>>;
    /// Wait until `needle` appears on the console at or after `from`; returns the offset
    /// just after it.
    fn wait_console<'a>(
        &'a self,
        name: &'a str,
        needle: &'a str,
        from: u64,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<u64, VmError>>;
    /// Run the VM's health checks now (they also run periodically while it runs).
    fn health<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<HealthReport, VmError>>;
}
