//! Real guests under qemu (KVM where it works, TCG here): the test guest from
//! `images/test-guest` booted through each backend.
//!
//! Missing prerequisites (qemu, the Debian kernel, busybox-static, root for networking)
//! print `SKIP ...`; with `BLIXARD_REQUIRE_REAL=1` they fail the test instead.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_vmm::control::{Control, RunState};
use blixard_vmm::*;
use common::*;

async fn qemu_backend(data: &Path, network: Option<NetworkConfig>) -> Arc<dyn VmBackend> {
    let mut cfg = config(data);
    cfg.network = network;
    let b = QemuBackend::open(cfg, QemuOptions::default())
        .await
        .expect("open qemu backend");
    say(format!("qemu backend accelerator: {}", b.accelerator()));
    Arc::new(b)
}

async fn microvm_backend(data: &Path, network: Option<NetworkConfig>) -> Arc<dyn VmBackend> {
    let mut cfg = config(data);
    cfg.network = network;
    Arc::new(
        MicrovmBackend::open(cfg)
            .await
            .expect("open microvm backend"),
    )
}

/// The full lifecycle, identical for both backends.
async fn lifecycle(test: &str, b: Arc<dyn VmBackend>, data: &Path, spec: VmSpec) {
    let name = spec.name.clone();
    b.create(spec.clone()).await.expect("create");
    b.create(spec.clone()).await.expect("create is idempotent");

    // Start and wait for the readiness marker.
    let t0 = Instant::now();
    let st = b.start(&name).await.expect("start");
    assert_eq!(st.state, VmState::Running);
    let pid = st.pid.expect("pid");
    assert_eq!(
        b.start(&name).await.expect("start is idempotent").pid,
        Some(pid)
    );
    b.wait_console(&name, READY, 0, BOOT_TIMEOUT)
        .await
        .expect("readiness marker");
    let st = b.status(&name).await.expect("status");
    say(format!(
        "{test}: accelerator={:?} hypervisor={:?} start->marker {:?}",
        st.accelerator,
        st.hypervisor,
        t0.elapsed()
    ));
    assert!(st.accelerator.is_some(), "accelerator reported");
    assert_eq!(
        b.usage(),
        Usage {
            vcpus: 1,
            memory_mib: 256
        }
    );
    let socket = st.control_socket.clone().expect("control socket");
    let control = Control {
        hypervisor: Hypervisor::Qemu,
        socket: socket.clone(),
    };
    wait_status(&*b, &name, Duration::from_secs(10), |s| {
        s.health == Health::Healthy
    })
    .await;

    // Pause: the guest makes no progress (no ticks), qemu says paused.
    b.pause(&name).await.expect("pause");
    assert_eq!(
        b.pause(&name).await.expect("pause is idempotent").state,
        VmState::Paused
    );
    assert_eq!(
        control.run_state().await.expect("query-status"),
        RunState::Paused
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = b.status(&name).await.expect("status").console_bytes;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = b.status(&name).await.expect("status").console_bytes;
    assert_eq!(before, after, "console output while paused");
    b.resume(&name).await.expect("resume");
    assert_eq!(
        control.run_state().await.expect("query-status"),
        RunState::Running
    );
    b.wait_console(&name, "BLIXARD-TICK", after, Duration::from_secs(15))
        .await
        .expect("ticks again after resume");

    // Reboot: the marker appears again.
    let st = b.status(&name).await.expect("status");
    let t0 = Instant::now();
    b.reboot(&name).await.expect("reboot");
    b.wait_console(&name, READY, st.console_bytes, BOOT_TIMEOUT)
        .await
        .expect("marker after reboot");
    say(format!("{test}: reboot->marker {:?}", t0.elapsed()));
    assert_eq!(b.status(&name).await.expect("status").boots, st.boots + 1);

    // Graceful stop (ACPI power button / microvm-shutdown).
    let t0 = Instant::now();
    let st = b
        .stop(&name, StopOptions::graceful(Duration::from_secs(30)))
        .await
        .expect("stop");
    say(format!("{test}: graceful stop took {:?}", t0.elapsed()));
    assert_eq!(st.state, VmState::Stopped);
    assert_eq!(st.last_stop, Some(StopKind::Graceful));
    assert!(!pid_alive(pid));
    assert!(!socket.exists(), "control socket removed");
    assert_eq!(b.usage(), Usage::default(), "resources released on stop");
    let console = b.console_log(&name, 0, 1 << 20).await.expect("console");
    assert!(
        String::from_utf8_lossy(&console.data).contains("BLIXARD-GUEST-POWERDOWN"),
        "guest saw the power button"
    );
    b.stop(&name, StopOptions::forced())
        .await
        .expect("stop is idempotent");

    // Start again, then kill the hypervisor from outside: the VM is failed.
    let st = b.start(&name).await.expect("restart");
    let pid2 = st.pid.expect("pid");
    b.wait_console(&name, READY, st.console_bytes, BOOT_TIMEOUT)
        .await
        .expect("marker after restart");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid2.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let st = wait_status(&*b, &name, Duration::from_secs(10), |s| {
        s.state == VmState::Failed
    })
    .await;
    say(format!(
        "{test}: after external kill: {:?} / {:?}",
        st.state, st.last_error
    ));
    assert!(
        st.last_error.as_deref().unwrap_or("").contains("signal 9"),
        "{st:?}"
    );
    assert_eq!(b.usage(), Usage::default(), "resources released on failure");

    // Delete: nothing remains.
    b.delete(&name).await.expect("delete");
    b.delete(&name).await.expect("delete is idempotent");
    assert!(matches!(
        b.status(&name).await,
        Err(VmError::NotFound { .. })
    ));
    assert_no_leftovers(data, &name, Some(pid2), &[]);
}

async fn forced_stop(test: &str, b: Arc<dyn VmBackend>, data: &Path, spec: VmSpec) {
    let name = spec.name.clone();
    b.create(spec).await.expect("create");
    let st = b.start(&name).await.expect("start");
    let pid = st.pid.expect("pid");
    b.wait_console(&name, READY, 0, BOOT_TIMEOUT)
        .await
        .expect("marker");
    let console = b.console_log(&name, 0, 1 << 20).await.expect("console");
    assert!(String::from_utf8_lossy(&console.data).contains("BLIXARD-GUEST-IGNORES-POWERDOWN"));
    let t0 = Instant::now();
    let st = b
        .stop(&name, StopOptions::graceful(Duration::from_secs(3)))
        .await
        .expect("stop");
    let took = t0.elapsed();
    say(format!(
        "{test}: stop of a guest ignoring the power button took {took:?} ({:?})",
        st.last_stop
    ));
    assert_eq!(st.state, VmState::Stopped);
    assert_eq!(st.last_stop, Some(StopKind::Forced));
    assert!(took >= Duration::from_secs(3));
    assert!(!pid_alive(pid));
    b.delete(&name).await.expect("delete");
    assert_no_leftovers(data, &name, Some(pid), &[]);
}

fn guest_or_skip(test: &str) -> Option<Guest> {
    match guest() {
        Ok(g) => Some(g),
        Err(e) => {
            skip(test, &e);
            None
        }
    }
}

fn health_marker() -> Vec<HealthCheck> {
    vec![HealthCheck::ConsoleMarker {
        marker: READY.into(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_bundle_lifecycle() {
    init_tracing();
    let Some(g) = guest_or_skip("qemu_bundle_lifecycle") else {
        return;
    };
    let data = Janitor::new();
    let b = qemu_backend(data.path(), None).await;
    let mut spec = VmSpec::new("life", 1, 256, Boot::Bundle(g.bundle()));
    spec.health = health_marker();
    lifecycle("qemu_bundle_lifecycle", b, data.path(), spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_runner_lifecycle() {
    init_tracing();
    let Some(g) = guest_or_skip("microvm_runner_lifecycle") else {
        return;
    };
    let data = Janitor::new();
    let b = microvm_backend(data.path(), None).await;
    let mut spec = VmSpec::new("life", 1, 256, Boot::Runner(g.runner("runner")));
    spec.health = health_marker();
    lifecycle("microvm_runner_lifecycle", b, data.path(), spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_forced_stop_when_guest_ignores_powerdown() {
    init_tracing();
    let Some(g) = guest_or_skip("qemu_forced_stop_when_guest_ignores_powerdown") else {
        return;
    };
    let data = Janitor::new();
    let b = qemu_backend(data.path(), None).await;
    let mut bundle = g.bundle();
    bundle.cmdline.push_str(" blixard.ignore_powerdown=1");
    let spec = VmSpec::new("stubborn", 1, 256, Boot::Bundle(bundle));
    forced_stop("qemu_forced_stop", b, data.path(), spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_forced_stop_when_guest_ignores_powerdown() {
    init_tracing();
    let Some(g) = guest_or_skip("microvm_forced_stop_when_guest_ignores_powerdown") else {
        return;
    };
    let data = Janitor::new();
    let b = microvm_backend(data.path(), None).await;
    let spec = VmSpec::new(
        "stubborn",
        1,
        256,
        Boot::Runner(g.runner("runner-stubborn")),
    );
    forced_stop("microvm_forced_stop", b, data.path(), spec).await;
}

/// A qemu that cannot load its kernel: clear error, state failed, nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_with_a_broken_kernel_fails_cleanly() {
    init_tracing();
    let Some(g) = guest_or_skip("qemu_with_a_broken_kernel_fails_cleanly") else {
        return;
    };
    let data = Janitor::new();
    let b = qemu_backend(data.path(), None).await;
    let bogus = data.path().join("not-a-kernel");
    std::fs::write(&bogus, "definitely not a kernel").expect("write");
    let mut bundle = g.bundle();
    bundle.kernel = bogus;
    b.create(VmSpec::new("broken", 1, 256, Boot::Bundle(bundle)))
        .await
        .expect("create");
    let err = b.start("broken").await.expect_err("must fail");
    say(format!("broken kernel: {err}"));
    assert!(matches!(err, VmError::EarlyExit { .. }), "{err}");
    let st = b.status("broken").await.expect("status");
    assert_eq!(st.state, VmState::Failed);
    assert_eq!(b.usage(), Usage::default());
    let dir = data.path().join("vms/broken");
    assert!(!dir.join("control.sock").exists() && !dir.join("pid").exists());
    b.delete("broken").await.expect("delete");
    assert_no_leftovers(data.path(), "broken", None, &[]);
}

/// Two VMs on one bridge cannot reach each other when isolated (the default); a
/// non-isolated pair can; the host reaches both (TCP and HTTP health checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networking_isolates_vms_by_default() {
    init_tracing();
    let test = "networking_isolates_vms_by_default";
    let Some(g) = guest_or_skip(test) else { return };
    if let Err(e) = net_capable() {
        skip(test, &e);
        return;
    }
    let mut data = Janitor::new();
    let tag = std::process::id() % 10_000;
    let net = NetworkConfig {
        bridge: format!("bxbrq{tag}"),
        pool: "10.213.7.0/24".into(),
        nft_table: format!("blixard_test_q{tag}"),
    };
    data.bridges.push(net.bridge.clone());
    data.tables.push(net.nft_table.clone());
    let b = qemu_backend(data.path(), Some(net.clone())).await;
    let checks = |ip_port: u16| {
        vec![
            HealthCheck::ConsoleMarker {
                marker: READY.into(),
            },
            HealthCheck::Tcp {
                host: None,
                port: ip_port,
            },
            HealthCheck::Http {
                host: None,
                port: ip_port,
                path: "/index.html".into(),
                expect_status: None,
            },
        ]
    };
    // A: the server, not isolated.
    let mut a = VmSpec::new("server", 1, 256, Boot::Bundle(g.bundle()));
    a.network = Some(NetworkRequest { isolated: false });
    a.health = checks(8080);
    let a_st = b.create(a).await.expect("create a");
    let a_ip = a_st.network.as_ref().expect("net").ip;
    // B: isolated (default), probes A. C: not isolated, probes A.
    let mut bs = VmSpec::new("isolated", 1, 256, Boot::Bundle(g.bundle()));
    if let Boot::Bundle(bb) = &mut bs.boot {
        bb.cmdline.push_str(&format!(" blixard.probe={a_ip}:8080"));
    }
    bs.network = Some(NetworkRequest::default());
    bs.health = checks(8080);
    let mut cs = bs.clone();
    cs.name = "open".into();
    cs.network = Some(NetworkRequest { isolated: false });
    b.create(bs).await.expect("create b");
    b.create(cs).await.expect("create c");
    let (ra, rb, rc) = tokio::join!(b.start("server"), b.start("isolated"), b.start("open"));
    let taps: Vec<String> = [ra, rb, rc]
        .into_iter()
        .map(|r| r.expect("start"))
        .flat_map(|s| s.network.map(|n| n.taps).unwrap_or_default())
        .collect();
    assert_eq!(taps.len(), 3);
    for t in &taps {
        assert!(link_exists(t), "tap {t} exists while running");
    }
    for n in ["server", "isolated", "open"] {
        b.wait_console(n, READY, 0, BOOT_TIMEOUT)
            .await
            .expect("marker");
    }
    // The host reaches every VM (HTTP + TCP health checks pass).
    for n in ["server", "isolated", "open"] {
        let st = wait_status(&*b, n, Duration::from_secs(20), |s| {
            s.health == Health::Healthy
        })
        .await;
        say(format!(
            "{test}: {n} at {:?} is healthy",
            st.network.map(|x| x.ip)
        ));
    }
    // C (both ends open) reaches A; B (isolated) does not.
    b.wait_console("open", "BLIXARD-PROBE-OK", 0, Duration::from_secs(30))
        .await
        .expect("non-isolated VMs reach each other");
    let fail_at = b
        .wait_console("isolated", "BLIXARD-PROBE-FAIL", 0, Duration::from_secs(30))
        .await
        .expect("isolated VM probes fail");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = b
        .console_log("isolated", 0, 1 << 20)
        .await
        .expect("console");
    let text = String::from_utf8_lossy(&log.data);
    assert!(
        !text.contains("BLIXARD-PROBE-OK"),
        "isolated VM reached another VM:\n{text}"
    );
    say(format!(
        "{test}: isolated probe failed as expected (first at offset {fail_at})"
    ));

    let leases = std::fs::read_to_string(data.path().join("net-leases.json")).expect("leases");
    assert!(leases.contains("server") && leases.contains("isolated"));
    for n in ["server", "isolated", "open"] {
        b.delete(n).await.expect("delete");
        assert_no_leftovers(data.path(), n, None, &[]);
    }
    for t in &taps {
        assert!(!link_exists(t), "tap {t} removed on delete");
    }
    let leases = std::fs::read_to_string(data.path().join("net-leases.json")).expect("leases");
    assert_eq!(leases.trim(), "{}", "leases released");
    let qb = QemuBackend::open(
        {
            let mut c = config(data.path());
            c.network = Some(net.clone());
            c
        },
        QemuOptions::default(),
    )
    .await
    .expect("reopen");
    qb.teardown_network().await;
    assert!(!link_exists(&net.bridge), "bridge removed by teardown");
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert!(!String::from_utf8_lossy(&tables.stdout).contains(&net.nft_table));
}

/// A microvm runner with a tap in `tap-interfaces`: the tap is created on the bridge before
/// start, the guest gets its address through the runner's environment, the host reaches
/// it, and the tap is gone after stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_runner_taps_and_network() {
    init_tracing();
    let test = "microvm_runner_taps_and_network";
    let Some(g) = guest_or_skip(test) else { return };
    if let Err(e) = net_capable() {
        skip(test, &e);
        return;
    }
    let mut data = Janitor::new();
    let tag = std::process::id() % 10_000;
    let net = NetworkConfig {
        bridge: format!("bxbrm{tag}"),
        pool: "10.213.8.0/24".into(),
        nft_table: format!("blixard_test_m{tag}"),
    };
    data.bridges.push(net.bridge.clone());
    data.tables.push(net.nft_table.clone());
    data.bridges.push("blxtg0".into());
    let b = MicrovmBackend::open({
        let mut c = config(data.path());
        c.network = Some(net);
        c
    })
    .await
    .expect("open");
    let mut spec = VmSpec::new("netvm", 1, 256, Boot::Runner(g.runner("runner-net")));
    spec.network = Some(NetworkRequest::default());
    spec.health = vec![HealthCheck::Http {
        host: None,
        port: 8080,
        path: "/".into(),
        expect_status: Some(200),
    }];
    b.create(spec).await.expect("create");
    let st = b.start("netvm").await.expect("start");
    assert!(link_exists("blxtg0"), "runner tap created");
    b.wait_console("netvm", READY, 0, BOOT_TIMEOUT)
        .await
        .expect("marker");
    let st2 = wait_status(&b, "netvm", Duration::from_secs(20), |s| {
        s.health == Health::Healthy
    })
    .await;
    say(format!(
        "{test}: runner VM at {:?} healthy over HTTP",
        st2.network.map(|n| n.ip)
    ));
    b.stop("netvm", StopOptions::graceful(Duration::from_secs(20)))
        .await
        .expect("stop");
    assert!(!link_exists("blxtg0"), "runner tap removed after stop");
    b.delete("netvm").await.expect("delete");
    assert_no_leftovers(data.path(), "netvm", st.pid, &["blxtg0".to_string()]);
    b.teardown_network().await;
}
