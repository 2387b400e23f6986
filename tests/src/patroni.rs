//! A real Patroni cluster for tests: an etcd of its own, and N Patroni daemons (each
//! running its PostgreSQL) on free loopback ports, run as the server user. Patroni
//! comes from `HANDOFF_TEST_PATRONI`, or from a venv the harness makes on first use
//! (`/opt/handoff-patroni` as root: [`crate::setup::patroni`]). Everything is stopped
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::etcd::Etcd;
use crate::pg::{free_port, PgBin};

/// The `patroni` program, made ready (installed into its venv) on first use.
pub fn patroni_bin() -> Result<PathBuf> {
    static READY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = READY.get() {
        return Ok(p.clone());
    }
    let p = crate::setup::patroni()?;
    if !p.is_file() {
        bail!(
            "{} not found (HANDOFF_TEST_PATRONI names a program that is not there?)",
            p.display()
        );
    }
    Ok(READY.get_or_init(|| p).clone())
}

/// One Patroni member.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    config: PathBuf,
    log: PathBuf,
    data: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// `127.0.0.1:pg_port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    /// A tokio-postgres connection string to this member's PostgreSQL.
    pub fn conn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            self.pg_port
        )
    }
}

/// Patroni daemons on one etcd, scope `handoff`.
#[derive(Debug)]
pub struct PatroniCluster {
    pub members: Vec<Member>,
    pub etcd: Etcd,
    bin: PgBin,
    dir: Option<tempfile::TempDir>,
}

/// Options for [`PatroniCluster::start`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The body of a shell script set as each member's `postgresql.before_stop`
    /// (`{addr}` is replaced by the member's PostgreSQL address): Patroni runs it (no
    /// arguments) right before it stops PostgreSQL, and waits for it.
    pub before_stop: Option<String>,
}

impl PatroniCluster {
    /// Starts etcd and `n` members; the first bootstraps and leads, the others stream
    /// from it. Returns once every replica streams.
    pub fn start(n: usize, opts: Options) -> Result<Self> {
        patroni_bin()?;
        let bin = PgBin::find()?;
        let etcd = Etcd::start()?;
        let dir = tempfile::Builder::new()
            .prefix("handoff-patroni-")
            .tempdir()?;
        bin.give_to_server_user(dir.path())?;
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("pg{i}");
            let m = Member {
                pg_port: free_port()?,
                api_port: free_port()?,
                config: dir.path().join(format!("{name}.yml")),
                log: dir.path().join(format!("{name}.log")),
                data: dir.path().join(&name),
                child: None,
                name,
            };
            let hook = match &opts.before_stop {
                Some(body) => {
                    let path = dir.path().join(format!("before_stop-{}.sh", m.name));
                    write_script(&path, &body.replace("{addr}", &m.addr()), &bin)?;
                    Some(path)
                }
                None => None,
            };
            std::fs::write(
                &m.config,
                yaml(&m, &bin, &etcd, dir.path(), hook.as_deref()),
            )?;
            bin.give_to_server_user(&m.config)?;
            members.push(m);
        }
        let mut c = Self {
            members,
            etcd,
            bin,
            dir: Some(dir),
        };
        c.run(0)?;
        c.wait_until(Duration::from_secs(60), "pg0 to lead", |v| {
            leader_of(v).as_deref() == Some("pg0")
        })?;
        for i in 1..n {
            c.run(i)?;
        }
        c.wait_healthy(Duration::from_secs(90))?;
        Ok(c)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// Starts member `i`'s daemon (again).
    pub fn run(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let child = self
            .bin
            .command_as_server_user(&patroni_bin()?, self.dir())
            .arg(&m.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting patroni")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:port` of every member, comma separated (for HANDOFF_PATRONI).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.api_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `GET /cluster` from the first member that answers.
    pub fn cluster(&self) -> Result<Value> {
        let mut last = anyhow!("no member");
        for m in &self.members {
            match http_get(m.api_port, "/cluster") {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The index of the member Patroni names leader, if any.
    pub fn leader(&self) -> Option<usize> {
        let v = self.cluster().ok()?;
        let name = leader_of(&v)?;
        self.members.iter().position(|m| m.name == name)
    }

    /// Polls `GET /cluster` until `check` holds.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.cluster() {
                if check(&v) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "Patroni: {what} did not happen within {timeout:?}; last /cluster: {}\n{}",
                    self.cluster().map(|v| v.to_string()).unwrap_or_default(),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One running leader, every other member streaming.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let n = self.members.len();
        self.wait_until(timeout, "every replica to stream", |v| {
            let ms = v["members"].as_array().cloned().unwrap_or_default();
            ms.len() == n
                && ms
                    .iter()
                    .filter(|m| m["role"] == "leader" && m["state"] == "running")
                    .count()
                    == 1
                && ms
                    .iter()
                    .filter(|m| m["role"] != "leader")
                    .all(|m| m["state"] == "streaming")
        })
    }

    /// Turns on Patroni's `synchronous_mode` and waits until it names a synchronous
    /// standby: from then on a commit the leader acknowledges is on a member Patroni may
    /// promote, so a crash of the leader loses no acknowledged write. (Off by default:
    /// Patroni then lets a switchover go only to the synchronous standby.)
    pub fn make_synchronous(&self, timeout: Duration) -> Result<()> {
        let out = self.patronictl(&["edit-config", "--force", "-s", "synchronous_mode=true"])?;
        if !out.status.success() {
            bail!(
                "patronictl edit-config failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.wait_until(timeout, "a synchronous standby", |v| {
            v["members"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["role"] == "sync_standby"))
        })
    }

    /// Member `i`'s Patroni configuration file (also good for `patronictl -c`).
    pub fn config_path(&self, i: usize) -> &Path {
        &self.members[i].config
    }

    /// `patronictl` with this cluster's configuration, as the server user.
    pub fn patronictl(&self, args: &[&str]) -> Result<Output> {
        let ctl = patroni_bin()?.with_file_name("patronictl");
        let out = self
            .bin
            .command_as_server_user(&ctl, self.dir())
            .arg("-c")
            .arg(&self.members[0].config)
            .args(args)
            .output()
            .with_context(|| format!("running {}", ctl.display()))?;
        Ok(out)
    }

    /// Kills member `i`'s Patroni and PostgreSQL with SIGKILL (a machine dying).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let postmaster = std::fs::read_to_string(self.members[i].data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string));
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = postmaster {
            if let Ok(pid) = pid.trim().parse() {
                let _ = crate::signal(pid, "KILL");
            }
        }
        Ok(())
    }

    /// Tags member `i` `nofailover: true` (Patroni then refuses to make it leader) and
    /// reloads its configuration; returns once `/cluster` shows the tag.
    pub fn forbid_failover_to(&self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let mut yml = std::fs::read_to_string(&m.config)?;
        yml.push_str("tags:\n  nofailover: true\n");
        std::fs::write(&m.config, yml)?;
        let pid = m
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", m.name))?
            .id();
        crate::signal(pid, "HUP")?;
        let name = m.name.clone();
        self.wait_until(Duration::from_secs(30), "the nofailover tag", |v| {
            v["members"].as_array().is_some_and(|ms| {
                ms.iter()
                    .any(|m| m["name"] == name.as_str() && m["tags"]["nofailover"] == true)
            })
        })
    }

    /// Rows of `sql` on member `i` (psql, unaligned).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.members[i].pg_port.to_string(),
            ])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The last lines of every member's log.
    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| crate::log_tail(&m.name, &m.log, 25))
            .collect()
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        // SIGTERM: Patroni stops its PostgreSQL; then SIGKILL whatever is left.
        for m in &self.members {
            if let Some(c) = &m.child {
                let _ = crate::signal(c.id(), "TERM");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0..self.members.len() {
            if let Some(mut c) = self.members[i].child.take() {
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            crate::kill_postmaster(&self.members[i].data);
        }
        if let Some(d) = self.dir.take() {
            if std::env::var_os("HANDOFF_TEST_KEEP_LOGS").is_some() {
                eprintln!("Patroni logs kept in {}", d.keep().display());
            }
        }
    }
}

fn leader_of(v: &Value) -> Option<String> {
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "leader" && m["state"] == "running")
        .and_then(|m| m["name"].as_str().map(str::to_string))
}

/// A blocking `GET` to a member's REST API.
fn http_get(port: u16, path: &str) -> Result<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse()?,
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
    Ok(serde_json::from_str(body.trim())?)
}

fn yaml(m: &Member, bin: &PgBin, etcd: &Etcd, dir: &Path, hook: Option<&Path>) -> String {
    let hook = hook
        .map(|h| format!("  before_stop: '{}'\n", h.display()))
        .unwrap_or_default();
    // ttl 20 is Patroni's minimum; loop_wait + 2 * retry_timeout must stay below it.
    format!(
        "scope: handoff
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 1
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        wal_keep_size: 128MB
        max_wal_senders: 10
        max_replication_slots: 10
        wal_log_hints: 'on'
        max_connections: 100
  initdb:
    - encoding: UTF8
    - locale: C
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {bin_dir}
  pgpass: {dir}/pgpass-{name}
{hook}  authentication:
    replication:
      username: postgres
    superuser:
      username: postgres
  parameters:
    unix_socket_directories: '{dir}'
    fsync: 'off'
    shared_buffers: 32MB
  pg_hba:
    - local all all trust
    - host replication all 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
",
        name = m.name,
        api = m.api_port,
        etcd = etcd.client_port,
        pg = m.pg_port,
        data = m.data.display(),
        bin_dir = bin.dir.display(),
        dir = dir.display(),
    )
}

/// A temp directory the server user owns, holding a copy of `program` it can run (Patroni
/// runs `before_stop` as that user, who may not reach the original, e.g. under /root).
pub fn server_user_copy(program: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let bin = PgBin::find()?;
    let dir = tempfile::Builder::new().prefix("handoff-hook-").tempdir()?;
    let copy = dir.path().join(program.file_name().unwrap_or_default());
    std::fs::copy(program, &copy).with_context(|| format!("copying {}", program.display()))?;
    bin.give_to_server_user(dir.path())?;
    bin.give_to_server_user(&copy)?;
    Ok((dir, copy))
}

/// Writes an executable shell script the server user can run.
fn write_script(path: &Path, body: &str, bin: &PgBin) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    bin.give_to_server_user(path)?;
    Ok(())
}
