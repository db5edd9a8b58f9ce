//! VM backends for Blixard: run, control and observe real micro-VMs on one node.
//!
//! [`VmBackend`] is the contract; two implementations share one engine:
//! - [`MicrovmBackend`] (the default) runs microvm.nix runners (`bin/microvm-run`) and
//!   controls them through their hypervisor's control socket (QMP for qemu; the Cloud
//!   Hypervisor and Firecracker REST APIs);
//! - [`QemuBackend`] boots a kernel/initrd/disk [`Bundle`] with `qemu-system-x86_64 -M
//!   microvm` (KVM, or TCG where KVM cannot boot the guest) and controls it through QMP.
//!
//! Both capture the serial console to a bounded log, run health checks, reserve vcpus and
//! memory against the node's [`Capacity`], and optionally attach each VM to a per-node
//! bridge with an address from a pool and nft isolation between VMs.
//!
//! This crate knows nothing about Raft, iroh or redb. See `docs/vmm.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), blixard_vmm::VmError> {
//! use std::sync::Arc;
//! use blixard_vmm::*;
//! let cfg = BackendConfig::new("/var/lib/blixard", Capacity { vcpus: 4, memory_mib: 4096 });
//! let backend: Arc<dyn VmBackend> = Arc::new(MicrovmBackend::open(cfg).await?);
//! let runner = Runner { path: "/nix/store/...-microvm-qemu-web".into(), hypervisor: None, control_socket: None };
//! backend.create(VmSpec::new("web", 1, 256, Boot::Runner(runner))).await?;
//! backend.start("web").await?;
//! backend.stop("web", StopOptions::graceful(std::time::Duration::from_secs(10))).await?;
//! backend.delete("web").await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`backend`]: the [`VmBackend`] trait, [`VmStatus`], [`VmState`], [`StopOptions`]
//! - [`spec`]: [`VmSpec`] and its validation
//! - [`error`]: one error enum per family, [`VmError`] for the operations
//! - `engine`: shared supervision (process group, readiness, stop/kill, cleanup), [`BackendConfig`]
//! - [`qemu`]: [`QemuBackend`], accelerator detection, the qemu command line
//! - [`microvm`]: [`MicrovmBackend`], runner inspection, the control-socket convention
//! - [`control`]: pause/resume/reboot/powerdown over QMP, Cloud Hypervisor and Firecracker APIs
//! - [`qmp`]: the QMP client and line parser
//! - [`http`]: minimal HTTP/1.x request/response (health checks, CH/FC APIs)
//! - [`console`]: the bounded, followable console log
//! - [`health`]: console-marker, TCP and HTTP health checks
//! - [`net`]: bridge, taps, address pool with persisted leases, nft isolation
//! - [`resources`]: vcpu/memory reservations

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

/// Implement [`VmBackend`] (and the shutdown helpers) for a struct with an `engine` field.
macro_rules! delegate_backend {
    ($t:ty) => {
        impl crate::VmBackend for $t {
            fn kind(&self) -> &'static str {
                self.engine.kind()
            }
            fn capacity(&self) -> crate::Capacity {
                self.engine.capacity()
            }
            fn usage(&self) -> crate::Usage {
                self.engine.usage()
            }
            fn create(
                &self,
                spec: crate::VmSpec,
            ) -> crate::BoxFuture<'_, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.create(spec))
            }
            fn start<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.start(name))
            }
            fn stop<'a>(
                &'a self,
                name: &'a str,
                opts: crate::StopOptions,
            ) -> crate::BoxFuture<'a, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.stop(name, opts))
            }
            fn pause<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.pause(name))
            }
            fn resume<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.resume(name))
            }
            fn reboot<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.reboot(name))
            }
            fn delete<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<(), crate::VmError>> {
                Box::pin(self.engine.delete(name))
            }
            fn status<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<crate::VmStatus, crate::VmError>> {
                Box::pin(self.engine.status(name))
            }
            fn list(&self) -> crate::BoxFuture<'_, Vec<crate::VmStatus>> {
                Box::pin(self.engine.list())
            }
            fn console_log<'a>(
                &'a self,
                name: &'a str,
                offset: u64,
                max_bytes: usize,
            ) -> crate::BoxFuture<'a, Result<crate::ConsoleChunk, crate::VmError>> {
                Box::pin(self.engine.console_log(name, offset, max_bytes))
            }
            fn wait_console<'a>(
                &'a self,
                name: &'a str,
                needle: &'a str,
                from: u64,
                timeout: std::time::Duration,
            ) -> crate::BoxFuture<'a, Result<u64, crate::VmError>> {
                Box::pin(self.engine.wait_console(name, needle, from, timeout))
            }
            fn health<'a>(
                &'a self,
                name: &'a str,
            ) -> crate::BoxFuture<'a, Result<crate::HealthReport, crate::VmError>> {
                Box::pin(self.engine.health(name))
            }
        }

        impl $t {
            /// Stop every active VM in parallel (node shutdown). Dropping the backend instead
            /// leaves the hypervisors running; the next `open` of the data dir kills them.
            pub async fn stop_all(
                &self,
                opts: crate::StopOptions,
            ) -> Vec<(String, Result<crate::VmStatus, crate::VmError>)> {
                self.engine.stop_all(opts).await
            }

            /// Remove the bridge and nft tables (when no VM needs them any more).
            pub async fn teardown_network(&self) {
                if let Some(n) = self.engine.network() {
                    n.teardown().await;
                }
            }
        }
    };
}

pub mod backend;
pub mod console;
pub mod control;
mod engine;
pub mod error;
pub mod health;
pub mod http;
pub mod microvm;
pub mod net;
pub mod qemu;
pub mod qmp;
pub mod resources;
pub mod spec;

pub use backend::{Accel, BoxFuture, StopKind, StopOptions, VmBackend, VmState, VmStatus};
pub use console::ConsoleChunk;
pub use engine::BackendConfig;
pub use error::{ControlError, NetworkError, ResourceError, SpecError, VmError};
pub use health::{Health, HealthReport};
pub use microvm::MicrovmBackend;
pub use net::{NetInfo, NetworkConfig};
pub use qemu::{AccelMode, QemuBackend, QemuOptions};
pub use resources::{Capacity, Usage};
pub use spec::{Boot, Bundle, Disk, HealthCheck, Hypervisor, NetworkRequest, Runner, VmSpec};
