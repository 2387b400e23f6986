//! handoff as separate processes (the release or debug binary next to the tests), for
//! tests with several proxies: each has its own metrics and can be killed with SIGKILL.
//! Every process is killed when its handle is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::pg::free_port;
use crate::raw::{http, http_body};
use crate::Cluster;

/// A temp directory for the proxies' logs, kept (and printed) with
/// `HANDOFF_TEST_KEEP_LOGS`.
pub fn log_dir() -> Result<tempfile::TempDir> {
    let mut logs = tempfile::Builder::new()
        .prefix("handoff-proxies-")
        .tempdir()?;
    if std::env::var_os("HANDOFF_TEST_KEEP_LOGS").is_some() {
        logs.disable_cleanup(true);
        eprintln!("proxy logs in {}", logs.path().display());
    }
    Ok(logs)
}

/// One handoff process.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Option<Child>,
    /// The environment it was started with (a successor gets the same).
    env: Vec<(String, String)>,
    /// The network namespace it runs in, if not the test's.
    ns: Option<String>,
    pub id: String,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl ProxyProcess {
    /// Starts handoff in front of every node of `cluster` (shard `main`) with `vars`,
    /// logging to `log_dir/<id>.log`, and waits until `/readyz` answers.
    pub async fn start(
        cluster: &Cluster,
        id: &str,
        vars: &[(&str, &str)],
        log_dir: &std::path::Path,
    ) -> Result<Self> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        Self::start_with(&Self::shards(cluster), admin, id, vars, log_dir).await
    }

    /// [`ProxyProcess::start`] on a test host of its own (`host`, a network namespace):
    /// it listens for clients and the admin API on the host's address, and cutting the
    /// host's link cuts it off from everything.
    pub async fn start_in(
        cluster: &Cluster,
        id: &str,
        vars: &[(&str, &str)],
        log_dir: &std::path::Path,
        host: &crate::netns::Host,
    ) -> Result<Self> {
        let listen: SocketAddr = format!("{}:{}", host.addr, free_port()?).parse()?;
        let admin: SocketAddr = format!("{}:{}", host.addr, free_port()?).parse()?;
        let shards = Self::shards(cluster);
        Self::launch(
            &shards,
            listen,
            admin,
            id,
            vars,
            log_dir,
            Some(host.ns.clone()),
        )
        .await
    }

    fn shards(cluster: &Cluster) -> String {
        format!(
            "main={}",
            std::iter::once(&cluster.primary)
                .chain(&cluster.standbys)
                .map(|n| n.addr())
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    /// [`ProxyProcess::start`] with `HANDOFF_SHARDS` given, and the admin API on `admin`.
    pub async fn start_with(
        shards: &str,
        admin: SocketAddr,
        id: &str,
        vars: &[(&str, &str)],
        log_dir: &std::path::Path,
    ) -> Result<Self> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        Self::launch(shards, listen, admin, id, vars, log_dir, None).await
    }

    async fn launch(
        shards: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        id: &str,
        vars: &[(&str, &str)],
        log_dir: &std::path::Path,
        ns: Option<String>,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{id}.log"));
        // Appended to: a proxy restarted under the same id keeps its predecessor's log.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut env: Vec<(String, String)> = [
            ("HANDOFF_LISTEN", listen.to_string()),
            ("HANDOFF_ADMIN_LISTEN", admin.to_string()),
            ("HANDOFF_SHARDS", shards.to_string()),
            ("HANDOFF_PROXY_ID", id.to_string()),
            ("HANDOFF_SHUTDOWN_TIMEOUT", "5s".to_string()),
            ("HANDOFF_LOG", "info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in vars {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        let child = crate::handoff_command_in(ns.as_deref())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()?;
        let mut p = Self {
            child: Some(child),
            env,
            ns,
            id: id.to_string(),
            listen,
            admin,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http(admin, "GET", "/readyz", None).await {
                return Ok(p);
            }
            if let Some(Ok(Some(status))) = p.child.as_mut().map(|c| c.try_wait()) {
                bail!("proxy {id} exited ({status}):\n{}", p.log_tail());
            }
            if std::time::Instant::now() > deadline {
                bail!("proxy {id} did not become ready:\n{}", p.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `HANDOFF_ADMIN_TOKEN`, if it was started with one (the admin API then wants it).
    pub fn token(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == "HANDOFF_ADMIN_TOKEN")
            .map(|(_, v)| v.as_str())
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Replaces the process with a new one started with `--takeover` and the same
    /// environment (it needs `HANDOFF_TAKEOVER_SOCKET`): returns once the old one has
    /// exited, having handed its sockets and clients over, and the new one still runs.
    pub async fn take_over(&mut self) -> Result<Duration> {
        let started = std::time::Instant::now();
        let Some(mut old) = self.child.take() else {
            bail!("proxy {} is not running", self.id);
        };
        let file = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let mut new = crate::handoff_command_in(self.ns.as_deref())
            .arg("--takeover")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()?;
        let deadline = started + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = old.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = old.kill();
                let _ = new.kill();
                bail!(
                    "proxy {}: the old process did not exit within 40s of the takeover:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if let Some(exited) = new.try_wait()? {
            bail!(
                "proxy {}: the successor exited ({exited}):\n{}",
                self.id,
                self.log_tail()
            );
        }
        self.child = Some(new);
        if !status.success() {
            bail!(
                "proxy {}: the old process ended badly after the takeover ({status}):\n{}",
                self.id,
                self.log_tail()
            );
        }
        Ok(started.elapsed())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL: the process dies without leaving its cluster.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the exit (up to 20 s, then SIGKILL).
    pub async fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = crate::signal(c.id(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// A GET on the admin API: status and JSON.
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let (status, body) = http(self.admin, "GET", path, self.token()).await?;
        Ok((
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        ))
    }

    /// A POST with a JSON body on the admin API: status and JSON.
    pub async fn post(&self, path: &str, body: &str) -> Result<(u16, Value)> {
        let (status, text) = http_body(self.admin, "POST", path, self.token(), body).await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// `POST /v1/shards/main/switchover {"to": to}` on this proxy: the status and the
    /// report.
    pub async fn switchover(&self, to: &str) -> Result<(u16, Value)> {
        self.post(
            "/v1/shards/main/switchover",
            &format!("{{\"to\": \"{to}\"}}"),
        )
        .await
    }

    /// The first shard of `GET /v1/shards`, and the `coordination` object.
    pub async fn shard(&self) -> Result<(Value, Value)> {
        let (status, v) = self.get("/v1/shards").await?;
        if status != 200 {
            bail!("GET /v1/shards: {status} {v}");
        }
        Ok((v["shards"][0].clone(), v["coordination"].clone()))
    }

    /// The sum of a metric's series whose labels include each of `labels`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let (_, body) = http(self.admin, "GET", "/metrics", self.token()).await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- proxy {} log, last lines ---\n{}",
                self.id,
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// The proxies that acknowledged a coordinated switchover, from its report.
pub fn acknowledged(report: &Value) -> Vec<String> {
    report["coordination"]["proxies"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|p| p["proxy"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
