//! Error types: one enum per family (spec validation, resources, networking, hypervisor
//! control) and [`VmError`], the error of every [`crate::VmBackend`] operation.
//!
//! Messages say what is wrong and, where there is one, what to do about it. They do not end
//! with a period.

use std::path::PathBuf;
use std::time::Duration;

/// A VM name or spec was rejected before anything was created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The name is empty, too long or contains characters other than `[a-z0-9-]`.
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// vcpus is zero or above what this node can ever give one VM.
    #[error("invalid vcpus {got}: must be between 1 and {max} (the node's capacity)")]
    Vcpus {
        /// Requested.
        got: u32,
        /// Largest allowed.
        max: u32,
    },
    /// Memory is below the minimum or above the node's capacity.
    #[error("invalid memory {got} MiB: must be between {min} and {max} MiB (the node's capacity)")]
    Memory {
        /// Requested.
        got: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// The kernel command line is unusable.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// A file path in the spec must be absolute.
    #[error("{what} path {path:?} must be absolute")]
    NotAbsolute {
        /// Which file.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A file the VM needs does not exist.
    #[error("{what} {path:?} does not exist{hint}")]
    Missing {
        /// Which file.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Extra advice, empty or starting with "; ".
        hint: String,
    },
    /// The spec's boot source is not one this backend can run.
    #[error("the {backend} backend cannot boot a {got} spec; {hint}")]
    WrongBoot {
        /// Backend kind.
        backend: &'static str,
        /// Boot kind of the spec.
        got: &'static str,
        /// What to use instead.
        hint: &'static str,
    },
    /// The spec asks for networking but the backend was built without a network config.
    #[error("VM requests networking but this backend has no network configured; set BackendConfig::network or drop VmSpec::network")]
    NetworkNotConfigured,
    /// Another VM on this node already uses a tap name this VM's runner needs.
    #[error("tap interface {tap:?} is already used by VM {other:?}; tap names in a runner's share/microvm/tap-interfaces are host-wide")]
    TapInUse {
        /// The tap.
        tap: String,
        /// The VM using it.
        other: String,
    },
    /// A health check is malformed.
    #[error("invalid health check: {0}")]
    HealthCheck(String),
}

/// Not enough free vcpus or memory on this node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    /// The reservation does not fit.
    #[error("not enough free resources: need {need_vcpus} vcpus / {need_memory_mib} MiB, free {free_vcpus} vcpus / {free_memory_mib} MiB; stop another VM or lower the request")]
    Insufficient {
        /// Requested vcpus.
        need_vcpus: u32,
        /// Requested memory.
        need_memory_mib: u64,
        /// Free vcpus.
        free_vcpus: u32,
        /// Free memory.
        free_memory_mib: u64,
    },
}

/// Host networking (bridge, taps, nft rules, address pool) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// Every address of the pool is leased.
    #[error(
        "address pool {pool} is exhausted ({leased} leases); delete VMs or configure a larger pool"
    )]
    PoolExhausted {
        /// The pool.
        pool: String,
        /// Number of leases.
        leased: usize,
    },
    /// The pool description is invalid.
    #[error("invalid address pool {0:?}: expected an IPv4 CIDR like 10.77.0.0/24 with a prefix between 8 and 30")]
    InvalidPool(String),
    /// An interface name is invalid.
    #[error("invalid interface name {0:?}: 1-15 characters of [A-Za-z0-9_.-]")]
    InvalidIfname(String),
    /// `ip` or `nft` is not installed.
    #[error("`{tool}` is not installed or not runnable ({source}); install iproute2 and nftables")]
    MissingTool {
        /// The tool.
        tool: &'static str,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed: {stderr}; networking needs root (CAP_NET_ADMIN)")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr.
        stderr: String,
    },
    /// The lease file could not be read or written.
    #[error("address lease file {path:?}: {source}")]
    LeaseFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Talking to a hypervisor's control socket (QMP, Cloud Hypervisor or Firecracker API) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Could not connect to the socket.
    #[error("cannot connect to control socket {path:?}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("control socket i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that does not follow the protocol.
    #[error("control protocol violation: {0}")]
    Protocol(String),
    /// QMP answered a command with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Qmp {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
    /// The HTTP API answered with a non-success status.
    #[error("{method} {path} returned HTTP {status}: {body}")]
    Http {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Status code.
        status: u16,
        /// Response body (truncated).
        body: String,
    },
    /// The peer did not answer in time.
    #[error("control socket did not answer `{what}` within {after:?}")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// This hypervisor has no control API we know.
    #[error("operation `{op}` is not supported for hypervisor {hypervisor}: Blixard only controls qemu (QMP), cloud-hypervisor and firecracker")]
    Unsupported {
        /// The hypervisor.
        hypervisor: String,
        /// The operation.
        op: &'static str,
    },
}

/// The error of a [`crate::VmBackend`] operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// No VM with this name.
    #[error("no VM named {name:?} on this node; create it first")]
    NotFound {
        /// The name.
        name: String,
    },
    /// A VM with this name exists with a different spec.
    #[error("a VM named {name:?} already exists with a different spec; delete it first or pick another name")]
    AlreadyExists {
        /// The name.
        name: String,
    },
    /// The operation does not apply in the VM's current state.
    #[error("cannot {op} VM {name:?} while it is {state}{hint}")]
    InvalidState {
        /// The name.
        name: String,
        /// The operation.
        op: &'static str,
        /// The current state.
        state: crate::VmState,
        /// Extra advice, empty or starting with "; ".
        hint: &'static str,
    },
    /// The spec was rejected.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Not enough resources.
    #[error(transparent)]
    Resources(#[from] ResourceError),
    /// Host networking failed.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The hypervisor control socket failed.
    #[error("VM {name:?}: {source}")]
    Control {
        /// The VM.
        name: String,
        /// The cause.
        #[source]
        source: ControlError,
    },
    /// The hypervisor could not be started.
    #[error("cannot launch {program:?} for VM {name:?}: {source}{hint}")]
    Launch {
        /// The VM.
        name: String,
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
        /// Extra advice, empty or starting with "; ".
        hint: String,
    },
    /// The hypervisor exited while the VM was starting.
    #[error(
        "hypervisor of VM {name:?} exited during start ({exit}); console tail:\n{console_tail}"
    )]
    EarlyExit {
        /// The VM.
        name: String,
        /// Exit status description.
        exit: String,
        /// The last lines the hypervisor/guest printed.
        console_tail: String,
    },
    /// An operation did not finish in time.
    #[error("{op} of VM {name:?} did not finish within {after:?}{hint}")]
    Timeout {
        /// The VM.
        name: String,
        /// The operation.
        op: &'static str,
        /// How long we waited.
        after: Duration,
        /// Extra advice, empty or starting with "; ".
        hint: String,
    },
    /// A file operation in the backend's data dir failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM stopped while waiting for something.
    #[error("VM {name:?} is {state} while waiting for {what}")]
    NotRunning {
        /// The VM.
        name: String,
        /// Its state.
        state: crate::VmState,
        /// What we waited for.
        what: String,
    },
}

impl VmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmError::Io {
            context: context.into(),
            source,
        }
    }
}
