//! Health checks: console marker, TCP connect, HTTP GET.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::console::Console;
use crate::spec::HealthCheck;

/// How long one network check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A VM's health as last observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "health")]
pub enum Health {
    /// No checks configured, or not checked since the last (re)boot.
    Unknown,
    /// Every check passed.
    Healthy,
    /// At least one check failed.
    Unhealthy {
        /// The first failure.
        last_error: String,
    },
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check.
    pub check: HealthCheck,
    /// Passed?
    pub ok: bool,
    /// What was observed.
    pub detail: String,
}

/// The result of running all checks of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Overall.
    pub health: Health,
    /// Per check.
    pub checks: Vec<CheckResult>,
}

/// Run `checks`. `vm_ip` is the default host; `boot_offset` is where the current boot's
/// console output starts.
pub async fn run_checks(
    checks: &[HealthCheck],
    vm_ip: Option<IpAddr>,
    console: &Console,
    boot_offset: u64,
) -> HealthReport {
    let mut results = Vec::new();
    for check in checks {
        let (ok, detail) = run_one(check, vm_ip, console, boot_offset).await;
        results.push(CheckResult {
            check: check.clone(),
            ok,
            detail,
        });
    }
    let health = if results.is_empty() {
        Health::Unknown
    } else if let Some(bad) = results.iter().find(|r| !r.ok) {
        Health::Unhealthy {
            last_error: bad.detail.clone(),
        }
    } else {
        Health::Healthy
    };
    HealthReport {
        health,
        checks: results,
    }
}

async fn run_one(
    check: &HealthCheck,
    vm_ip: Option<IpAddr>,
    console: &Console,
    boot_offset: u64,
) -> (bool, String) {
    match check {
        HealthCheck::ConsoleMarker { marker } => {
            if console.contains_since(boot_offset, marker).await {
                (true, format!("console marker {marker:?} seen"))
            } else {
                (
                    false,
                    format!("console marker {marker:?} not seen since boot"),
                )
            }
        }
        HealthCheck::Tcp { host, port } => {
            let Some(ip) = host.or(vm_ip) else {
                return (
                    false,
                    "tcp check: the VM has no address; set host or give the VM a network".into(),
                );
            };
            let addr = SocketAddr::new(ip, *port);
            match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(_)) => (true, format!("tcp {addr} connected")),
                Ok(Err(e)) => (false, format!("tcp {addr}: {e}")),
                Err(_) => (
                    false,
                    format!("tcp {addr}: no answer within {CHECK_TIMEOUT:?}"),
                ),
            }
        }
        HealthCheck::Http {
            host,
            port,
            path,
            expect_status,
        } => {
            let Some(ip) = host.or(vm_ip) else {
                return (
                    false,
                    "http check: the VM has no address; set host or give the VM a network".into(),
                );
            };
            let addr = SocketAddr::new(ip, *port);
            http_get(addr, path, *expect_status).await
        }
    }
}

/// HTTP/1.0 GET; ok when the status is `expect` (or any 2xx).
pub async fn http_get(addr: SocketAddr, path: &str, expect: Option<u16>) -> (bool, String) {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        crate::http::request(
            &mut s,
            "GET",
            &addr.ip().to_string(),
            path,
            None,
            true,
            CHECK_TIMEOUT,
        )
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
    };
    match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
        Ok(Ok(resp)) => {
            let ok = match expect {
                Some(s) => resp.status == s,
                None => (200..300).contains(&resp.status),
            };
            (ok, format!("GET http://{addr}{path} -> {}", resp.status))
        }
        Ok(Err(e)) => (false, format!("GET http://{addr}{path}: {e}")),
        Err(_) => (
            false,
            format!("GET http://{addr}{path}: no answer within {CHECK_TIMEOUT:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn checks_against_local_servers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = Console::open(dir.path(), 1 << 16);
        console
            .append(b"boot\nBLIXARD-GUEST-READY\n")
            .await
            .expect("append");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply: &[u8] = if req.starts_with("GET /ok HTTP/1.0\r\n") {
                    b"HTTP/1.0 200 OK\r\n\r\nfine"
                } else {
                    b"HTTP/1.0 404 Not Found\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
            }
        });
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let checks = vec![
            HealthCheck::ConsoleMarker {
                marker: "BLIXARD-GUEST-READY".into(),
            },
            HealthCheck::Tcp { host: None, port },
            HealthCheck::Http {
                host: None,
                port,
                path: "/ok".into(),
                expect_status: None,
            },
        ];
        let r = run_checks(&checks, Some(lo), &console, 0).await;
        assert_eq!(r.health, Health::Healthy, "{r:?}");
        // The marker is from before the "boot" at offset 10.
        let r = run_checks(&checks[..1], Some(lo), &console, 10).await;
        assert!(matches!(r.health, Health::Unhealthy { .. }));
        let bad = vec![HealthCheck::Http {
            host: Some(lo),
            port,
            path: "/missing".into(),
            expect_status: None,
        }];
        let r = run_checks(&bad, None, &console, 0).await;
        match r.health {
            Health::Unhealthy { last_error } => assert!(last_error.contains("404"), "{last_error}"),
            other => panic!("{other:?}"),
        }
        let no_ip = vec![HealthCheck::Tcp { host: None, port }];
        assert!(matches!(
            run_checks(&no_ip, None, &console, 0).await.health,
            Health::Unhealthy { .. }
        ));
    }
}
