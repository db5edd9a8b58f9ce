//! A simulated [`VmBackend`]: the real trait, with guests that are only states. Starts take
//! simulated time (some of them long), some fail, and the nemesis can crash a running
//! guest. A node's VMs live in the [`World`], not in the node's tasks: like a backend's
//! state dir they survive a crash of the node, and like hypervisors started with
//! `die_with_parent` they are all stopped by it.
//!
//! Every state change goes through [`WorldState::set_vm_state`], which checks that no VM is
//! active (a hypervisor exists) on two nodes at once.

use std::sync::Arc;
use std::time::Duration;

use blixard_vmm::{
    BoxFuture, Capacity, ConsoleChunk, Health, HealthReport, StopKind, StopOptions, Usage, VmBackend, VmError,
    VmSpec, VmState, VmStatus,
};

use crate::world::{World, WorldState};

/// What the backend does to guests, in force during the safety phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VmFaults {
    /// Probability that a start fails (the hypervisor exits early).
    pub start_fail: f64,
    /// How long a start takes (ms range).
    pub start_ms: (u64, u64),
    /// Probability that a start is slow, and how slow (ms range).
    pub slow_start: f64,
    pub slow_start_ms: (u64, u64),
    /// How long a graceful stop takes (ms range).
    pub stop_ms: (u64, u64),
}

impl VmFaults {
    pub const CALM: VmFaults =
        VmFaults { start_fail: 0.0, start_ms: (20, 200), slow_start: 0.0, slow_start_ms: (0, 0), stop_ms: (5, 50) };
    pub const CHAOS: VmFaults = VmFaults {
        start_fail: 0.1,
        start_ms: (20, 500),
        slow_start: 0.1,
        slow_start_ms: (1_000, 4_000),
        stop_ms: (5, 300),
    };
}

/// One guest as its node's backend knows it.
#[derive(Clone, Debug)]
pub struct SimVm {
    pub spec: VmSpec,
    pub state: VmState,
    pub last_error: Option<String>,
    pub last_stop: Option<StopKind>,
    pub boots: u32,
    /// Bumped on every state change: a start that finishes checks nothing happened meanwhile.
    pub epoch: u64,
}

impl SimVm {
    fn status(&self) -> VmStatus {
        VmStatus {
            name: self.spec.name.clone(),
            backend: "sim".into(),
            state: self.state,
            pid: None,
            hypervisor: None,
            accelerator: None,
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            health: if self.state == VmState::Running { Health::Healthy } else { Health::Unknown },
            last_error: self.last_error.clone(),
            last_exit: None,
            last_stop: self.last_stop,
            boots: self.boots,
            console_bytes: 0,
            network: None,
            control_socket: None,
        }
    }
}

impl WorldState {
    /// Node `node`'s VM `name`.
    pub fn vm(&self, node: u64, name: &str) -> Option<&SimVm> {
        self.backends.get(&node).and_then(|b| b.get(name))
    }

    /// Node `node`'s VM `name`, to change.
    pub fn vm_mut(&mut self, node: u64, name: &str) -> Option<&mut SimVm> {
        self.backends.get_mut(&node).and_then(|b| b.get_mut(name))
    }

    /// Moves VM `name` of `node` to `state`, recording it and checking exclusivity: a VM
    /// becoming active while another node has it active is a violation.
    pub fn set_vm_state(&mut self, node: u64, name: &str, state: VmState, error: Option<String>) {
        let Some(vm) = self.vm_mut(node, name) else { return };
        let was = vm.state;
        vm.state = state;
        vm.epoch += 1;
        if error.is_some() {
            vm.last_error = error;
        }
        if state == VmState::Starting {
            vm.boots += 1;
        }
        self.event(format_args!("n{node} vm {name} {was} -> {state}"));
        if state.is_active() && !was.is_active() {
            self.counters.bump("vm_starts");
            let others: Vec<u64> = self
                .backends
                .iter()
                .filter(|(n, b)| **n != node && b.get(name).is_some_and(|v| v.state.is_active()))
                .map(|(n, _)| *n)
                .collect();
            for other in others {
                self.violation(format!("VM {name} started on n{node} while active on n{other}"));
            }
        }
    }

    /// A node crashed: its hypervisors die with it (they run with `die_with_parent`).
    pub fn kill_vms(&mut self, node: u64) {
        let active: Vec<String> = self
            .backends
            .get(&node)
            .map(|b| b.iter().filter(|(_, v)| v.state.is_active()).map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        for name in active {
            self.set_vm_state(node, &name, VmState::Stopped, Some("the node process died".into()));
        }
    }
}

/// Node `node`'s backend.
pub struct SimBackend {
    pub node: u64,
    pub world: Arc<World>,
    pub capacity: Capacity,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend").field("node", &self.node).finish_non_exhaustive()
    }
}

impl SimBackend {
    fn get(&self, name: &str) -> Result<SimVm, VmError> {
        self.world.lock().vm(self.node, name).cloned().ok_or_else(|| VmError::NotFound { name: name.into() })
    }

    fn draw_ms(&self, range: impl Fn(&VmFaults) -> (u64, u64)) -> u64 {
        let mut w = self.world.lock();
        let (lo, hi) = range(&w.vm_faults);
        w.rng.range(lo, hi.max(lo))
    }

    /// Waits `ms`, then applies `to` if nothing else changed the VM meanwhile.
    async fn transition(&self, name: &str, ms: u64, to: VmState, error: Option<String>) -> Result<VmStatus, VmError> {
        let epoch = self.get(name)?.epoch;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let mut w = self.world.lock();
        let now = w.vm(self.node, name).map(|v| (v.epoch, v.state));
        match now {
            Some((e, _)) if e == epoch => {
                w.set_vm_state(self.node, name, to, error);
            }
            Some((_, state)) => {
                return Err(VmError::NotRunning { name: name.into(), state, what: format!("{to}") });
            }
            None => return Err(VmError::NotFound { name: name.into() }),
        }
        w.vm(self.node, name).map(SimVm::status).ok_or_else(|| VmError::NotFound { name: name.into() })
    }

    /// Pause or resume: `from` → `to` at once; already `to` is done; any other state is
    /// refused.
    async fn switch(&self, name: &str, op: &'static str, from: VmState, to: VmState) -> Result<VmStatus, VmError> {
        let vm = self.get(name)?;
        match vm.state {
            s if s == to => Ok(vm.status()),
            s if s == from => self.transition(name, 1, to, None).await,
            s => Err(Self::invalid(name, op, s)),
        }
    }

    fn invalid(name: &str, op: &'static str, state: VmState) -> VmError {
        VmError::InvalidState { name: name.into(), op, state, hint: "" }
    }
}

impl VmBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn usage(&self) -> Usage {
        let w = self.world.lock();
        let mut u = Usage::default();
        for v in w.backends.get(&self.node).into_iter().flat_map(|b| b.values()) {
            if v.state.is_active() {
                u.vcpus += v.spec.vcpus;
                u.memory_mib += v.spec.memory_mib;
            }
        }
        u
    }

    fn create(&self, spec: VmSpec) -> BoxFuture<'_, Result<VmStatus, VmError>> {
        Box::pin(async move {
            let mut w = self.world.lock();
            let b = w.backends.entry(self.node).or_default();
            if let Some(v) = b.get(&spec.name) {
                return if v.spec == spec { Ok(v.status()) } else { Err(VmError::AlreadyExists { name: spec.name }) };
            }
            let vm = SimVm { spec, state: VmState::Created, last_error: None, last_stop: None, boots: 0, epoch: 0 };
            let status = vm.status();
            b.insert(vm.spec.name.clone(), vm);
            w.event(format_args!("n{} vm {} created", self.node, status.name));
            Ok(status)
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>> {
        Box::pin(async move {
            let vm = self.get(name)?;
            match vm.state {
                VmState::Running | VmState::Starting => return Ok(vm.status()),
                VmState::Paused | VmState::Stopping => return Err(Self::invalid(name, "start", vm.state)),
                VmState::Created | VmState::Stopped | VmState::Failed => {}
            }
            self.world.lock().set_vm_state(self.node, name, VmState::Starting, None);
            let (slow, fail) = {
                let mut w = self.world.lock();
                let f = w.vm_faults;
                (w.rng.chance(f.slow_start), w.rng.chance(f.start_fail))
            };
            let ms = self.draw_ms(|f| if slow { f.slow_start_ms } else { f.start_ms });
            if fail {
                self.transition(name, ms, VmState::Failed, Some("simulated: the hypervisor exited during start".into()))
                    .await?;
                return Err(VmError::EarlyExit {
                    name: name.into(),
                    exit: "exit status 1".into(),
                    console_tail: "simulated start failure".into(),
                });
            }
            self.transition(name, ms, VmState::Running, None).await
        })
    }

    fn stop<'a>(&'a self, name: &'a str, opts: StopOptions) -> BoxFuture<'a, Result<VmStatus, VmError>> {
        Box::pin(async move {
            let vm = self.get(name)?;
            if !vm.state.is_active() {
                return Ok(vm.status());
            }
            let ms = if opts.force { 1 } else { self.draw_ms(|f| f.stop_ms) };
            self.world.lock().set_vm_state(self.node, name, VmState::Stopping, None);
            let s = self.transition(name, ms, VmState::Stopped, None).await;
            if let Some(v) = self.world.lock().vm_mut(self.node, name) {
                v.last_stop = Some(if opts.force { StopKind::Forced } else { StopKind::Graceful });
            }
            s
        })
    }

    fn pause<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>> {
        Box::pin(self.switch(name, "pause", VmState::Running, VmState::Paused))
    }

    fn resume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>> {
        Box::pin(self.switch(name, "resume", VmState::Paused, VmState::Running))
    }

    fn reboot<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>> {
        Box::pin(async move {
            let vm = self.get(name)?;
            if vm.state != VmState::Running {
                return Err(Self::invalid(name, "reboot", vm.state));
            }
            let ms = self.draw_ms(|f| f.start_ms);
            if let Some(v) = self.world.lock().vm_mut(self.node, name) {
                v.boots += 1;
            }
            self.transition(name, ms, VmState::Running, None).await
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), VmError>> {
        Box::pin(async move {
            match self.get(name) {
                Err(VmError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e),
                Ok(vm) if vm.state.is_active() => {
                    self.stop(name, StopOptions::forced()).await?;
                }
                Ok(_) => {}
            }
            let mut w = self.world.lock();
            if let Some(b) = w.backends.get_mut(&self.node) {
                b.remove(name);
            }
            w.event(format_args!("n{} vm {name} deleted", self.node));
            Ok(())
        })
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<VmStatus, VmError>> {
        Box::pin(async move { self.get(name).map(|v| v.status()) })
    }

    fn list(&self) -> BoxFuture<'_, Vec<VmStatus>> {
        Box::pin(async move {
            let w = self.world.lock();
            w.backends.get(&self.node).into_iter().flat_map(|b| b.values()).map(SimVm::status).collect()
        })
    }

    fn console_log<'a>(&'a self, name: &'a str, offset: u64, _max: usize) -> BoxFuture<'a, Result<ConsoleChunk, VmError>> {
        // Simulated guests print nothing.
        Box::pin(async move {
            self.get(name)?;
            Ok(ConsoleChunk { start: offset, next: offset, skipped: 0, data: Vec::new() })
        })
    }

    fn wait_console<'a>(
        &'a self,
        name: &'a str,
        _needle: &'a str,
        _from: u64,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<u64, VmError>> {
        Box::pin(async move {
            self.get(name)?;
            tokio::time::sleep(timeout).await;
            Err(VmError::Timeout { name: name.into(), op: "wait for console output", after: timeout, hint: "; simulated guests print nothing".into() })
        })
    }

    fn health<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<HealthReport, VmError>> {
        Box::pin(async move {
            let s = self.get(name)?.status();
            Ok(HealthReport { health: s.health, checks: Vec::new() })
        })
    }
}
