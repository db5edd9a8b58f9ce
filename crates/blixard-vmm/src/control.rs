//! Hypervisor control through its control socket: QMP for qemu, the REST APIs of
//! Cloud Hypervisor and Firecracker over unix sockets.
//!
//! Cloud Hypervisor (`docs/api.md`, `vmm/src/api/openapi/cloud-hypervisor.yaml`):
//! `PUT /api/v1/vm.pause|vm.resume|vm.reboot|vm.power-button|vm.shutdown|vmm.shutdown`,
//! `GET /api/v1/vm.info` → `{"state": "Created|Running|Shutdown|Paused", ...}`.
//! Firecracker (`src/firecracker/swagger/firecracker.yaml`): `PATCH /vm {"state":
//! "Paused"|"Resumed"}`, `PUT /actions {"action_type": "SendCtrlAltDel"}`, `GET /` →
//! `{"state": "Not started|Running|Paused", ...}`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::net::UnixStream;

use crate::error::ControlError;
use crate::http::{self, HttpError, HttpResponse};
use crate::qmp::QmpClient;
use crate::spec::Hypervisor;
use crate::Accel;

/// How long one control request may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// A hypervisor control endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// Which API the socket speaks.
    pub hypervisor: Hypervisor,
    /// The unix socket.
    pub socket: PathBuf,
}

/// What the hypervisor says about the VM's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Executing guest code.
    Running,
    /// Paused.
    Paused,
    /// Anything else (created, shut down, ...).
    Other,
}

impl Control {
    /// Pause the guest's vcpus.
    pub async fn pause(&self) -> Result<(), ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => self.qmp("stop").await,
            Hypervisor::CloudHypervisor => self.ch_put("vm.pause").await,
            Hypervisor::Firecracker => self.fc_vm_state("Paused").await,
            Hypervisor::Other => self.unsupported("pause"),
        }
    }

    /// Resume the guest's vcpus.
    pub async fn resume(&self) -> Result<(), ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => self.qmp("cont").await,
            Hypervisor::CloudHypervisor => self.ch_put("vm.resume").await,
            Hypervisor::Firecracker => self.fc_vm_state("Resumed").await,
            Hypervisor::Other => self.unsupported("resume"),
        }
    }

    /// Reset the guest (a hard reboot).
    pub async fn reboot(&self) -> Result<(), ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => self.qmp_reset().await,
            Hypervisor::CloudHypervisor => self.ch_put("vm.reboot").await,
            // Firecracker has no reset; Ctrl+Alt+Del makes a Linux guest reboot, which
            // Firecracker turns into an exit of the VMM (documented in docs/vmm.md).
            Hypervisor::Firecracker => self.fc_ctrl_alt_del().await,
            Hypervisor::Other => self.unsupported("reboot"),
        }
    }

    /// Ask the guest to power off (ACPI power button / Ctrl+Alt+Del).
    pub async fn powerdown(&self) -> Result<(), ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => self.qmp("system_powerdown").await,
            Hypervisor::CloudHypervisor => self.ch_put("vm.power-button").await,
            Hypervisor::Firecracker => self.fc_ctrl_alt_del().await,
            Hypervisor::Other => self.unsupported("powerdown"),
        }
    }

    /// Ask the hypervisor process to exit at once.
    pub async fn quit(&self) -> Result<(), ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => self.qmp("quit").await,
            Hypervisor::CloudHypervisor => self.ch_put("vmm.shutdown").await,
            Hypervisor::Firecracker | Hypervisor::Other => self.unsupported("quit"),
        }
    }

    /// The run state as the hypervisor reports it.
    pub async fn run_state(&self) -> Result<RunState, ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => {
                let mut c = QmpClient::connect(&self.socket, CONTROL_TIMEOUT).await?;
                let (running, status) = c.query_status().await?;
                Ok(match (running, status.as_str()) {
                    (true, _) => RunState::Running,
                    (false, "paused") => RunState::Paused,
                    _ => RunState::Other,
                })
            }
            Hypervisor::CloudHypervisor => {
                let r = self.http("GET", "/api/v1/vm.info", None).await?;
                Ok(parse_state(
                    &r.body,
                    &[("Running", RunState::Running), ("Paused", RunState::Paused)],
                ))
            }
            Hypervisor::Firecracker => {
                let r = self.http("GET", "/", None).await?;
                Ok(parse_state(
                    &r.body,
                    &[("Running", RunState::Running), ("Paused", RunState::Paused)],
                ))
            }
            Hypervisor::Other => self.unsupported("status"),
        }
    }

    /// Whether the guest runs under KVM (qemu only: `query-kvm`).
    pub async fn accelerator(&self) -> Result<Option<Accel>, ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => {
                let mut c = QmpClient::connect(&self.socket, CONTROL_TIMEOUT).await?;
                let v = c.execute("query-kvm", None).await?;
                let kvm = v.get("enabled").and_then(Value::as_bool).unwrap_or(false);
                Ok(Some(if kvm { Accel::Kvm } else { Accel::Tcg }))
            }
            // Both always run under KVM.
            Hypervisor::CloudHypervisor | Hypervisor::Firecracker => Ok(Some(Accel::Kvm)),
            Hypervisor::Other => Ok(None),
        }
    }

    /// Whether the control socket answers (used to wait for readiness after launch).
    pub async fn ping(&self) -> Result<(), ControlError> {
        match self.hypervisor {
            Hypervisor::Qemu => QmpClient::connect(&self.socket, CONTROL_TIMEOUT)
                .await
                .map(drop),
            Hypervisor::CloudHypervisor => {
                self.http("GET", "/api/v1/vmm.ping", None).await.map(drop)
            }
            Hypervisor::Firecracker => self.http("GET", "/", None).await.map(drop),
            Hypervisor::Other => Ok(()),
        }
    }

    fn unsupported<T>(&self, op: &'static str) -> Result<T, ControlError> {
        Err(ControlError::Unsupported {
            hypervisor: self.hypervisor.to_string(),
            op,
        })
    }

    async fn qmp(&self, command: &str) -> Result<(), ControlError> {
        let mut c = QmpClient::connect(&self.socket, CONTROL_TIMEOUT).await?;
        match c.execute(command, None).await {
            Ok(_) => Ok(()),
            // `quit` may close the socket before the reply arrives.
            Err(ControlError::Protocol(_)) if command == "quit" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `system_reset` on a qemu started with `-no-reboot` (as microvm.nix runners and our
    /// qemu backend are) would make qemu exit: switch the reboot action to `reset` for the
    /// duration of the reset, then back to `shutdown`.
    async fn qmp_reset(&self) -> Result<(), ControlError> {
        let mut c = QmpClient::connect(&self.socket, CONTROL_TIMEOUT).await?;
        let set = |action: &str| Some(serde_json::json!({ "reboot": action }));
        let switched = c.execute("set-action", set("reset")).await.is_ok();
        c.execute("system_reset", None).await?;
        if switched {
            c.wait_event("RESET").await?;
            c.execute("set-action", set("shutdown")).await?;
        }
        Ok(())
    }

    async fn ch_put(&self, action: &str) -> Result<(), ControlError> {
        self.http("PUT", &format!("/api/v1/{action}"), None)
            .await
            .map(drop)
    }

    async fn fc_vm_state(&self, state: &str) -> Result<(), ControlError> {
        let body = serde_json::json!({ "state": state }).to_string();
        self.http("PATCH", "/vm", Some(&body)).await.map(drop)
    }

    async fn fc_ctrl_alt_del(&self) -> Result<(), ControlError> {
        let body = serde_json::json!({ "action_type": "SendCtrlAltDel" }).to_string();
        self.http("PUT", "/actions", Some(&body)).await.map(drop)
    }

    async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<HttpResponse, ControlError> {
        unix_http(&self.socket, method, path, body).await
    }
}

/// One HTTP request over a unix socket; non-2xx answers become [`ControlError::Http`].
pub async fn unix_http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse, ControlError> {
    let mut s = tokio::time::timeout(CONTROL_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| ControlError::Timeout {
            what: "connect".into(),
            after: CONTROL_TIMEOUT,
        })?
        .map_err(|source| ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let resp = http::request(
        &mut s,
        method,
        "localhost",
        path,
        body,
        false,
        CONTROL_TIMEOUT,
    )
    .await
    .map_err(|e| match e {
        HttpError::Io(e) => ControlError::Io(e),
        HttpError::Parse(e) => ControlError::Protocol(e.to_string()),
        HttpError::Timeout(after) => ControlError::Timeout {
            what: format!("{method} {path}"),
            after,
        },
    })?;
    if !(200..300).contains(&resp.status) {
        return Err(ControlError::Http {
            method: method.to_string(),
            path: path.to_string(),
            status: resp.status,
            body: String::from_utf8_lossy(&resp.body)
                .chars()
                .take(300)
                .collect(),
        });
    }
    Ok(resp)
}

fn parse_state(body: &[u8], map: &[(&str, RunState)]) -> RunState {
    let state = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("state").and_then(Value::as_str).map(str::to_string));
    match state {
        Some(s) => map
            .iter()
            .find(|(k, _)| *k == s)
            .map(|(_, v)| *v)
            .unwrap_or(RunState::Other),
        None => RunState::Other,
    }
}

#[cfg(test)]
mod tests {
    //! Cloud Hypervisor and Firecracker are not packaged for Debian 12 and need working KVM,
    //! so their clients are tested against a fake unix-socket HTTP server that checks the
    //! request line, headers and body, and answers like the real APIs do.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// Serve `answers.len()` connections; return the raw requests.
    fn fake_server(path: &Path, answers: Vec<String>) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then Content-Length bytes of body.
                loop {
                    let n = s.read(&mut chunk).await.expect("read");
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let cl = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + cl {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                seen.push(String::from_utf8_lossy(&buf).to_string());
                s.write_all(answer.as_bytes()).await.expect("write");
                // Keep the connection open like micro_http does: the client must stop
                // reading on Content-Length, not on EOF.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    }

    fn no_content() -> String {
        "HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
            .to_string()
    }

    fn json(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn cloud_hypervisor_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("ch.sock");
        let info = json(
            "200 OK",
            r#"{"config":{"cpus":{"boot_vcpus":1}},"state":"Paused","memory_actual_size":268435456}"#,
        );
        let server = fake_server(
            &sock,
            vec![
                no_content(),
                no_content(),
                no_content(),
                no_content(),
                no_content(),
                info,
                json("500 Internal Server Error", r#"{"error":"VmNotBooted"}"#),
            ],
        );
        let c = Control {
            hypervisor: Hypervisor::CloudHypervisor,
            socket: sock.clone(),
        };
        c.pause().await.expect("pause");
        c.resume().await.expect("resume");
        c.reboot().await.expect("reboot");
        c.powerdown().await.expect("power button");
        c.quit().await.expect("vmm.shutdown");
        assert_eq!(c.run_state().await.expect("info"), RunState::Paused);
        let err = c.pause().await.expect_err("500");
        assert!(
            matches!(err, ControlError::Http { status: 500, .. }),
            "{err}"
        );
        let seen = server.await.expect("server");
        let lines: Vec<&str> = seen
            .iter()
            .map(|r| r.lines().next().unwrap_or(""))
            .collect();
        assert_eq!(
            lines,
            vec![
                "PUT /api/v1/vm.pause HTTP/1.1",
                "PUT /api/v1/vm.resume HTTP/1.1",
                "PUT /api/v1/vm.reboot HTTP/1.1",
                "PUT /api/v1/vm.power-button HTTP/1.1",
                "PUT /api/v1/vmm.shutdown HTTP/1.1",
                "GET /api/v1/vm.info HTTP/1.1",
                "PUT /api/v1/vm.pause HTTP/1.1",
            ]
        );
        assert!(seen[0].contains("Host: localhost\r\n"));
        assert!(seen[0].contains("Content-Length: 0\r\n"));
    }

    #[tokio::test]
    async fn firecracker_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("fc.sock");
        let info = json(
            "200 ",
            r#"{"id":"anonymous-instance","state":"Running","vmm_version":"1.7.0","app_name":"Firecracker"}"#,
        );
        let bad = json(
            "400 ",
            r#"{"fault_message":"The requested operation is not supported in the current VM state."}"#,
        );
        let server = fake_server(
            &sock,
            vec![no_content(), no_content(), no_content(), info, bad],
        );
        let c = Control {
            hypervisor: Hypervisor::Firecracker,
            socket: sock.clone(),
        };
        c.pause().await.expect("pause");
        c.resume().await.expect("resume");
        c.powerdown().await.expect("ctrl-alt-del");
        assert_eq!(c.run_state().await.expect("info"), RunState::Running);
        let err = c.pause().await.expect_err("400");
        assert!(
            matches!(err, ControlError::Http { status: 400, .. }),
            "{err}"
        );
        assert!(c.quit().await.is_err(), "firecracker has no quit");
        let seen = server.await.expect("server");
        assert!(seen[0].starts_with("PATCH /vm HTTP/1.1\r\n"));
        assert!(
            seen[0].ends_with("\r\n\r\n{\"state\":\"Paused\"}"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("Content-Type: application/json\r\n"));
        assert!(seen[0].contains("Content-Length: 18\r\n"));
        assert!(seen[1].ends_with("{\"state\":\"Resumed\"}"));
        assert!(seen[2].starts_with("PUT /actions HTTP/1.1\r\n"));
        assert!(seen[2].ends_with("{\"action_type\":\"SendCtrlAltDel\"}"));
        assert!(seen[3].starts_with("GET / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let c = Control {
            hypervisor: Hypervisor::CloudHypervisor,
            socket: "/nonexistent/blixard.sock".into(),
        };
        assert!(matches!(c.pause().await, Err(ControlError::Connect { .. })));
        let o = Control {
            hypervisor: Hypervisor::Other,
            socket: "/x".into(),
        };
        assert!(matches!(
            o.pause().await,
            Err(ControlError::Unsupported { .. })
        ));
    }
}
