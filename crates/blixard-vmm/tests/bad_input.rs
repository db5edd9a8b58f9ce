//! Bad input and failure paths, with shell-script "runners" (no qemu needed): clear errors,
//! nothing left behind, resources rolled back, cancellation safe, bounded console, orphan
//! recovery.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blixard_vmm::*;
use common::*;

/// A runner dir whose `bin/microvm-run` is `body` (a /bin/sh script).
fn fake_runner(root: &Path, name: &str, body: &str, hypervisor: Option<&str>) -> Runner {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::create_dir_all(dir.join("share/microvm")).expect("mkdir");
    let run = dir.join("bin/microvm-run");
    std::fs::write(&run, format!("#!/bin/sh\n{body}\n")).expect("write");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    if let Some(h) = hypervisor {
        std::fs::write(dir.join("share/microvm/hypervisor"), h).expect("write");
    }
    Runner {
        path: dir,
        hypervisor: None,
        control_socket: None,
    }
}

fn vm_dir(data: &Path, name: &str) -> PathBuf {
    data.join("vms").join(name)
}

async fn microvm(data: &Path, capacity: Capacity) -> MicrovmBackend {
    let mut cfg = config(data);
    cfg.capacity = capacity;
    cfg.start_timeout = Duration::from_secs(2);
    MicrovmBackend::open(cfg).await.expect("open")
}

const CAP: Capacity = Capacity {
    vcpus: 2,
    memory_mib: 1024,
};

#[tokio::test]
async fn invalid_specs_are_rejected_and_leave_nothing() {
    init_tracing();
    let data = Janitor::new();
    let runners = tempfile::tempdir().expect("tempdir");
    let b = microvm(data.path(), CAP).await;
    let ok = fake_runner(runners.path(), "ok", "exec sleep 600", Some("crosvm"));
    let cases: Vec<(VmSpec, &str)> = vec![
        (
            VmSpec::new("../evil", 1, 64, Boot::Runner(ok.clone())),
            "invalid VM name",
        ),
        (
            VmSpec::new("a/b", 1, 64, Boot::Runner(ok.clone())),
            "path separator",
        ),
        (
            VmSpec::new("x".repeat(49), 1, 64, Boot::Runner(ok.clone())),
            "longer than",
        ),
        (
            VmSpec::new("zero", 0, 64, Boot::Runner(ok.clone())),
            "invalid vcpus 0",
        ),
        (
            VmSpec::new("many", 3, 64, Boot::Runner(ok.clone())),
            "invalid vcpus 3",
        ),
        (
            VmSpec::new("tiny", 1, 1, Boot::Runner(ok.clone())),
            "invalid memory 1 MiB",
        ),
        (
            VmSpec::new("huge", 1, 1 << 20, Boot::Runner(ok.clone())),
            "invalid memory",
        ),
        (
            VmSpec::new(
                "norunner",
                1,
                64,
                Boot::Runner(Runner {
                    path: runners.path().join("missing"),
                    hypervisor: None,
                    control_socket: None,
                }),
            ),
            "runner directory",
        ),
        (
            VmSpec::new(
                "notexec",
                1,
                64,
                Boot::Runner(Runner {
                    path: runners.path().to_path_buf(),
                    hypervisor: None,
                    control_socket: None,
                }),
            ),
            "bin/microvm-run",
        ),
        (
            VmSpec::new(
                "bundle",
                1,
                64,
                Boot::Bundle(Bundle {
                    kernel: "/k".into(),
                    initrd: None,
                    root_disk: None,
                    cmdline: String::new(),
                }),
            ),
            "use the qemu backend",
        ),
        (
            {
                let mut s = VmSpec::new("wantsnet", 1, 64, Boot::Runner(ok.clone()));
                s.network = Some(NetworkRequest::default());
                s
            },
            "no network configured",
        ),
    ];
    for (spec, want) in cases {
        let name = spec.name.clone();
        let err = b.create(spec).await.expect_err("must be rejected");
        let msg = err.to_string();
        eprintln!("rejected {name:?}: {msg}");
        assert!(msg.contains(want), "{msg:?} should mention {want:?}");
        assert!(matches!(err, VmError::Spec(_)), "{err:?}");
    }
    let left: Vec<_> = std::fs::read_dir(data.path().join("vms"))
        .expect("read")
        .collect();
    assert!(left.is_empty(), "nothing created: {left:?}");
    // Same name, different spec.
    b.create(VmSpec::new("dup", 1, 64, Boot::Runner(ok.clone())))
        .await
        .expect("create");
    let err = b
        .create(VmSpec::new("dup", 2, 64, Boot::Runner(ok)))
        .await
        .expect_err("different spec");
    assert!(matches!(err, VmError::AlreadyExists { .. }));
    assert!(matches!(
        b.start("nope").await,
        Err(VmError::NotFound { .. })
    ));
    assert!(matches!(
        b.pause("dup").await,
        Err(VmError::InvalidState { .. })
    ));
    assert!(matches!(
        b.reboot("dup").await,
        Err(VmError::InvalidState { .. })
    ));
    b.delete("dup").await.expect("delete");
    assert_no_leftovers(data.path(), "dup", None, &[]);
}

#[tokio::test]
async fn missing_qemu_binary_is_a_clear_error() {
    init_tracing();
    let data = Janitor::new();
    let kernel = data.path().join("kernel");
    std::fs::write(&kernel, "k").expect("write");
    let b = QemuBackend::open(
        config(data.path()),
        QemuOptions {
            qemu_binary: "/nonexistent/qemu-system-x86_64".into(),
            accel: AccelMode::Tcg,
        },
    )
    .await
    .expect("open");
    let spec = VmSpec::new(
        "q",
        1,
        64,
        Boot::Bundle(Bundle {
            kernel,
            initrd: None,
            root_disk: None,
            cmdline: "console=ttyS0".into(),
        }),
    );
    let err = b.create(spec).await.expect_err("no qemu");
    eprintln!("missing qemu: {err}");
    assert!(
        err.to_string().contains("apt-get install qemu-system-x86"),
        "{err}"
    );
    assert!(!vm_dir(data.path(), "q").exists());
}

#[tokio::test]
async fn runner_that_exits_at_once() {
    init_tracing();
    let data = Janitor::new();
    let runners = tempfile::tempdir().expect("tempdir");
    let b = microvm(data.path(), CAP).await;
    let r = fake_runner(
        runners.path(),
        "dies",
        "echo 'qemu-system-x86_64: boom: cannot open kernel' >&2; exit 3",
        Some("qemu"),
    );
    b.create(VmSpec::new("dies", 1, 128, Boot::Runner(r)))
        .await
        .expect("create");
    let err = b.start("dies").await.expect_err("exits at once");
    eprintln!("runner exits at once: {err}");
    match &err {
        VmError::EarlyExit {
            exit, console_tail, ..
        } => {
            assert!(exit.contains("code 3"), "{exit}");
            assert!(console_tail.contains("boom"), "{console_tail}");
        }
        other => panic!("{other:?}"),
    }
    let st = b.status("dies").await.expect("status");
    assert_eq!(st.state, VmState::Failed);
    assert!(st.last_error.is_some());
    assert_eq!(b.usage(), Usage::default(), "reservation rolled back");
    let dir = vm_dir(data.path(), "dies");
    assert!(!dir.join("pid").exists());
    b.delete("dies").await.expect("delete");
    assert_no_leftovers(data.path(), "dies", None, &[]);
}

#[tokio::test]
async fn start_timeout_and_cancellation_leave_nothing() {
    init_tracing();
    let data = Janitor::new();
    let runners = tempfile::tempdir().expect("tempdir");
    let b = microvm(data.path(), CAP).await;
    let pidfile = runners.path().join("hung.pid");
    // Claims to be qemu but never opens a control socket.
    let r = fake_runner(
        runners.path(),
        "hung",
        &format!("echo $$ > {}\nexec sleep 600", pidfile.display()),
        Some("qemu"),
    );
    b.create(VmSpec::new("hung", 1, 128, Boot::Runner(r)))
        .await
        .expect("create");
    let err = b.start("hung").await.expect_err("socket never answers");
    eprintln!("hung runner: {err}");
    assert!(matches!(err, VmError::Timeout { .. }), "{err}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(!pid_alive(pid), "hung runner killed");
    assert_eq!(b.usage(), Usage::default());

    // Cancel a start half-way: the operation runs to completion on its own task, so the
    // VM ends up failed and cleaned up, not half-started.
    std::fs::remove_file(&pidfile).expect("rm");
    let cancelled = tokio::time::timeout(Duration::from_millis(300), b.start("hung")).await;
    assert!(cancelled.is_err(), "start was cancelled");
    let st = wait_status(&b, "hung", Duration::from_secs(10), |s| {
        s.state == VmState::Failed
    })
    .await;
    assert!(st.pid.is_none());
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(!pid_alive(pid), "runner of the cancelled start killed");
    assert_eq!(b.usage(), Usage::default());
    b.delete("hung").await.expect("delete");
    assert_no_leftovers(data.path(), "hung", Some(pid), &[]);
}

#[tokio::test]
async fn resources_are_reserved_and_released() {
    init_tracing();
    let data = Janitor::new();
    let runners = tempfile::tempdir().expect("tempdir");
    let b = microvm(
        data.path(),
        Capacity {
            vcpus: 1,
            memory_mib: 512,
        },
    )
    .await;
    let r = fake_runner(runners.path(), "sleeper", "exec sleep 600", Some("crosvm"));
    b.create(VmSpec::new("a", 1, 256, Boot::Runner(r.clone())))
        .await
        .expect("create");
    b.create(VmSpec::new("b", 1, 256, Boot::Runner(r)))
        .await
        .expect("create");
    let sa = b.start("a").await.expect("start a");
    assert_eq!(sa.hypervisor, Some(Hypervisor::Other));
    assert_eq!(
        b.usage(),
        Usage {
            vcpus: 1,
            memory_mib: 256
        }
    );
    let err = b.start("b").await.expect_err("no room");
    eprintln!("second VM: {err}");
    assert!(matches!(err, VmError::Resources(_)));
    assert_eq!(b.status("b").await.expect("status").state, VmState::Created);
    let st = b.stop("a", StopOptions::forced()).await.expect("stop");
    assert_eq!(st.last_stop, Some(StopKind::Forced));
    assert_eq!(b.usage(), Usage::default());
    b.start("b").await.expect("room now");
    assert_eq!(
        b.usage(),
        Usage {
            vcpus: 1,
            memory_mib: 256
        }
    );
    b.start("a").await.expect_err("still no room");
    assert_eq!(b.usage().vcpus, 1, "a failed start reserves nothing");
    // Graceful stop of a runner without microvm-shutdown or control API: there is no way
    // to ask, so it is killed.
    let st = b
        .stop("b", StopOptions::graceful(Duration::from_millis(300)))
        .await
        .expect("stop");
    assert_eq!(st.last_stop, Some(StopKind::Forced));
    for n in ["a", "b"] {
        b.delete(n).await.expect("delete");
        assert_no_leftovers(data.path(), n, sa.pid, &[]);
    }
}

#[tokio::test]
async fn console_log_is_bounded_and_followable() {
    init_tracing();
    let data = Janitor::new();
    let runners = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(data.path());
    cfg.console_max_bytes = 64 * 1024;
    let b = MicrovmBackend::open(cfg).await.expect("open");
    let r = fake_runner(
        runners.path(),
        "chatty",
        "i=0; while [ $i -lt 20000 ]; do echo \"line $i of console output\"; i=$((i+1)); done; echo CHATTY-DONE; exec sleep 600",
        Some("crosvm"),
    );
    b.create(VmSpec::new("chatty", 1, 64, Boot::Runner(r)))
        .await
        .expect("create");
    b.start("chatty").await.expect("start");
    let end = b
        .wait_console("chatty", "CHATTY-DONE", 0, Duration::from_secs(30))
        .await
        .expect("done");
    assert!(end > 400_000, "{end}");
    let dir = vm_dir(data.path(), "chatty");
    for f in ["console.log", "console.log.1"] {
        let len = std::fs::metadata(dir.join(f)).expect("log").len();
        assert!(len <= 64 * 1024, "{f} is {len} bytes");
    }
    let chunk = b.console_log("chatty", 0, 1 << 20).await.expect("log");
    assert!(chunk.skipped > 0 && chunk.start == chunk.skipped);
    assert!(chunk.data.len() <= 128 * 1024);
    assert_eq!(
        chunk.next,
        end + 1,
        "wait_console returns the offset just after the needle"
    );
    let tail = b.console_log("chatty", end - 11, 100).await.expect("log");
    assert_eq!(tail.data, b"CHATTY-DONE\n");
    b.delete("chatty").await.expect("delete");
    assert_no_leftovers(data.path(), "chatty", None, &[]);
}

#[tokio::test]
async fn orphaned_hypervisors_are_stopped_on_open() {
    init_tracing();
    let data = Janitor::new();
    let runners = tempfile::tempdir().expect("tempdir");
    let r = fake_runner(runners.path(), "sleeper", "exec sleep 600", Some("crosvm"));
    let pid = {
        let b = microvm(data.path(), CAP).await;
        b.create(VmSpec::new("orphan", 1, 64, Boot::Runner(r)))
            .await
            .expect("create");
        b.start("orphan").await.expect("start").pid.expect("pid")
        // The backend is dropped here with its VM running (a node crash, in effect).
    };
    assert!(pid_alive(pid));
    let b = microvm(data.path(), CAP).await;
    let st = b.status("orphan").await.expect("recovered record");
    eprintln!("recovered: {:?} {:?}", st.state, st.last_error);
    assert_eq!(st.state, VmState::Stopped);
    assert!(st.last_error.is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pid_alive(pid), "orphan killed");
    let st = b.start("orphan").await.expect("restart after recovery");
    let stopped = b.stop_all(StopOptions::forced()).await;
    assert_eq!(stopped.len(), 1);
    assert!(!pid_alive(st.pid.expect("pid")), "stop_all stopped it");
    b.delete("orphan").await.expect("delete");
    assert_no_leftovers(data.path(), "orphan", None, &[]);
}
