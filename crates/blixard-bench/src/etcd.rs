//! A 3-member etcd cluster on loopback (default settings: the WAL is fsync'd before a
//! write is acknowledged), and a minimal client for its v3 JSON gateway: HTTP/1.1
//! keep-alive on a plain tokio `TcpStream`, one connection per worker.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use data_encoding::BASE64;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::procs::{free_port, Procs};
use crate::workload::Worker;

/// The largest response body accepted.
const MAX_BODY: usize = 1 << 20;

pub struct EtcdCluster {
    pub procs: Procs,
    /// Client addresses, one per member.
    pub clients: Vec<SocketAddr>,
    pub version: String,
}

/// Starts 3 etcd members with data dirs under `root`, and waits until all are healthy
/// and a write commits.
pub async fn start(etcd: &Path, root: &Path) -> anyhow::Result<EtcdCluster> {
    ensure!(etcd.exists(), "etcd not found at {}: apt-get install etcd-server (or pass --etcd PATH)", etcd.display());
    let version = Command::new(etcd)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", etcd.display()))?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("etcd ?").trim().to_string();
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push((free_port()?, free_port()?));
    }
    let initial: Vec<String> = ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
    let initial = initial.join(",");
    let mut procs = Procs::default();
    let mut clients = Vec::new();
    for (i, (c, p)) in ports.iter().enumerate() {
        let dir: PathBuf = root.join(format!("etcd-m{i}"));
        let mut cmd = Command::new(etcd);
        cmd.arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(&dir)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{c}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{c}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{p}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{p}"))
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("blixard-bench-{}", std::process::id()))
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        procs.spawn(&format!("etcd m{i}"), cmd, &root.join(format!("etcd-m{i}.log")))?;
        clients.push(SocketAddr::from(([127, 0, 0, 1], *c)));
    }
    let cluster = EtcdCluster { procs, clients, version };
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    Ok(cluster)
}

impl EtcdCluster {
    async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            match self.probe().await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy within {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every member answers /health with "true", and a put through member 0 commits.
    async fn probe(&self) -> anyhow::Result<()> {
        for a in &self.clients {
            let mut c = Http::connect(*a).await?;
            let (status, body) = c.request("GET", "/health", None).await?;
            let v: serde_json::Value = serde_json::from_slice(&body).context("health is not JSON")?;
            ensure!(status == 200 && v["health"] == "true", "{a} not healthy yet: {status} {}", String::from_utf8_lossy(&body));
        }
        let mut c = Http::connect(self.clients[0]).await?;
        put(&mut c, "bench-probe", "1").await
    }

    /// Which member (index into `clients`) is the leader, if they agree on one.
    pub async fn leader_index(&self) -> anyhow::Result<Option<usize>> {
        let mut ids = Vec::new();
        let mut leader = None;
        for a in &self.clients {
            let mut c = Http::connect(*a).await?;
            let (status, body) = c.request("POST", "/v3/maintenance/status", Some(b"{}")).await?;
            ensure!(status == 200, "status: HTTP {status}");
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            ids.push(v["header"]["member_id"].as_str().unwrap_or_default().to_string());
            leader = v["leader"].as_str().map(str::to_string);
        }
        Ok(leader.and_then(|l| ids.iter().position(|i| *i == l)))
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Http {
    host: String,
    stream: BufReader<TcpStream>,
    buf: Vec<u8>,
}

impl Http {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Self { host: addr.to_string(), stream: BufReader::new(s), buf: Vec::with_capacity(512) })
    }

    /// Sends one request and reads the response: status code and body. Handles
    /// `Content-Length` and chunked bodies.
    pub async fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<(u16, Vec<u8>)> {
        let body = body.unwrap_or_default();
        self.buf.clear();
        self.buf.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        self.buf.extend_from_slice(body);
        self.stream.get_mut().write_all(&self.buf).await.context("sending the request")?;

        let mut line = String::new();
        read_line(&mut self.stream, &mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut len: Option<usize> = None;
        let mut chunked = false;
        loop {
            read_line(&mut self.stream, &mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    len = Some(v.parse().with_context(|| format!("bad Content-Length {v:?}"))?);
                } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                read_line(&mut self.stream, &mut line).await?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                ensure!(out.len() + size <= MAX_BODY, "response body too large");
                let at = out.len();
                out.resize(at + size, 0);
                self.stream.read_exact(&mut out[at..]).await?;
                read_line(&mut self.stream, &mut line).await?; // CRLF after the chunk
                if size == 0 {
                    break;
                }
            }
        } else {
            let len = len.context("response has neither Content-Length nor chunked encoding")?;
            ensure!(len <= MAX_BODY, "response body too large ({len} bytes)");
            out.resize(len, 0);
            self.stream.read_exact(&mut out).await.context("reading the response body")?;
        }
        Ok((status, out))
    }
}

async fn read_line(r: &mut BufReader<TcpStream>, line: &mut String) -> anyhow::Result<()> {
    line.clear();
    let n = r.read_line(line).await.context("reading the response")?;
    ensure!(n > 0, "connection closed by etcd");
    ensure!(line.len() <= 8192, "response line too long");
    Ok(())
}

/// `PUT key value` through the JSON gateway; checks HTTP 200 and a JSON answer with a
/// header (a committed revision).
pub async fn put(c: &mut Http, key: &str, value: &str) -> anyhow::Result<()> {
    let body = format!(r#"{{"key":"{}","value":"{}"}}"#, BASE64.encode(key.as_bytes()), BASE64.encode(value.as_bytes()));
    let (status, resp) = c.request("POST", "/v3/kv/put", Some(body.as_bytes())).await?;
    ensure!(status == 200, "etcd put: HTTP {status}: {}", String::from_utf8_lossy(&resp));
    let v: serde_json::Value = serde_json::from_slice(&resp).context("etcd put: answer is not JSON")?;
    ensure!(v["header"]["revision"].is_string(), "etcd put: no revision in {v}");
    Ok(())
}

/// A worker writing `k<worker>` = counter through one member, on one connection.
pub struct EtcdWorker {
    pub addr: SocketAddr,
    pub key: String,
    pub conn: Option<Http>,
}

impl Worker for EtcdWorker {
    fn op(&mut self, i: u64) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + '_>> {
        Box::pin(async move {
            if self.conn.is_none() {
                self.conn = Some(Http::connect(self.addr).await?);
            }
            let c = self.conn.as_mut().context("no connection")?;
            let r = put(c, &self.key, &i.to_string()).await;
            if r.is_err() {
                // Reconnect on the next write: the stream may be out of sync.
                self.conn = None;
            }
            r
        })
    }
}
