//! The machinery both backends share: VM records under the data dir, the supervised
//! hypervisor child (own process group), console capture, control-socket readiness,
//! stop/kill, resources, taps and health loops. A [`Launcher`] only says how to build the
//! hypervisor command for one kind of VM.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{info, info_span, warn, Instrument};

use crate::backend::{Accel, StopKind, StopOptions, VmState, VmStatus};
use crate::console::{Console, ConsoleChunk};
use crate::control::Control;
use crate::error::{ControlError, SpecError, VmError};
use crate::health::{run_checks, Health, HealthReport};
use crate::net::{self, NetInfo, Network, NetworkConfig};
use crate::resources::{Capacity, Ledger, Usage};
use crate::spec::{validate_spec, Hypervisor, VmSpec};

/// Longest unix socket path (sun_path is 108 bytes including NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Configuration shared by both backends.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Where VM state lives: `DATA/vms/<name>/{vm.json,console.log,control.sock,pid}` and
    /// `DATA/net-leases.json`.
    pub data_dir: PathBuf,
    /// What VMs may reserve in total.
    pub capacity: Capacity,
    /// Host networking; `None` = VMs without network only.
    pub network: Option<NetworkConfig>,
    /// Console log bound per file (two files are kept).
    pub console_max_bytes: u64,
    /// How long a hypervisor may take until its control socket answers.
    pub start_timeout: Duration,
    /// Period of the background health checks.
    pub health_interval: Duration,
    /// Kill each hypervisor when the process that started it dies (Linux
    /// `PR_SET_PDEATHSIG`): a node daemon killed with SIGKILL takes its VMs with it, so a
    /// VM the cluster moves elsewhere never runs twice. Off by default (a library user may
    /// want VMs to outlive it).
    pub die_with_parent: bool,
}

impl BackendConfig {
    /// Defaults: no network, 1 MiB console files, 30 s start timeout, 2 s health period.
    pub fn new(data_dir: impl Into<PathBuf>, capacity: Capacity) -> BackendConfig {
        BackendConfig {
            data_dir: data_dir.into(),
            capacity,
            network: None,
            console_max_bytes: 1 << 20,
            start_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            die_with_parent: false,
        }
    }
}

/// What a launcher needs to know to build the command.
#[derive(Debug)]
pub(crate) struct PlanCtx<'a> {
    pub spec: &'a VmSpec,
    pub dir: &'a Path,
    pub socket: &'a Path,
    pub net: Option<&'a NetInfo>,
    pub own_tap: Option<&'a str>,
}

/// How to run one VM.
#[derive(Debug)]
pub(crate) struct Plan {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub hypervisor: Hypervisor,
    /// Control socket, if known up front.
    pub control: Option<Control>,
    /// Also accept a single `*.sock` appearing in the state dir (microvm.nix default name).
    pub discover_socket: bool,
    pub accel: Option<Accel>,
    pub shutdown_program: Option<PathBuf>,
}

/// Builds hypervisor commands for one kind of boot source.
pub(crate) trait Launcher: Send + Sync + std::fmt::Debug + 'static {
    const KIND: &'static str;
    /// Boot kind and files present.
    fn check(&self, spec: &VmSpec) -> Result<(), SpecError>;
    /// Taps (name, flags) the VM needs; `own_tap` is the engine-assigned name.
    fn taps(&self, spec: &VmSpec, own_tap: &str) -> Result<Vec<(String, Vec<String>)>, SpecError>;
    /// The command.
    fn plan(&self, ctx: &PlanCtx<'_>) -> Result<Plan, VmError>;
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    spec: VmSpec,
    own_tap: String,
}

#[derive(Debug, Default)]
struct Rt {
    state: VmState,
    pid: Option<u32>,
    accel: Option<Accel>,
    hypervisor: Option<Hypervisor>,
    control: Option<Control>,
    shutdown_program: Option<PathBuf>,
    env: Vec<(String, String)>,
    last_error: Option<String>,
    last_exit: Option<String>,
    last_stop: Option<StopKind>,
    boots: u32,
    boot_offset: u64,
    health: Option<Health>,
    reserved: bool,
    stopping: bool,
    taps: Vec<String>,
    health_task: Option<AbortHandle>,
}

#[derive(Debug)]
struct Vm {
    name: String,
    dir: PathBuf,
    spec: VmSpec,
    own_tap: String,
    net: Option<NetInfo>,
    ops: tokio::sync::Mutex<()>,
    rt: StdMutex<Rt>,
    console: Arc<Console>,
    exits: watch::Sender<u64>,
}

impl Vm {
    fn rt(&self) -> std::sync::MutexGuard<'_, Rt> {
        self.rt.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

/// The shared engine; cheap to clone.
#[derive(Debug)]
pub(crate) struct Engine<L: Launcher> {
    inner: Arc<Inner<L>>,
}

impl<L: Launcher> Clone for Engine<L> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<L: Launcher> {
    launcher: L,
    cfg: BackendConfig,
    vms: StdMutex<BTreeMap<String, Arc<Vm>>>,
    ledger: Ledger,
    net: Option<Network>,
}

fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Describe how a process ended.
pub(crate) fn describe_exit(status: &std::io::Result<ExitStatus>) -> (bool, String) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) if s.success() => (true, "exited with code 0".into()),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (false, format!("exited with code {c}")),
            (_, Some(sig)) => (false, format!("killed by signal {sig}")),
            _ => (false, "exited".into()),
        },
        Err(e) => (false, format!("wait failed: {e}")),
    }
}

/// SIGKILL a process group (our children are their own group leaders). Ignores ESRCH.
pub(crate) fn kill_group(pid: u32) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
    }
}

/// Run `fut` on its own task so that dropping the caller's future does not abandon it.
async fn detached<T: Send + 'static>(
    fut: impl Future<Output = Result<T, VmError>> + Send + 'static,
) -> Result<T, VmError> {
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) => Err(VmError::io(
            "VM operation task failed",
            std::io::Error::other(e.to_string()),
        )),
    }
}

impl<L: Launcher> Engine<L> {
    /// Open the data dir: load VM records, stop hypervisors orphaned by a previous process,
    /// remove stale sockets and taps.
    pub(crate) async fn open(cfg: BackendConfig, launcher: L) -> Result<Engine<L>, VmError> {
        let vms_dir = cfg.data_dir.join("vms");
        tokio::fs::create_dir_all(&vms_dir)
            .await
            .map_err(|e| VmError::io(format!("cannot create data dir {}", vms_dir.display()), e))?;
        let net = match &cfg.network {
            Some(n) => Some(Network::open(n.clone(), &cfg.data_dir)?),
            None => None,
        };
        let leases = match &net {
            Some(n) => n.leases().await,
            None => BTreeMap::new(),
        };
        let inner = Arc::new(Inner {
            ledger: Ledger::new(cfg.capacity),
            launcher,
            vms: StdMutex::new(BTreeMap::new()),
            net,
            cfg,
        });
        let mut rd = tokio::fs::read_dir(&vms_dir)
            .await
            .map_err(|e| VmError::io(format!("cannot read {}", vms_dir.display()), e))?;
        while let Ok(Some(entry)) = rd.next_entry().await {
            let dir = entry.path();
            let rec: Record = match tokio::fs::read(dir.join("vm.json"))
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(dir = %dir.display(), "skipping unreadable VM record: {e}");
                    continue;
                }
            };
            let mut rt = Rt::default();
            if let Some(pid) = read_pid(&dir).await {
                if process_belongs_to(pid, &dir).await {
                    warn!(vm = %rec.spec.name, pid, "stopping hypervisor orphaned by a previous node process");
                    kill_group(pid);
                    rt.last_error =
                        Some("hypervisor left by a previous node process was killed".into());
                }
                rt.state = VmState::Stopped;
            }
            let _ = tokio::fs::remove_file(dir.join("pid")).await;
            let _ = tokio::fs::remove_file(dir.join("control.sock")).await;
            if let Ok(taps) = inner.launcher.taps(&rec.spec, &rec.own_tap) {
                for (t, _) in taps {
                    if net::link_exists(&t).await {
                        inner
                            .remove_tap(&t, leases.get(&rec.spec.name).copied())
                            .await;
                    }
                }
            }
            let vm = inner.make_vm(rec.spec, rec.own_tap, &leases, rt);
            inner.map().insert(vm.name.clone(), vm);
        }
        Ok(Engine { inner })
    }

    pub(crate) fn kind(&self) -> &'static str {
        L::KIND
    }

    pub(crate) fn capacity(&self) -> Capacity {
        self.inner.ledger.capacity()
    }

    pub(crate) fn usage(&self) -> Usage {
        self.inner.ledger.usage()
    }

    pub(crate) fn network(&self) -> Option<&Network> {
        self.inner.net.as_ref()
    }

    pub(crate) async fn create(&self, spec: VmSpec) -> Result<VmStatus, VmError> {
        let inner = self.inner.clone();
        let span = info_span!("vm.create", vm = %spec.name, backend = L::KIND);
        detached(async move { inner.create(spec).await }.instrument(span)).await
    }

    pub(crate) async fn start(&self, name: &str) -> Result<VmStatus, VmError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let span = info_span!("vm.start", vm = %name, backend = L::KIND);
        detached(async move { inner.start(&name).await }.instrument(span)).await
    }

    pub(crate) async fn stop(&self, name: &str, opts: StopOptions) -> Result<VmStatus, VmError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let span = info_span!("vm.stop", vm = %name, backend = L::KIND, force = opts.force);
        detached(
            async move {
                let vm = inner.get(&name)?;
                let _op = vm.ops.lock().await;
                inner.stop_locked(&vm, opts).await
            }
            .instrument(span),
        )
        .await
    }

    /// Stop every active VM (in parallel), e.g. when the node shuts down.
    pub(crate) async fn stop_all(
        &self,
        opts: StopOptions,
    ) -> Vec<(String, Result<VmStatus, VmError>)> {
        let names: Vec<String> = self
            .inner
            .map()
            .values()
            .filter(|vm| vm.rt().state.is_active())
            .map(|vm| vm.name.clone())
            .collect();
        let mut tasks = Vec::new();
        for n in names {
            let e = self.clone();
            tasks.push(tokio::spawn(async move {
                let r = e.stop(&n, opts).await;
                (n, r)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    }

    pub(crate) async fn pause(&self, name: &str) -> Result<VmStatus, VmError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let span = info_span!("vm.pause", vm = %name, backend = L::KIND);
        detached(async move { inner.pause_resume(&name, true).await }.instrument(span)).await
    }

    pub(crate) async fn resume(&self, name: &str) -> Result<VmStatus, VmError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let span = info_span!("vm.resume", vm = %name, backend = L::KIND);
        detached(async move { inner.pause_resume(&name, false).await }.instrument(span)).await
    }

    pub(crate) async fn reboot(&self, name: &str) -> Result<VmStatus, VmError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let span = info_span!("vm.reboot", vm = %name, backend = L::KIND);
        detached(async move { inner.reboot(&name).await }.instrument(span)).await
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<(), VmError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let span = info_span!("vm.delete", vm = %name, backend = L::KIND);
        detached(async move { inner.delete(&name).await }.instrument(span)).await
    }

    pub(crate) async fn status(&self, name: &str) -> Result<VmStatus, VmError> {
        let vm = self.inner.get(name)?;
        Ok(self.inner.status_of(&vm))
    }

    pub(crate) async fn list(&self) -> Vec<VmStatus> {
        let vms: Vec<Arc<Vm>> = self.inner.map().values().cloned().collect();
        vms.iter().map(|vm| self.inner.status_of(vm)).collect()
    }

    pub(crate) async fn console_log(
        &self,
        name: &str,
        offset: u64,
        max: usize,
    ) -> Result<ConsoleChunk, VmError> {
        let vm = self.inner.get(name)?;
        vm.console
            .read(offset, max.min(4 << 20))
            .await
            .map_err(|e| VmError::io(format!("cannot read console log of {name:?}"), e))
    }

    pub(crate) async fn wait_console(
        &self,
        name: &str,
        needle: &str,
        from: u64,
        timeout: Duration,
    ) -> Result<u64, VmError> {
        let vm = self.inner.get(name)?;
        let span = info_span!("vm.wait_console", vm = %name, needle);
        async {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut total_rx = vm.console.subscribe();
            let mut exit_rx = vm.exits.subscribe();
            let mut scan_from = from;
            loop {
                total_rx.borrow_and_update();
                match vm.console.find(scan_from, needle.as_bytes()).await {
                    Ok(Some(off)) => return Ok(off),
                    Ok(None) => {}
                    Err(e) => return Err(VmError::io("cannot read console log", e)),
                }
                scan_from = vm
                    .console
                    .total()
                    .saturating_sub(needle.len() as u64)
                    .max(from);
                let state = vm.rt().state;
                if !state.is_active() && state != VmState::Created {
                    // Give the pump a moment to flush the last output, then one more look.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(Some(off)) = vm.console.find(scan_from, needle.as_bytes()).await {
                        return Ok(off);
                    }
                    return Err(VmError::NotRunning {
                        name: name.to_string(),
                        state,
                        what: format!("{needle:?} on the console"),
                    });
                }
                tokio::select! {
                    _ = total_rx.changed() => {}
                    _ = exit_rx.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(VmError::Timeout {
                            name: name.to_string(),
                            op: "waiting for console output",
                            after: timeout,
                            hint: format!("; {needle:?} did not appear"),
                        });
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    pub(crate) async fn health(&self, name: &str) -> Result<HealthReport, VmError> {
        let vm = self.inner.get(name)?;
        let span = info_span!("vm.health", vm = %name);
        async {
            let (state, boot_offset) = {
                let rt = vm.rt();
                (rt.state, rt.boot_offset)
            };
            if !matches!(state, VmState::Running) {
                return Ok(HealthReport {
                    health: Health::Unhealthy {
                        last_error: format!("VM is {state}"),
                    },
                    checks: Vec::new(),
                });
            }
            let ip = vm.net.as_ref().map(|n| std::net::IpAddr::V4(n.ip));
            let report = run_checks(&vm.spec.health, ip, &vm.console, boot_offset).await;
            vm.rt().health = Some(report.health.clone());
            Ok(report)
        }
        .instrument(span)
        .await
    }
}

async fn read_pid(dir: &Path) -> Option<u32> {
    tokio::fs::read_to_string(dir.join("pid"))
        .await
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether `pid` is a hypervisor we launched for `dir` (its environment names the dir).
async fn process_belongs_to(pid: u32, dir: &Path) -> bool {
    let Ok(env) = tokio::fs::read(format!("/proc/{pid}/environ")).await else {
        return false;
    };
    let want = format!("BLIXARD_VM_STATE_DIR={}", dir.display());
    env.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

impl<L: Launcher> Inner<L> {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, name: &str) -> Result<Arc<Vm>, VmError> {
        self.map()
            .get(name)
            .cloned()
            .ok_or_else(|| VmError::NotFound {
                name: name.chars().take(80).collect(),
            })
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(name)
    }

    fn make_vm(
        &self,
        spec: VmSpec,
        own_tap: String,
        leases: &BTreeMap<String, std::net::Ipv4Addr>,
        rt: Rt,
    ) -> Arc<Vm> {
        let dir = self.vm_dir(&spec.name);
        let net = match (&self.net, &spec.network) {
            (Some(n), Some(req)) => leases.get(&spec.name).map(|ip| NetInfo {
                taps: self
                    .launcher
                    .taps(&spec, &own_tap)
                    .map(|t| t.into_iter().map(|(n, _)| n).collect())
                    .unwrap_or_default(),
                ip: *ip,
                prefix: n.prefix(),
                gateway: n.gateway(),
                mac: net::mac_for(*ip),
                bridge: n.config().bridge.clone(),
                isolated: req.isolated,
            }),
            _ => None,
        };
        let console = Arc::new(Console::open(&dir, self.cfg.console_max_bytes));
        let (exits, _) = watch::channel(0);
        Arc::new(Vm {
            name: spec.name.clone(),
            dir,
            spec,
            own_tap,
            net,
            ops: tokio::sync::Mutex::new(()),
            rt: StdMutex::new(rt),
            console,
            exits,
        })
    }

    fn status_of(&self, vm: &Vm) -> VmStatus {
        let rt = vm.rt();
        VmStatus {
            name: vm.name.clone(),
            backend: L::KIND.to_string(),
            state: rt.state,
            pid: rt.pid,
            hypervisor: rt.hypervisor,
            accelerator: rt.accel,
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            health: rt.health.clone().unwrap_or(Health::Unknown),
            last_error: rt.last_error.clone(),
            last_exit: rt.last_exit.clone(),
            last_stop: rt.last_stop,
            boots: rt.boots,
            console_bytes: vm.console.total(),
            network: vm.net.clone(),
            control_socket: rt.control.as_ref().map(|c| c.socket.clone()),
        }
    }

    async fn create(self: Arc<Self>, spec: VmSpec) -> Result<VmStatus, VmError> {
        let cap = self.ledger.capacity();
        validate_spec(&spec, cap.vcpus, cap.memory_mib)?;
        if let Ok(existing) = self.get(&spec.name) {
            if existing.spec == spec {
                return Ok(self.status_of(&existing));
            }
            return Err(VmError::AlreadyExists { name: spec.name });
        }
        self.launcher.check(&spec)?;
        if spec.network.is_some() && self.net.is_none() {
            return Err(SpecError::NetworkNotConfigured.into());
        }
        let dir = self.vm_dir(&spec.name);
        let sock_len = dir.join("control.sock").as_os_str().len();
        if sock_len > MAX_SOCKET_PATH {
            return Err(VmError::io(
                format!(
                    "control socket path in {} is {sock_len} bytes",
                    dir.display()
                ),
                std::io::Error::other(
                    "longer than the 107 bytes a unix socket path may have; use a shorter data dir",
                ),
            ));
        }
        let own_tap = format!(
            "bx{:012x}",
            fnv64(&format!("{}/{}", self.cfg.data_dir.display(), spec.name)) & 0xffff_ffff_ffff
        );
        // Runner taps are host-global names: refuse two VMs sharing one.
        let taps = self.launcher.taps(&spec, &own_tap)?;
        {
            let map = self.map();
            for other in map.values() {
                if let Ok(other_taps) = self.launcher.taps(&other.spec, &other.own_tap) {
                    for (t, _) in &taps {
                        if other_taps.iter().any(|(o, _)| o == t) {
                            return Err(SpecError::TapInUse {
                                tap: t.clone(),
                                other: other.name.clone(),
                            }
                            .into());
                        }
                    }
                }
            }
        }
        if spec.network.is_some() && taps.is_empty() {
            return Err(SpecError::WrongBoot {
                backend: L::KIND,
                got: "networked runner without tap interfaces",
                hint: "list a tap in RUNNER/share/microvm/tap-interfaces or drop VmSpec::network",
            }
            .into());
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmError::io(format!("cannot create {}", dir.display()), e))?;
        let result = async {
            let mut leases = BTreeMap::new();
            if let (Some(n), Some(_)) = (&self.net, &spec.network) {
                leases.insert(spec.name.clone(), n.lease(&spec.name).await?);
            }
            let rec = Record {
                spec: spec.clone(),
                own_tap: own_tap.clone(),
            };
            let bytes = serde_json::to_vec_pretty(&rec)
                .map_err(|e| VmError::io("cannot encode VM record", std::io::Error::other(e)))?;
            let tmp = dir.join("vm.json.tmp");
            tokio::fs::write(&tmp, bytes)
                .await
                .map_err(|e| VmError::io(format!("cannot write {}", tmp.display()), e))?;
            tokio::fs::rename(&tmp, dir.join("vm.json"))
                .await
                .map_err(|e| VmError::io("cannot write vm.json", e))?;
            Ok::<_, VmError>(leases)
        }
        .await;
        let leases = match result {
            Ok(l) => l,
            Err(e) => {
                if let Some(n) = &self.net {
                    let _ = n.release(&spec.name).await;
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        let vm = self.make_vm(spec, own_tap, &leases, Rt::default());
        self.map().insert(vm.name.clone(), vm.clone());
        info!(vm = %vm.name, vcpus = vm.spec.vcpus, memory_mib = vm.spec.memory_mib, "VM created");
        Ok(self.status_of(&vm))
    }

    async fn start(self: Arc<Self>, name: &str) -> Result<VmStatus, VmError> {
        let vm = self.get(name)?;
        let _op = vm.ops.lock().await;
        if vm.rt().state.is_active() {
            return Ok(self.status_of(&vm));
        }
        self.launcher.check(&vm.spec)?;
        self.ledger.reserve(vm.spec.vcpus, vm.spec.memory_mib)?;
        let t0 = Instant::now();
        let mut created_taps: Vec<String> = Vec::new();
        let mut spawned = false;
        let result = self
            .clone()
            .launch(&vm, &mut created_taps, &mut spawned)
            .await;
        match result {
            Ok(()) => {
                let st = self.status_of(&vm);
                info!(vm = %vm.name, pid = ?st.pid, accel = ?st.accelerator, hypervisor = ?st.hypervisor,
                      elapsed_ms = t0.elapsed().as_millis() as u64, "VM started");
                Ok(st)
            }
            Err(e) => {
                warn!(vm = %vm.name, "start failed: {e}");
                if spawned {
                    // The supervisor owns taps and the reservation now: kill and let it clean.
                    let pid = vm.rt().pid;
                    if let Some(pid) = pid {
                        kill_group(pid);
                    }
                    // The supervisor may be done already: wait on the state, which
                    // `wait_for` checks at once, not only on the next change.
                    let mut rx = vm.exits.subscribe();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        rx.wait_for(|_| !vm.rt().state.is_active()),
                    )
                    .await;
                } else {
                    for t in &created_taps {
                        self.remove_tap(t, vm.net.as_ref().map(|n| n.ip)).await;
                    }
                    self.ledger.release(vm.spec.vcpus, vm.spec.memory_mib);
                }
                let mut rt = vm.rt();
                rt.state = VmState::Failed;
                rt.last_error = Some(format!("start failed: {e}"));
                Err(e)
            }
        }
    }

    async fn remove_tap(&self, tap: &str, ip: Option<std::net::Ipv4Addr>) {
        match (&self.net, ip) {
            (Some(n), Some(ip)) => n.detach_tap(tap, ip).await,
            _ => net::delete_link(tap).await,
        }
    }

    async fn launch(
        self: Arc<Self>,
        vm: &Arc<Vm>,
        created_taps: &mut Vec<String>,
        spawned: &mut bool,
    ) -> Result<(), VmError> {
        // Taps first: the hypervisor opens them by name.
        for (tap, flags) in self.launcher.taps(&vm.spec, &vm.own_tap)? {
            if net::link_exists(&tap).await {
                return Err(crate::error::NetworkError::Command {
                    command: format!("ip tuntap add dev {tap}"),
                    stderr: "the interface already exists (used outside Blixard?)".into(),
                }
                .into());
            }
            match (&self.net, &vm.net) {
                (Some(n), Some(info)) => n.attach_tap(&tap, &flags, info.isolated, info.ip).await?,
                _ => net::create_tap(&tap, &flags, None).await?,
            }
            created_taps.push(tap);
        }
        let socket = vm.socket();
        let _ = tokio::fs::remove_file(&socket).await;
        remove_stale_sockets(&vm.dir).await;
        let plan = self.launcher.plan(&PlanCtx {
            spec: &vm.spec,
            dir: &vm.dir,
            socket: &socket,
            net: vm.net.as_ref(),
            own_tap: Some(&vm.own_tap),
        })?;
        let mut cmd = Command::new(&plan.program);
        cmd.args(&plan.args)
            .envs(plan.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("BLIXARD_VM_STATE_DIR", &vm.dir)
            .current_dir(&vm.dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        if self.cfg.die_with_parent {
            // SAFETY: the closure runs in the forked child before exec and only makes one
            // async-signal-safe syscall (prctl).
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().map_err(|source| {
            let hint = if source.kind() == std::io::ErrorKind::NotFound {
                "; is it installed and on PATH? (apt-get install qemu-system-x86)".to_string()
            } else {
                String::new()
            };
            VmError::Launch {
                name: vm.name.clone(),
                program: plan.program.clone(),
                source,
                hint,
            }
        })?;
        *spawned = true;
        let pid = child.id().unwrap_or(0);
        let boot_offset = vm.console.total();
        {
            let mut rt = vm.rt();
            rt.state = VmState::Starting;
            rt.pid = Some(pid);
            rt.reserved = true;
            rt.stopping = false;
            rt.taps = std::mem::take(created_taps);
            rt.hypervisor = Some(plan.hypervisor);
            rt.accel = plan.accel;
            rt.control = None;
            rt.shutdown_program = plan.shutdown_program.clone();
            rt.env = plan.env.clone();
            rt.last_error = None;
            rt.last_stop = None;
            rt.boot_offset = boot_offset;
            rt.health = None;
        }
        let _ = tokio::fs::write(vm.dir.join("pid"), format!("{pid}\n")).await;
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            let c = vm.console.clone();
            pumps.push(tokio::spawn(async move { c.pump(out).await }));
        }
        if let Some(err) = child.stderr.take() {
            let c = vm.console.clone();
            pumps.push(tokio::spawn(async move { c.pump(err).await }));
        }
        let gen0 = *vm.exits.borrow();
        tokio::spawn(
            self.clone()
                .supervise(vm.clone(), child, pumps, pid)
                .instrument(info_span!("vm.supervise", vm = %vm.name, pid)),
        );

        // Wait until the control socket answers (or the hypervisor dies).
        let deadline = Instant::now() + self.cfg.start_timeout;
        let control = loop {
            if *vm.exits.borrow() != gen0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let exit = vm.rt().last_exit.clone().unwrap_or_else(|| "exited".into());
                return Err(VmError::EarlyExit {
                    name: vm.name.clone(),
                    exit,
                    console_tail: vm.console.tail(2000).await,
                });
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    name: vm.name.clone(),
                    op: "start",
                    after: self.cfg.start_timeout,
                    hint: "; the hypervisor's control socket never answered (see docs/vmm.md, control socket convention)".into(),
                });
            }
            if plan.hypervisor == Hypervisor::Other {
                // No control API: alive after a short grace period counts as started.
                tokio::time::sleep(Duration::from_millis(300)).await;
                if *vm.exits.borrow() == gen0 {
                    break None;
                }
                continue;
            }
            let mut candidates: Vec<Control> = plan.control.iter().cloned().collect();
            if plan.discover_socket {
                candidates.extend(
                    find_sockets(&vm.dir)
                        .await
                        .into_iter()
                        .map(|socket| Control {
                            hypervisor: plan.hypervisor,
                            socket,
                        }),
                );
            }
            let mut ready = None;
            for c in candidates {
                if c.socket.exists() && c.ping().await.is_ok() {
                    ready = Some(c);
                    break;
                }
            }
            if let Some(c) = ready {
                break Some(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let accel = match (&plan.accel, &control) {
            (Some(a), _) => Some(*a),
            (None, Some(c)) => c.accelerator().await.ok().flatten(),
            (None, None) => None,
        };
        let health_task = if vm.spec.health.is_empty() {
            None
        } else {
            Some(tokio::spawn(health_loop(vm.clone(), self.cfg.health_interval)).abort_handle())
        };
        let mut rt = vm.rt();
        if *vm.exits.borrow() != gen0 {
            if let Some(h) = health_task {
                h.abort();
            }
            return Err(VmError::EarlyExit {
                name: vm.name.clone(),
                exit: rt.last_exit.clone().unwrap_or_default(),
                console_tail: String::new(),
            });
        }
        rt.state = VmState::Running;
        rt.control = control;
        rt.accel = accel;
        rt.boots += 1;
        rt.health_task = health_task;
        Ok(())
    }

    async fn supervise(
        self: Arc<Self>,
        vm: Arc<Vm>,
        mut child: Child,
        pumps: Vec<JoinHandle<()>>,
        pid: u32,
    ) {
        let status = child.wait().await;
        // Anything the runner left in its process group goes too.
        kill_group(pid);
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
        }
        let (ok, exit) = describe_exit(&status);
        let (taps, reserved, stopping, health_task, control) = {
            let mut rt = vm.rt();
            (
                std::mem::take(&mut rt.taps),
                std::mem::replace(&mut rt.reserved, false),
                rt.stopping,
                rt.health_task.take(),
                rt.control.take(),
            )
        };
        if let Some(h) = health_task {
            h.abort();
        }
        for t in &taps {
            self.remove_tap(t, vm.net.as_ref().map(|n| n.ip)).await;
        }
        if reserved {
            self.ledger.release(vm.spec.vcpus, vm.spec.memory_mib);
        }
        let _ = tokio::fs::remove_file(vm.dir.join("pid")).await;
        let _ = tokio::fs::remove_file(vm.socket()).await;
        if let Some(c) = control {
            if c.socket.starts_with(&vm.dir) {
                let _ = tokio::fs::remove_file(&c.socket).await;
            }
        }
        remove_stale_sockets(&vm.dir).await;
        {
            let mut rt = vm.rt();
            rt.pid = None;
            rt.last_exit = Some(exit.clone());
            rt.health = None;
            if stopping || ok {
                rt.state = VmState::Stopped;
                info!(vm = %vm.name, %exit, "hypervisor exited");
            } else {
                rt.state = VmState::Failed;
                rt.last_error = Some(format!("hypervisor exited unexpectedly ({exit})"));
                warn!(vm = %vm.name, %exit, "hypervisor exited unexpectedly: VM failed");
            }
        }
        vm.exits.send_modify(|g| *g += 1);
    }

    async fn stop_locked(&self, vm: &Arc<Vm>, opts: StopOptions) -> Result<VmStatus, VmError> {
        let (state, pid, control, shutdown_program, env) = {
            let mut rt = vm.rt();
            if !rt.state.is_active() {
                drop(rt);
                return Ok(self.status_of(vm));
            }
            let prev = rt.state;
            rt.stopping = true;
            rt.state = VmState::Stopping;
            (
                prev,
                rt.pid,
                rt.control.clone(),
                rt.shutdown_program.clone(),
                rt.env.clone(),
            )
        };
        let gen0 = *vm.exits.borrow();
        let mut rx = vm.exits.subscribe();
        let mut kind = StopKind::Forced;
        // Without microvm-shutdown and without a control API there is no way to ask.
        let can_ask = shutdown_program.is_some() || control.is_some();
        if !opts.force && can_ask {
            let deadline = tokio::time::Instant::now() + opts.timeout;
            if state == VmState::Paused {
                if let Some(c) = &control {
                    if let Err(e) = c.resume().await {
                        warn!(vm = %vm.name, "cannot resume paused VM before shutdown: {e}");
                    }
                }
            }
            let mut fallback = true;
            if let Some(prog) = &shutdown_program {
                let spawned = Command::new(prog)
                    .current_dir(&vm.dir)
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .env("BLIXARD_VM_STATE_DIR", &vm.dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn();
                match spawned {
                    Ok(mut child) => {
                        tokio::select! {
                            _ = rx.wait_for(|g| *g != gen0) => { fallback = false; }
                            r = child.wait() => {
                                let (ok, how) = describe_exit(&r);
                                if ok {
                                    fallback = false;
                                } else {
                                    warn!(vm = %vm.name, "{} {how}; falling back to the control socket", prog.display());
                                }
                            }
                            _ = tokio::time::sleep_until(deadline) => { fallback = false; }
                        }
                    }
                    Err(e) => warn!(vm = %vm.name, "cannot run {}: {e}", prog.display()),
                }
            }
            if fallback && *vm.exits.borrow() == gen0 {
                match &control {
                    Some(c) => {
                        if let Err(e) = c.powerdown().await {
                            warn!(vm = %vm.name, "graceful shutdown request failed: {e}");
                        }
                    }
                    None => {
                        warn!(vm = %vm.name, "no control socket and no microvm-shutdown: killing")
                    }
                }
            }
            if tokio::time::timeout_at(deadline, rx.wait_for(|g| *g != gen0))
                .await
                .is_ok()
            {
                kind = StopKind::Graceful;
            } else {
                info!(vm = %vm.name, timeout = ?opts.timeout, "guest did not shut down in time: killing the hypervisor");
            }
        }
        if kind == StopKind::Forced {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|g| *g != gen0))
                .await
                .is_err()
            {
                return Err(VmError::Timeout {
                    name: vm.name.clone(),
                    op: "forced stop",
                    after: Duration::from_secs(10),
                    hint: "; the hypervisor survived SIGKILL (uninterruptible sleep?)".into(),
                });
            }
        }
        vm.rt().last_stop = Some(kind);
        info!(vm = %vm.name, ?kind, "VM stopped");
        Ok(self.status_of(vm))
    }

    async fn pause_resume(&self, name: &str, pause: bool) -> Result<VmStatus, VmError> {
        let vm = self.get(name)?;
        let _op = vm.ops.lock().await;
        let (state, control) = {
            let rt = vm.rt();
            (rt.state, rt.control.clone())
        };
        let (op, from, to) = if pause {
            ("pause", VmState::Running, VmState::Paused)
        } else {
            ("resume", VmState::Paused, VmState::Running)
        };
        if state == to {
            return Ok(self.status_of(&vm));
        }
        if state != from {
            return Err(VmError::InvalidState {
                name: name.to_string(),
                op,
                state,
                hint: if pause { "; start it first" } else { "" },
            });
        }
        let c = control.ok_or_else(|| VmError::Control {
            name: name.to_string(),
            source: ControlError::Unsupported {
                hypervisor: "unknown".into(),
                op,
            },
        })?;
        let r = if pause {
            c.pause().await
        } else {
            c.resume().await
        };
        r.map_err(|source| VmError::Control {
            name: name.to_string(),
            source,
        })?;
        vm.rt().state = to;
        info!(vm = %name, "VM {}", if pause { "paused" } else { "resumed" });
        Ok(self.status_of(&vm))
    }

    async fn reboot(&self, name: &str) -> Result<VmStatus, VmError> {
        let vm = self.get(name)?;
        let _op = vm.ops.lock().await;
        let (state, control) = {
            let rt = vm.rt();
            (rt.state, rt.control.clone())
        };
        if state != VmState::Running {
            return Err(VmError::InvalidState {
                name: name.to_string(),
                op: "reboot",
                state,
                hint: if state == VmState::Paused {
                    "; resume it first"
                } else {
                    "; start it instead"
                },
            });
        }
        let c = control.ok_or_else(|| VmError::Control {
            name: name.to_string(),
            source: ControlError::Unsupported {
                hypervisor: "unknown".into(),
                op: "reboot",
            },
        })?;
        let offset = vm.console.total();
        c.reboot().await.map_err(|source| VmError::Control {
            name: name.to_string(),
            source,
        })?;
        {
            let mut rt = vm.rt();
            rt.boots += 1;
            rt.boot_offset = offset;
            rt.health = None;
        }
        info!(vm = %name, "VM rebooted");
        Ok(self.status_of(&vm))
    }

    async fn delete(&self, name: &str) -> Result<(), VmError> {
        let vm = match self.get(name) {
            Ok(vm) => vm,
            Err(VmError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _op = vm.ops.lock().await;
        let timeout = Duration::from_millis(vm.spec.stop_timeout_ms);
        self.stop_locked(&vm, StopOptions::graceful(timeout))
            .await?;
        if let Ok(taps) = self.launcher.taps(&vm.spec, &vm.own_tap) {
            for (t, _) in taps {
                if net::link_exists(&t).await {
                    self.remove_tap(&t, vm.net.as_ref().map(|n| n.ip)).await;
                }
            }
        }
        if let Some(n) = &self.net {
            n.release(&vm.name).await?;
        }
        match tokio::fs::remove_dir_all(&vm.dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(VmError::io(
                    format!("cannot remove {}", vm.dir.display()),
                    e,
                ))
            }
        }
        self.map().remove(&vm.name);
        info!(vm = %name, "VM deleted");
        Ok(())
    }
}

async fn find_sockets(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(mut rd) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sock") {
                out.push(p);
            }
        }
    }
    out
}

async fn remove_stale_sockets(dir: &Path) {
    for s in find_sockets(dir).await {
        let _ = tokio::fs::remove_file(s).await;
    }
}

async fn health_loop(vm: Arc<Vm>, interval: Duration) {
    loop {
        let (state, boot_offset) = {
            let rt = vm.rt();
            (rt.state, rt.boot_offset)
        };
        if state == VmState::Running {
            let ip = vm.net.as_ref().map(|n| std::net::IpAddr::V4(n.ip));
            let report = run_checks(&vm.spec.health, ip, &vm.console, boot_offset).await;
            let mut rt = vm.rt();
            if rt.state == VmState::Running && rt.boot_offset == boot_offset {
                if let (Some(Health::Healthy), Health::Unhealthy { last_error }) =
                    (&rt.health, &report.health)
                {
                    warn!(vm = %vm.name, "VM became unhealthy: {last_error}");
                }
                rt.health = Some(report.health);
            }
        }
        tokio::time::sleep(interval).await;
    }
}
