//! Network namespaces for a cluster: one per node and one for the clients, each joined by a
//! veth pair to a bridge in a namespace of its own. Addresses exist only inside these
//! namespaces. Faults are nft drop rules and `tc tbf` inside a node's namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::Error;

/// The namespaces of one schedule; removed on drop.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    subnet: u8,
    /// Node namespaces, then the clients' namespace.
    members: usize,
}

/// Runs a command; an error names it and carries its stderr.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<(), Error> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(|e| Error::Command { cmd: args.join(" "), detail: e.to_string() })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|e| Error::Command { cmd: args.join(" "), detail: e.to_string() })?;
    }
    let out = child.wait_with_output().map_err(|e| Error::Command { cmd: args.join(" "), detail: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command { cmd: args.join(" "), detail: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// Root, `ip`, `nft` and `tc`: what the harness needs, or why it cannot run.
pub fn prerequisites() -> Result<(), String> {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !root {
        return Err("not root (network namespaces need it)".into());
    }
    for (tool, args) in [("ip", ["-V"]), ("nft", ["--version"]), ("tc", ["-V"])] {
        if run(&[tool, args[0]], None).is_err() {
            return Err(format!("`{tool}` is not installed (apt-get install iproute2 nftables)"));
        }
    }
    Ok(())
}

impl Net {
    /// Builds namespaces for `nodes` nodes and the clients. `tag` keeps concurrent runs
    /// apart (names and subnet).
    pub fn new(tag: u32, nodes: usize) -> Result<Self, Error> {
        let net = Net { prefix: format!("bxf{}", tag % 100_000), subnet: (tag % 200 + 20) as u8, members: nodes + 1 };
        let br = net.bridge_ns();
        run(&["ip", "netns", "add", &br], None)?;
        run(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"], None)?;
        run(&["ip", "-n", &br, "link", "set", "br0", "up"], None)?;
        for m in 0..net.members {
            let ns = net.ns(m);
            let (inner, outer) = (format!("{}v{m}", net.prefix), format!("{}b{m}", net.prefix));
            let cidr = format!("{}/24", net.ip_of(m));
            for cmd in [
                vec!["ip", "netns", "add", &ns],
                vec!["ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer],
                vec!["ip", "link", "set", &inner, "netns", &ns],
                vec!["ip", "link", "set", &outer, "netns", &br],
                vec!["ip", "-n", &br, "link", "set", &outer, "master", "br0", "up"],
                vec!["ip", "-n", &ns, "addr", "add", &cidr, "dev", &inner],
                vec!["ip", "-n", &ns, "link", "set", &inner, "up"],
                vec!["ip", "-n", &ns, "link", "set", "lo", "up"],
            ] {
                run(&cmd, None)?;
            }
        }
        Ok(net)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Namespace of member `m` (node `m`, or the clients for `m == nodes`).
    pub fn ns(&self, m: usize) -> String {
        format!("{}-{m}", self.prefix)
    }

    pub fn clients_ns(&self) -> String {
        self.ns(self.members - 1)
    }

    pub fn ip_of(&self, m: usize) -> String {
        format!("10.79.{}.{}", self.subnet, m + 1)
    }

    fn dev_of(&self, m: usize) -> String {
        format!("{}v{m}", self.prefix)
    }

    /// Node `m` drops every packet from the nodes in `from` (one direction; call it on both
    /// sides for a symmetric partition).
    pub fn drop_from(&self, m: usize, from: &[usize]) -> Result<(), Error> {
        if from.is_empty() {
            return Ok(());
        }
        let ips: Vec<String> = from.iter().map(|&f| self.ip_of(f)).collect();
        let rules = format!(
            "table inet bxfault {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {{ {} }} drop\n  }}\n}}\n",
            ips.join(", ")
        );
        run(&["ip", "netns", "exec", &self.ns(m), "nft", "-f", "-"], Some(&rules))
    }

    /// Limits node `m`'s outgoing traffic to `rate` (tc syntax, e.g. "1mbit").
    pub fn limit(&self, m: usize, rate: &str) -> Result<(), Error> {
        let dev = self.dev_of(m);
        run(
            &["ip", "netns", "exec", &self.ns(m), "tc", "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"],
            None,
        )
    }

    /// Removes every drop rule and rate limit of node `m`.
    pub fn heal(&self, m: usize) {
        let ns = self.ns(m);
        // Either may not exist: nothing to heal then.
        let _ = run(&["ip", "netns", "exec", &ns, "nft", "delete", "table", "inet", "bxfault"], None);
        let _ = run(&["ip", "netns", "exec", &ns, "tc", "qdisc", "del", "dev", &self.dev_of(m), "root"], None);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and so the pair.
        for m in 0..self.members {
            let _ = run(&["ip", "netns", "del", &self.ns(m)], None);
        }
        let _ = run(&["ip", "netns", "del", &self.bridge_ns()], None);
    }
}
