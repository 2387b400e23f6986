//! A single-member etcd for tests, started from the installed `etcd` binary
//! (`HANDOFF_TEST_ETCD` to use another; installed when missing, see [`crate::setup`])
//! on free loopback ports, its data in a temp directory. It can be stopped and started
//! again on the same ports and data (etcd outages), and is killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::pg::free_port;

/// One etcd server.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    /// Serving clients over TLS with this certificate and key (files in `dir`).
    tls: bool,
    /// The address clients are told to use (it listens on loopback as well).
    host: std::net::IpAddr,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::start_at(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Starts etcd serving clients on `host` as well as loopback (a bridge's address,
    /// for proxies in network namespaces), and waits until it answers.
    pub fn start_at(host: std::net::IpAddr) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("handoff-etcd-").tempdir()?;
        let mut e = Self {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            tls: false,
            host,
        };
        e.run()?;
        Ok(e)
    }

    /// Starts etcd serving clients over TLS with a certificate for 127.0.0.1 from `ca`.
    pub fn start_tls(ca: &crate::tls::TestCa) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("handoff-etcd-").tempdir()?;
        let (cert, key) = ca.issue(&["127.0.0.1"])?;
        std::fs::write(dir.path().join("server.pem"), cert)?;
        std::fs::write(dir.path().join("server.key"), key)?;
        let mut e = Self {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            tls: true,
            host: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        e.run()?;
        Ok(e)
    }

    fn run(&mut self) -> Result<()> {
        let client = self.endpoint();
        let mut listen = client.clone();
        if !self.host.is_loopback() {
            let scheme = if self.tls { "https" } else { "http" };
            listen = format!("{listen},{scheme}://127.0.0.1:{}", self.client_port);
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let binary = crate::setup::etcd()?;
        let mut cmd = Command::new(&binary);
        if self.tls {
            cmd.arg("--cert-file")
                .arg(self.dir.path().join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.path().join("server.key"));
        }
        let child = cmd
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("etcd exited ({status}):\n{}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer within 20s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /health` answers `"health":"true"` (over TLS: the port accepts connections).
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        if self.tls {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("\"health\":\"true\"")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `http(s)://host:port`, for `HANDOFF_ETCD_ENDPOINTS`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// Stops etcd (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.run()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- etcd log, last lines ---\n{}", self.log_tail());
        }
    }
}
