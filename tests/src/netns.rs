//! Test hosts in network namespaces, for faults that loopback cannot make: a host cut
//! off silently. Each host is a namespace of its own joined to a bridge in the test's
//! namespace by a veth pair, with an address in a private /24 (`10.x.y.0/24`, the
//! bridge `.1`). Setting a host's veth down drops every packet to and from it without a
//! reset, as a pulled cable or a partition would: established TCP connections hang
//! instead of failing, and new ones time out.
//!
//! Everything made here — namespaces, veth pairs, the bridge — is removed when the
//! [`Net`] is dropped (after the servers inside have been stopped: see
//! [`crate::Cluster`], which owns its `Net`). Needs root (and `ip`, from iproute2,
//! installed on first use).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// One host: its namespace and address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// `ip netns` name.
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The veth end in the test's namespace (on the bridge).
    link: String,
}

/// A bridge and the hosts joined to it.
#[derive(Debug)]
pub struct Net {
    tag: String,
    bridge: String,
    prefix: [u8; 3],
    hosts: Vec<Host>,
}

/// Runs `ip` with `args`, failing with its output.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// A new bridge with an address in a /24 of its own.
    pub fn new() -> Result<Self> {
        if !crate::pg::running_as_root() {
            bail!("network namespaces for test hosts need root (CAP_NET_ADMIN); run the tests as root");
        }
        crate::setup::ensure_packages("ip (network namespaces)", &["iproute2"], || {
            Command::new("ip").arg("-V").output().is_ok()
        })?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:05x}", (pid.wrapping_mul(16).wrapping_add(n)) & 0xfffff);
        let prefix = [10, 200 + (n % 50) as u8, (pid % 251) as u8];
        let net = Self {
            bridge: format!("hob{tag}"),
            tag,
            prefix,
            hosts: Vec::new(),
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        let gw = format!("{}/24", net.address(1));
        ip(&["addr", "add", &gw, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    fn address(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last)
    }

    /// The bridge's own address: where processes in the test's namespace come from.
    pub fn gateway(&self) -> Ipv4Addr {
        self.address(1)
    }

    /// The subnet in CIDR form (for pg_hba.conf).
    pub fn cidr(&self) -> String {
        format!("{}/24", self.address(0))
    }

    /// A new host named `name` (a namespace with loopback up and one veth on the bridge).
    pub fn host(&mut self, name: &str) -> Result<Host> {
        let i = self.hosts.len();
        let host = Host {
            name: name.to_string(),
            ns: format!("handoff-{}-{name}", self.tag),
            addr: self.address(10 + i as u8),
            link: format!("hov{}{i}", self.tag),
        };
        let inside = format!("hon{}{i}", self.tag);
        ip(&["netns", "add", &host.ns])?;
        // Recorded before the links: a failure below still removes the namespace.
        self.hosts.push(host.clone());
        ip(&[
            "link", "add", &host.link, "type", "veth", "peer", "name", &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &host.ns])?;
        ip(&["link", "set", &host.link, "master", &self.bridge])?;
        ip(&["link", "set", &host.link, "up"])?;
        let addr = format!("{}/24", host.addr);
        let gw = self.gateway().to_string();
        for args in [
            vec!["addr", "add", addr.as_str(), "dev", inside.as_str()],
            vec!["link", "set", inside.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", gw.as_str()],
        ] {
            let mut full = vec!["-n", host.ns.as_str()];
            full.extend(args);
            ip(&full)?;
        }
        Ok(host)
    }

    /// Cuts `host` off: its link goes down, packets to and from it are dropped, nothing
    /// is reset.
    pub fn cut(&self, host: &Host) -> Result<()> {
        ip(&["link", "set", &host.link, "down"])
    }

    /// Joins `host` again.
    pub fn heal(&self, host: &Host) -> Result<()> {
        ip(&["link", "set", &host.link, "up"])
    }

    /// A command run inside `host`'s namespace (`ip netns exec`), as `uid:gid` when
    /// given (PostgreSQL refuses to run as root).
    pub fn command_in(host_ns: &str, run_as: Option<(u32, u32)>, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", host_ns]);
        if let Some((uid, gid)) = run_as {
            c.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ]);
        }
        c.arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Deleting one end of a veth pair deletes both.
            let _ = ip(&["link", "del", &h.link]);
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
