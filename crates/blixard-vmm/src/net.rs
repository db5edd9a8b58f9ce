//! Host networking for VMs: a per-node bridge, one tap per VM, an IPv4 address pool with
//! leases persisted in `DATA/net-leases.json`, and nft rules that isolate VMs from each
//! other (`table bridge <T>` drops bridge-forwarded frames from/to isolated taps;
//! `table inet <T>` drops routed packets that would hairpin through the bridge).
//!
//! Everything here shells out to `ip` (iproute2) and `nft` (nftables) and needs root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::Mutex;

use crate::error::NetworkError;

/// Node networking configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Bridge name (created if missing), e.g. `blxbr0`.
    pub bridge: String,
    /// IPv4 pool in CIDR form, e.g. `10.77.0.0/24`. The first host address goes to the
    /// bridge (the VMs' gateway); VMs lease the rest.
    pub pool: String,
    /// Name of the nft tables (`bridge` and `inet` family) holding the isolation rules.
    pub nft_table: String,
}

impl NetworkConfig {
    /// Defaults: bridge `blxbr0`, pool `10.77.0.0/24`, nft table `blixard`.
    pub fn new_default() -> NetworkConfig {
        NetworkConfig {
            bridge: "blxbr0".into(),
            pool: "10.77.0.0/24".into(),
            nft_table: "blixard".into(),
        }
    }
}

/// A VM's network attachment, reported in its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    /// Host-side tap(s).
    pub taps: Vec<String>,
    /// Guest address.
    pub ip: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// Guest MAC.
    pub mac: String,
    /// Bridge.
    pub bridge: String,
    /// Isolated from other VMs.
    pub isolated: bool,
}

/// Check an interface name (IFNAMSIZ 16 incl. NUL).
pub fn validate_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::InvalidIfname(name.to_string()))
    }
}

/// Parse `a.b.c.d/p`; returns (network address, prefix).
pub fn parse_pool(pool: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let bad = || NetworkError::InvalidPool(pool.to_string());
    let (a, p) = pool.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    let mask = u32::MAX << (32 - prefix);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// The MAC Blixard gives the guest with address `ip` (locally administered, unicast).
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Run a tool; stdout on success.
pub async fn run(
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetworkError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|source| NetworkError::MissingTool { tool, source })?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        let _ = w.write_all(input.as_bytes()).await;
        drop(w);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| NetworkError::MissingTool { tool, source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(NetworkError::Command {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether a network link exists.
pub async fn link_exists(name: &str) -> bool {
    tokio::fs::metadata(format!("/sys/class/net/{name}"))
        .await
        .is_ok()
}

/// Create a tap (deleting a stale one of the same name first), optionally enslave it to
/// `bridge`, and bring it up. `flags` are `vnet_hdr`/`multi_queue` from the runner.
pub async fn create_tap(
    name: &str,
    flags: &[String],
    bridge: Option<&str>,
) -> Result<(), NetworkError> {
    validate_ifname(name)?;
    if link_exists(name).await {
        let _ = run("ip", &["link", "del", name], None).await;
    }
    let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
    for f in flags {
        match f.as_str() {
            "vnet_hdr" => args.push("vnet_hdr"),
            "multi_queue" => args.push("multi_queue"),
            _ => {}
        }
    }
    run("ip", &args, None).await?;
    let rest = async {
        if let Some(br) = bridge {
            run("ip", &["link", "set", name, "master", br], None).await?;
        }
        run("ip", &["link", "set", name, "up"], None)
            .await
            .map(drop)
    };
    if let Err(e) = rest.await {
        let _ = run("ip", &["link", "del", name], None).await;
        return Err(e);
    }
    Ok(())
}

/// Delete a link if it exists.
pub async fn delete_link(name: &str) {
    if validate_ifname(name).is_ok() && link_exists(name).await {
        if let Err(e) = run("ip", &["link", "del", name], None).await {
            tracing::warn!(tap = name, "cannot delete link: {e}");
        }
    }
}

/// The node's VM network.
#[derive(Debug)]
pub struct Network {
    cfg: NetworkConfig,
    net: Ipv4Addr,
    prefix: u8,
    leases_path: PathBuf,
    state: Mutex<NetState>,
}

#[derive(Debug, Default)]
struct NetState {
    host_ready: bool,
    leases: BTreeMap<String, Ipv4Addr>,
}

impl Network {
    /// Parse the config and load persisted leases. Touches no host state yet.
    pub fn open(cfg: NetworkConfig, data_dir: &Path) -> Result<Network, NetworkError> {
        validate_ifname(&cfg.bridge)?;
        if cfg.nft_table.is_empty()
            || cfg.nft_table.len() > 32
            || !cfg
                .nft_table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(NetworkError::InvalidIfname(cfg.nft_table.clone()));
        }
        let (net, prefix) = parse_pool(&cfg.pool)?;
        let leases_path = data_dir.join("net-leases.json");
        let leases = match std::fs::read(&leases_path) {
            Ok(bytes) => {
                serde_json::from_slice::<BTreeMap<String, Ipv4Addr>>(&bytes).map_err(|e| {
                    NetworkError::LeaseFile {
                        path: leases_path.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    }
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(NetworkError::LeaseFile {
                    path: leases_path,
                    source,
                })
            }
        };
        Ok(Network {
            cfg,
            net,
            prefix,
            leases_path,
            state: Mutex::new(NetState {
                host_ready: false,
                leases,
            }),
        })
    }

    /// The config.
    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// The bridge's address (the VMs' gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + 1)
    }

    /// Prefix length of the pool.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn ruleset(&self) -> String {
        let t = &self.cfg.nft_table;
        let pool = format!("{}/{}", self.net, self.prefix);
        format!(
            "table bridge {t} {{}}\n\
             delete table bridge {t}\n\
             table bridge {t} {{\n\
               set isolated {{ type ifname; }}\n\
               chain forward {{\n\
                 type filter hook forward priority 0; policy accept;\n\
                 iifname @isolated drop\n\
                 oifname @isolated drop\n\
               }}\n\
             }}\n\
             table inet {t} {{}}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
               set isolated_ips {{ type ipv4_addr; }}\n\
               chain forward {{\n\
                 type filter hook forward priority 0; policy accept;\n\
                 ip saddr @isolated_ips ip daddr {pool} drop\n\
                 ip daddr @isolated_ips ip saddr {pool} drop\n\
               }}\n\
             }}\n"
        )
    }

    async fn ensure_host(&self, st: &mut NetState) -> Result<(), NetworkError> {
        if st.host_ready {
            return Ok(());
        }
        let br = self.cfg.bridge.as_str();
        if !link_exists(br).await {
            run("ip", &["link", "add", br, "type", "bridge"], None).await?;
        }
        let addr = format!("{}/{}", self.gateway(), self.prefix);
        run("ip", &["addr", "replace", &addr, "dev", br], None).await?;
        run("ip", &["link", "set", br, "up"], None).await?;
        run("nft", &["-f", "-"], Some(&self.ruleset())).await?;
        st.host_ready = true;
        tracing::info!(bridge = br, %addr, table = %self.cfg.nft_table, "VM network ready");
        Ok(())
    }

    async fn save(&self, leases: &BTreeMap<String, Ipv4Addr>) -> Result<(), NetworkError> {
        let err = |source| NetworkError::LeaseFile {
            path: self.leases_path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(leases)
            .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let tmp = self.leases_path.with_extension("json.tmp");
        tokio::fs::write(&tmp, bytes).await.map_err(err)?;
        tokio::fs::rename(&tmp, &self.leases_path)
            .await
            .map_err(err)
    }

    /// Lease an address for `vm` (the existing one if it has one). Persisted.
    pub async fn lease(&self, vm: &str) -> Result<Ipv4Addr, NetworkError> {
        let mut st = self.state.lock().await;
        if let Some(ip) = st.leases.get(vm) {
            return Ok(*ip);
        }
        let first = u32::from(self.net) + 2;
        let last = u32::from(self.net) + (1u32 << (32 - self.prefix)) - 2;
        let used: std::collections::BTreeSet<u32> =
            st.leases.values().map(|ip| u32::from(*ip)).collect();
        let Some(ip) = (first..=last).find(|a| !used.contains(a)) else {
            return Err(NetworkError::PoolExhausted {
                pool: self.cfg.pool.clone(),
                leased: st.leases.len(),
            });
        };
        let ip = Ipv4Addr::from(ip);
        st.leases.insert(vm.to_string(), ip);
        if let Err(e) = self.save(&st.leases).await {
            st.leases.remove(vm);
            return Err(e);
        }
        Ok(ip)
    }

    /// Release `vm`'s lease. Persisted.
    pub async fn release(&self, vm: &str) -> Result<(), NetworkError> {
        let mut st = self.state.lock().await;
        if st.leases.remove(vm).is_some() {
            self.save(&st.leases).await?;
        }
        Ok(())
    }

    /// Current leases.
    pub async fn leases(&self) -> BTreeMap<String, Ipv4Addr> {
        self.state.lock().await.leases.clone()
    }

    /// Create a tap on the bridge; add it (and the VM's address) to the isolation sets when
    /// `isolated`.
    pub async fn attach_tap(
        &self,
        tap: &str,
        flags: &[String],
        isolated: bool,
        ip: Ipv4Addr,
    ) -> Result<(), NetworkError> {
        {
            let mut st = self.state.lock().await;
            self.ensure_host(&mut st).await?;
        }
        create_tap(tap, flags, Some(&self.cfg.bridge)).await?;
        if isolated {
            let elem = format!("{{ \"{tap}\" }}");
            if let Err(e) = run(
                "nft",
                &[
                    "add",
                    "element",
                    "bridge",
                    &self.cfg.nft_table,
                    "isolated",
                    &elem,
                ],
                None,
            )
            .await
            {
                delete_link(tap).await;
                return Err(e);
            }
            let ip_elem = format!("{{ {ip} }}");
            if let Err(e) = run(
                "nft",
                &[
                    "add",
                    "element",
                    "inet",
                    &self.cfg.nft_table,
                    "isolated_ips",
                    &ip_elem,
                ],
                None,
            )
            .await
            {
                self.detach_tap(tap, ip).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Remove a tap and its isolation-set elements.
    pub async fn detach_tap(&self, tap: &str, ip: Ipv4Addr) {
        delete_link(tap).await;
        let elem = format!("{{ \"{tap}\" }}");
        let t = self.cfg.nft_table.as_str();
        let _ = run(
            "nft",
            &["delete", "element", "bridge", t, "isolated", &elem],
            None,
        )
        .await;
        let ip_elem = format!("{{ {ip} }}");
        let _ = run(
            "nft",
            &["delete", "element", "inet", t, "isolated_ips", &ip_elem],
            None,
        )
        .await;
    }

    /// Remove the bridge and the nft tables (call when the node shuts its VM network down).
    pub async fn teardown(&self) {
        let mut st = self.state.lock().await;
        let t = &self.cfg.nft_table;
        let _ = run("nft", &["delete", "table", "bridge", t], None).await;
        let _ = run("nft", &["delete", "table", "inet", t], None).await;
        delete_link(&self.cfg.bridge).await;
        st.host_ready = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pools() {
        assert_eq!(
            parse_pool("10.77.0.9/24").expect("ok"),
            (Ipv4Addr::new(10, 77, 0, 0), 24)
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/31",
            "10.0.0.0/7",
            "x/24",
            "10.0.0.0/x",
            "",
        ] {
            assert!(parse_pool(bad).is_err(), "{bad}");
        }
        assert_eq!(mac_for(Ipv4Addr::new(10, 77, 0, 2)), "02:42:0a:4d:00:02");
    }

    #[tokio::test]
    async fn leases_persist_and_exhaust() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = NetworkConfig {
            bridge: "bxtest".into(),
            pool: "10.99.0.0/30".into(),
            nft_table: "bxtest".into(),
        };
        let n = Network::open(cfg.clone(), dir.path()).expect("open");
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 99, 0, 1));
        let a = n.lease("a").await.expect("lease");
        assert_eq!(a, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(n.lease("a").await.expect("same"), a);
        assert!(matches!(
            n.lease("b").await,
            Err(NetworkError::PoolExhausted { .. })
        ));
        let n2 = Network::open(cfg.clone(), dir.path()).expect("reopen");
        assert_eq!(n2.leases().await.get("a"), Some(&a));
        n2.release("a").await.expect("release");
        let n3 = Network::open(cfg, dir.path()).expect("reopen");
        assert!(n3.leases().await.is_empty());
    }

    proptest! {
        #[test]
        fn pool_parser_never_panics(s in ".{0,40}") {
            let _ = parse_pool(&s);
        }

        #[test]
        fn ifname_validation(s in ".{0,20}") {
            if validate_ifname(&s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= 15 && !s.contains('/') && !s.contains(' '));
            }
        }
    }
}
