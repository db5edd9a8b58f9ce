//! The reconciler's executor: turns committed state into running VMs on this node.
//!
//! Each round it reads what the cluster wants here (VMs placed on this node), what the
//! backends have, and asks the pure [`blixard_reconcile::plan`] what to do; then it carries
//! the actions out, one task per VM (a slow stop of one VM never holds up another), and
//! reports each VM's actual state back through Raft. Image fetches run in their own tasks,
//! one per image, shared by every VM that needs it.
//!
//! **Invariants:** only VMs the backends list are touched (the backends own their data
//! dirs); a VM not placed here (moved, deleted) is stopped and removed before anything
//! else happens to it; hypervisors die with the daemon (`die_with_parent`), so a node that
//! was killed never comes back running a VM the cluster moved away.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_images::Materialised;
use blixard_reconcile::{plan, Action, ImageState, Local, Memory, Observed, Wanted};
use blixard_types::image::ImageKind;
use blixard_types::vm::HealthCheck;
use blixard_types::{Command, CommandResult};
use blixard_vmm::{
    BackendConfig, Boot, Bundle, Capacity, Disk, MicrovmBackend, QemuBackend, QemuOptions, Runner, StopOptions,
    VmBackend, VmError, VmState as LocalState, VmStatus,
};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::images::NodeImages;
use crate::node::NodeCtx;
use crate::now_ms;

/// How often the executor looks when nothing was applied: often while a VM of this node is
/// on its way somewhere (starting, fetching), rarely when all are where they should be.
const TICK_BUSY: Duration = Duration::from_millis(250);
const TICK_IDLE: Duration = Duration::from_secs(2);
/// How long a booting guest may take to show its readiness marker before the watcher stops
/// waiting (the periodic health check still sees it later).
const READY_WATCH: Duration = Duration::from_secs(300);
/// How long a guest gets to shut down before its hypervisor is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one catch-up attempt may take inside the loop.
const CATCH_UP_TRY: Duration = Duration::from_secs(2);

/// Which VM backends a node runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Both: the image decides (a Nix closure runs on the microvm backend, a bundle on qemu).
    #[default]
    Auto,
    /// microvm.nix runners only.
    Microvm,
    /// Kernel/initrd/disk bundles on qemu only.
    Qemu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "microvm" => Ok(Self::Microvm),
            "qemu" => Ok(Self::Qemu),
            _ => Err(format!("unknown backend {s:?}: expected auto, microvm or qemu")),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Microvm => "microvm",
            Self::Qemu => "qemu",
        })
    }
}

/// The node's VM backends, each with its own state dir under `DATA_DIR/vmm/`.
#[derive(Debug)]
pub struct Backends {
    qemu: Option<Arc<QemuBackend>>,
    microvm: Option<Arc<MicrovmBackend>>,
}

impl Backends {
    pub async fn open(dir: &Path, capacity: Capacity, choice: BackendChoice) -> Result<Self, VmError> {
        let cfg = |kind: &str| {
            let mut c = BackendConfig::new(dir.join(kind), capacity);
            c.die_with_parent = true;
            c
        };
        let qemu = match choice {
            BackendChoice::Auto | BackendChoice::Qemu => {
                Some(Arc::new(QemuBackend::open(cfg("qemu"), QemuOptions::default()).await?))
            }
            BackendChoice::Microvm => None,
        };
        let microvm = match choice {
            BackendChoice::Auto | BackendChoice::Microvm => Some(Arc::new(MicrovmBackend::open(cfg("microvm")).await?)),
            BackendChoice::Qemu => None,
        };
        Ok(Self { qemu, microvm })
    }

    fn all(&self) -> Vec<Arc<dyn VmBackend>> {
        let mut v: Vec<Arc<dyn VmBackend>> = Vec::new();
        if let Some(q) = &self.qemu {
            v.push(q.clone());
        }
        if let Some(m) = &self.microvm {
            v.push(m.clone());
        }
        v
    }

    /// The backend that runs images of `kind` here.
    fn for_kind(&self, kind: ImageKind) -> Result<Arc<dyn VmBackend>, String> {
        let b: Option<Arc<dyn VmBackend>> = match kind {
            ImageKind::Bundle => self.qemu.clone().map(|b| b as _),
            ImageKind::NixClosure => self.microvm.clone().map(|b| b as _),
        };
        b.ok_or_else(|| {
            let need = if kind == ImageKind::Bundle { "qemu" } else { "microvm" };
            format!("this node does not run the {need} backend that {kind} images need (see `node run --backend`)")
        })
    }

    /// Every VM of every backend, with the backend that has it.
    async fn list(&self) -> BTreeMap<String, (Arc<dyn VmBackend>, VmStatus)> {
        let mut out = BTreeMap::new();
        for b in self.all() {
            for s in b.list().await {
                out.insert(s.name.clone(), (b.clone(), s));
            }
        }
        out
    }

    /// The backend holding VM `name`.
    pub async fn find(&self, name: &str) -> Option<Arc<dyn VmBackend>> {
        for b in self.all() {
            if b.status(name).await.is_ok() {
                return Some(b);
            }
        }
        None
    }

    /// Stops every VM (node shutdown): guests get `timeout` to power off.
    pub async fn stop_all(&self, timeout: Duration) {
        if let Some(q) = &self.qemu {
            q.stop_all(StopOptions::graceful(timeout)).await;
        }
        if let Some(m) = &self.microvm {
            m.stop_all(StopOptions::graceful(timeout)).await;
        }
    }
}

/// The executor's shared pieces.
#[derive(Clone)]
pub struct Executor {
    ctx: NodeCtx,
    images: Arc<NodeImages>,
    backends: Arc<Backends>,
    /// Image fetches by hash: in progress, done, or failed (until a VM picked the failure up).
    fetches: Arc<Mutex<BTreeMap<String, ImageState>>>,
    /// Wakes the loop when something it waits for happened (a fetch ended, a guest is ready).
    wake: Arc<tokio::sync::Notify>,
}

/// What a VM task tells the loop when it ends.
type Done = (String, Result<(), String>);

impl Executor {
    pub fn new(ctx: NodeCtx, images: Arc<NodeImages>, backends: Arc<Backends>) -> Self {
        Self { ctx, images, backends, fetches: Default::default(), wake: Default::default() }
    }

    /// Runs until the node stops. Acts only once this node has applied everything the
    /// cluster had committed when it started: a node coming back must first learn that its
    /// VMs were moved away, or it would start them again.
    pub async fn run(self) {
        self.catch_up().instrument(info_span!("reconcile_catch_up")).await;
        // VMs this node had when its previous process ended were stopped by the node (a
        // shutdown, or the kill of orphaned hypervisors at start), not by their guests: they
        // start again at once, whatever their restart policy.
        let mut memory: BTreeMap<String, Memory> = self
            .wanted()
            .into_keys()
            .map(|name| (name, Memory { stopped_on_purpose: true, ..Memory::default() }))
            .collect();
        let mut busy: BTreeSet<String> = BTreeSet::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut applied = self.ctx.applied.clone();
        let mut fence = blixard_reconcile::fence::Fence::new(std::time::Instant::now());
        // A deadline, not a fresh sleep per iteration: metrics change far more often than
        // the tick (every heartbeat) and must not keep postponing it.
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.wake.notified() => {}
                Some((name, res)) = done_rx.recv() => {
                    busy.remove(&name);
                    if let Err(e) = res {
                        warn!(vm = %name, error = %e, "VM operation failed");
                        memory.entry(name).or_default().record_failure(e, now_ms());
                    }
                }
                r = applied.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
            // Self-fencing: when the voters this node is not in touch with (both ways) could
            // form a majority, it starts nothing, and after half the placement grace it stops
            // its VMs: that majority places them elsewhere once the grace has passed. Back
            // in touch, it starts them again.
            use blixard_reconcile::fence::Step;
            match fence.step(self.ctx.cut_off(), std::time::Instant::now(), self.ctx.placement_grace) {
                Step::Reconcile { resumed, back } => {
                    if back {
                        info!("in touch with a majority again; catching up");
                    }
                    // Its VMs may have moved while it was not acting: learn that first.
                    if resumed && !self.catch_up_once().instrument(info_span!("reconcile_catch_up")).await {
                        fence.retry_resume(back);
                        next = tokio::time::Instant::now() + TICK_BUSY;
                        continue;
                    }
                    if back {
                        for (name, m) in memory.iter_mut() {
                            m.stopped_on_purpose = true;
                            m.next_restart_ms = 0;
                            debug!(vm = %name, "may start again");
                        }
                    }
                }
                // Running VMs keep running for now; nothing starts (this node may be about
                // to lose them).
                Step::Wait => {
                    next = tokio::time::Instant::now() + TICK_BUSY;
                    continue;
                }
                Step::Fence { first } => {
                    if first {
                        warn!("cut off from a majority of the cluster: stopping this node's VMs (they will be placed elsewhere)");
                    }
                    self.fence().await;
                    next = tokio::time::Instant::now() + TICK_BUSY;
                    continue;
                }
            }
            let settled = self.round(&mut memory, &mut busy, &done_tx).instrument(info_span!("reconcile")).await;
            next = tokio::time::Instant::now() + if settled && busy.is_empty() { TICK_IDLE } else { TICK_BUSY };
        }
    }

    /// Kills every active VM on this node at once (no graceful stop: the majority's copy may
    /// boot soon).
    async fn fence(&self) {
        for (name, (b, st)) in self.backends.list().await {
            if st.state.is_active() {
                match b.stop(&name, StopOptions::forced()).await {
                    Ok(_) => warn!(vm = %name, "fenced: stopped"),
                    Err(e) => warn!(vm = %name, error = %e, "fencing stop failed"),
                }
            }
        }
    }

    /// Waits until this node has applied everything in the leader's log (read from the
    /// leader): its last index, not only what it has committed, since an entry the leader
    /// proposed while cut off (a VM moved away from here) may commit a moment later.
    async fn catch_up(&self) {
        while !self.catch_up_once().await {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        info!("caught up with the cluster; reconciling");
    }

    /// One attempt at [`Self::catch_up`], bounded by [`CATCH_UP_TRY`]: the loop must get back
    /// to its fencing decisions when the leader cannot be reached.
    async fn catch_up_once(&self) -> bool {
        let attempt = async {
            match self.ctx.leader().await {
                Ok(l) if l == self.ctx.id => crate::client_api::linearizable(&self.ctx).await.is_ok(),
                Ok(l) => match self.ctx.forward(l, blixard_types::rpc::ClientRequest::NodeStatus { node: l.to_string() }).await {
                    Ok(blixard_types::rpc::ClientResponse::Node(s)) => {
                        let mut m = self.ctx.raft.metrics();
                        let applied = |m: &openraft::RaftMetrics<_, _>| m.last_applied.map(|l| l.index).unwrap_or(0);
                        let reached = m.wait_for(|m| applied(m) >= s.last_log_index).await;
                        reached.is_ok()
                    }
                    other => {
                        debug!(result = ?other.map(|_| ()), "the leader's log index not known yet");
                        false
                    }
                },
                Err(e) => {
                    debug!(error = %e, "no leader yet");
                    false
                }
            }
        };
        tokio::time::timeout(CATCH_UP_TRY, attempt).await.unwrap_or(false)
    }

    /// One reconciliation round. Returns whether every VM here is where it should be (no
    /// actions, nothing fetching or starting), so the loop may look less often.
    async fn round(&self, memory: &mut BTreeMap<String, Memory>, busy: &mut BTreeSet<String>, done: &mpsc::UnboundedSender<Done>) -> bool {
        let wanted = self.wanted();
        let local = self.backends.list().await;
        let observed: BTreeMap<String, Observed> = local
            .iter()
            .map(|(name, (_, s))| (name.clone(), observe(s, wanted.get(name).and_then(|w| w.spec.health.as_ref()))))
            .collect();
        self.sync_images(&wanted, memory);
        // VMs with an operation in flight sit this round out (their memory is kept aside).
        let parked: BTreeMap<String, Memory> =
            busy.iter().filter_map(|n| memory.remove(n).map(|m| (n.clone(), m))).collect();
        let wanted_now: BTreeMap<String, Wanted> = wanted.into_iter().filter(|(n, _)| !busy.contains(n)).collect();
        let observed_now: BTreeMap<String, Observed> = observed.into_iter().filter(|(n, _)| !busy.contains(n)).collect();
        let actions = plan(&wanted_now, &observed_now, memory, now_ms());
        memory.extend(parked);
        tracing::trace!(?actions, observed = ?observed_now, "planned");
        let settled = actions.is_empty()
            && wanted_now.values().all(|w| {
                use blixard_types::vm::VmState as S;
                !matches!(w.recorded.state, S::Pending | S::Fetching | S::Starting)
            });

        let mut per_vm: BTreeMap<String, Vec<Action>> = BTreeMap::new();
        for a in actions {
            match a {
                Action::FetchImage(name) => {
                    if let Some(w) = wanted_now.get(&name) {
                        self.start_fetch(w.spec.image.clone());
                    }
                }
                other => per_vm.entry(other.vm().to_string()).or_default().push(other),
            }
        }
        for (name, acts) in per_vm {
            busy.insert(name.clone());
            let me = self.clone();
            let backend = local.get(&name).map(|(b, _)| b.clone());
            let spec = wanted_now.get(&name).map(|w| w.spec.clone());
            let done = done.clone();
            let span = info_span!("vm", vm = %name);
            tokio::spawn(
                async move {
                    let res = me.execute(&name, acts, backend, spec).await;
                    if res.is_err() {
                        me.ctx.metrics.vm_op_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let _ = done.send((name, res));
                }
                .instrument(span),
            );
        }
        settled
    }

    /// What the cluster wants on this node.
    fn wanted(&self) -> BTreeMap<String, Wanted> {
        let st = self.ctx.state.read().unwrap_or_else(|p| p.into_inner());
        st.state.wanted_on(&self.ctx.id)
    }

    /// Carries finished fetches into the VMs' memories; an image already here needs none.
    fn sync_images(&self, wanted: &BTreeMap<String, Wanted>, memory: &mut BTreeMap<String, Memory>) {
        let mut fetches = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
        let mut picked_up = Vec::new();
        for (name, w) in wanted {
            let m = memory.entry(name.clone()).or_default();
            let hash = &w.spec.image;
            match (fetches.get(hash), &m.image) {
                (Some(ImageState::Ready), ImageState::Missing | ImageState::Fetching) => m.image = ImageState::Ready,
                (Some(ImageState::Failed(e)), ImageState::Missing | ImageState::Fetching) => {
                    m.image = ImageState::Failed(e.clone());
                    picked_up.push(hash.clone());
                }
                // Started again by the user after an image failure: fetch again.
                (_, ImageState::Failed(_)) if w.recorded.state == blixard_types::vm::VmState::Pending => {
                    m.image = ImageState::Missing;
                }
                _ => {}
            }
        }
        for h in picked_up {
            fetches.remove(&h);
        }
    }

    /// Fetches (from the peers that hold it) and materialises image `hash`, once.
    fn start_fetch(&self, hash: String) {
        {
            let mut f = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(f.get(&hash), Some(ImageState::Fetching | ImageState::Ready)) {
                return;
            }
            f.insert(hash.clone(), ImageState::Fetching);
        }
        let me = self.clone();
        let span = info_span!("image_prefetch", image = %&hash[..12.min(hash.len())]);
        tokio::spawn(
            async move {
                let r = me.fetch_and_materialise(&hash).await;
                let state = match r {
                    Ok(()) => ImageState::Ready,
                    Err(e) => {
                        warn!(error = %e, "image not available");
                        ImageState::Failed(e)
                    }
                };
                me.fetches.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, state);
                me.wake.notify_one();
            }
            .instrument(span),
        );
    }

    async fn fetch_and_materialise(&self, hash: &str) -> Result<(), String> {
        if !self.images.holds(hash) {
            let providers = crate::images::providers(&self.ctx, hash);
            let r = self.images.fetch(hash, providers).await;
            self.ctx.metrics.observe_fetch(&r);
            // The store logs what the fetch did, provider by provider.
            r.map_err(|e| e.to_string())?;
        }
        self.images.materialise(hash).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Runs one VM's actions in order; the first failure ends the list.
    async fn execute(
        &self,
        name: &str,
        actions: Vec<Action>,
        mut backend: Option<Arc<dyn VmBackend>>,
        spec: Option<blixard_types::vm::VmSpec>,
    ) -> Result<(), String> {
        for a in actions {
            debug!(action = ?a, "executing");
            if !matches!(a, Action::Report(..)) {
                self.ctx.metrics.vm_ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match a {
                Action::Report(_, report) => {
                    let cmd = Command::ReportVm { name: name.to_string(), report };
                    match self.ctx.propose(self.ctx.id, cmd).await {
                        Ok(CommandResult::Ok) => {}
                        // Moved or deleted meanwhile: the next round sees it.
                        Ok(CommandResult::Refused(r)) => debug!(reason = %r, "report refused"),
                        Err(e) => debug!(error = %e, "report not recorded; next round retries"),
                    }
                }
                Action::Create(_) => {
                    let spec = spec.as_ref().ok_or("no spec")?;
                    let (b, vspec) = self.vmm_spec(spec).await?;
                    b.create(vspec).await.map_err(|e| e.to_string())?;
                    info!("created");
                    backend = Some(b);
                }
                Action::Remove(_) => {
                    if let Some(b) = &backend {
                        b.delete(name).await.map_err(|e| e.to_string())?;
                        info!("removed");
                    }
                }
                other => {
                    let b = backend.as_ref().ok_or_else(|| format!("no backend has VM {name}"))?;
                    let r = match other {
                        Action::Start(_) => b.start(name).await,
                        Action::Stop(_) => b.stop(name, StopOptions::graceful(STOP_TIMEOUT)).await,
                        Action::Pause(_) => b.pause(name).await,
                        Action::Resume(_) => b.resume(name).await,
                        Action::Reboot(_) => b.reboot(name).await,
                        _ => continue,
                    };
                    let s = r.map_err(|e| e.to_string())?;
                    info!(state = %s.state, "done: {}", other.name());
                    if matches!(other, Action::Start(_) | Action::Reboot(_)) {
                        self.watch_ready(b.clone(), name, spec.as_ref(), s.console_bytes);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reports a booting guest ready the moment it is: waits for its console marker (or,
    /// without a health check, any console output), runs its checks at once, and wakes the
    /// loop, instead of leaving it to the next periodic health check.
    fn watch_ready(&self, b: Arc<dyn VmBackend>, name: &str, spec: Option<&blixard_types::vm::VmSpec>, from: u64) {
        let needle = match spec.and_then(|s| s.health.as_ref()) {
            Some(HealthCheck::Console(m)) => m.clone(),
            Some(_) => return,
            // Any output: the first newline will do.
            None => "\n".to_string(),
        };
        let (name, wake, metrics) = (name.to_string(), self.wake.clone(), self.ctx.metrics.clone());
        let started = std::time::Instant::now();
        tokio::spawn(
            async move {
                if b.wait_console(&name, &needle, from, READY_WATCH).await.is_ok() {
                    metrics.boot.observe(started.elapsed());
                    let _ = b.health(&name).await;
                    wake.notify_one();
                }
            }
            .instrument(info_span!("ready_watch")),
        );
    }

    /// The backend spec of a cluster VM, from its materialised image.
    async fn vmm_spec(&self, spec: &blixard_types::vm::VmSpec) -> Result<(Arc<dyn VmBackend>, blixard_vmm::VmSpec), String> {
        let (kind, _) = self.images.describe(&spec.image).await.map_err(|e| e.to_string())?;
        let backend = self.backends.for_kind(kind)?;
        let boot = match self.images.materialise(&spec.image).await.map_err(|e| e.to_string())? {
            Materialised::Bundle { kernel, initrd, disk, cmdline } => Boot::Bundle(Bundle {
                kernel,
                initrd: Some(initrd),
                // Shared by every VM of the image, so read-only (no per-VM overlay yet).
                root_disk: disk.map(|path| Disk { path, read_only: true }),
                cmdline,
            }),
            Materialised::NixStore { entry, .. } => {
                Boot::Runner(Runner { path: entry.into(), hypervisor: None, control_socket: None })
            }
            Materialised::StoreLayout { .. } => {
                return Err("this node has no Nix store to run a Nix-closure image from: install Nix (apt-get install nix-bin)".into())
            }
        };
        let mut v = blixard_vmm::VmSpec::new(spec.name.clone(), spec.vcpus, spec.memory_mib, boot);
        if let Some(HealthCheck::Console(marker)) = &spec.health {
            v.health.push(blixard_vmm::HealthCheck::ConsoleMarker { marker: marker.clone() });
        }
        Ok((backend, v))
    }
}

/// What the reconciler needs to know of a backend's VM. Without a health check, a running
/// VM is healthy once its console shows output.
fn observe(s: &VmStatus, check: Option<&HealthCheck>) -> Observed {
    let local = match s.state {
        LocalState::Created => Local::Created,
        LocalState::Starting => Local::Starting,
        LocalState::Running => Local::Running,
        LocalState::Paused => Local::Paused,
        LocalState::Stopping => Local::Stopping,
        LocalState::Stopped => Local::Stopped,
        LocalState::Failed => Local::Failed,
    };
    let healthy = match (&s.health, check) {
        (blixard_vmm::Health::Healthy, _) => Some(true),
        (blixard_vmm::Health::Unhealthy { .. }, _) => Some(false),
        (blixard_vmm::Health::Unknown, None) if s.state == LocalState::Running && s.console_bytes > 0 => Some(true),
        (blixard_vmm::Health::Unknown, _) => None,
    };
    Observed { local: Some(local), healthy, error: s.last_error.clone() }
}
