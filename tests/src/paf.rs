//! A real pg_auto_failover formation for tests: a monitor and N nodes, each run by its
//! own `pg_autoctl run` (keeper and PostgreSQL) on free loopback ports, as the server
//! user. pg_auto_failover comes from Debian's packages, installed on first use
//! ([`crate::setup::pg_autoctl`]). With [`Options::hold`], every keeper runs the
//! project's `deploy/pg_ctl`, which runs `handoff hold` before it stops
//! PostgreSQL. Everything is stopped when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::pg::{free_port, PgBin};

/// Where a keeper's `handoff hold` goes.
#[derive(Debug, Clone)]
pub struct Hold {
    pub shard: String,
    /// handoff's admin API, `IP:port` (several space separated).
    pub admin: String,
    /// A copy of the handoff binary the server user can run.
    pub handoff: PathBuf,
    /// `handoff hold --timeout`.
    pub timeout: String,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keepers stop PostgreSQL through handoff's pg_ctl, which holds first.
    pub hold: Option<Hold>,
}

/// One node: a keeper and its PostgreSQL.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub pg_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// `127.0.0.1:pg_port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    /// A tokio-postgres connection string to this node's PostgreSQL.
    pub fn conn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            self.pg_port
        )
    }
}

/// One node's states, as the monitor has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub port: u16,
    pub reported: String,
    pub goal: String,
}

/// A monitor and its formation `default`, group 0.
#[derive(Debug)]
pub struct AutoFailoverCluster {
    pub monitor_port: u16,
    pub nodes: Vec<Node>,
    monitor_data: PathBuf,
    monitor_log: PathBuf,
    monitor: Option<Child>,
    bin: PgBin,
    pg_autoctl: PathBuf,
    /// The pg_ctl keepers use: PostgreSQL's, or handoff's in a directory of links.
    pg_ctl: PathBuf,
    opts: Options,
    dir: Option<tempfile::TempDir>,
}

impl AutoFailoverCluster {
    /// Starts a monitor and `n` nodes: the first becomes the primary, the others its
    /// secondaries. Returns once every node has reached its state.
    pub fn start(n: usize, opts: Options) -> Result<Self> {
        let bin = PgBin::find()?;
        let major = bin.major();
        let pg_autoctl = crate::setup::pg_autoctl(&major)?;
        let dir = tempfile::Builder::new().prefix("handoff-paf-").tempdir()?;
        bin.give_to_server_user(dir.path())?;
        for sub in ["config", "share", "run"] {
            let p = dir.path().join(sub);
            std::fs::create_dir(&p)?;
            bin.give_to_server_user(&p)?;
        }
        let pg_ctl = match &opts.hold {
            None => bin.bin("pg_ctl"),
            Some(_) => wrapper_dir(&bin, dir.path())?.join("pg_ctl"),
        };
        let mut c = Self {
            monitor_port: free_port()?,
            nodes: Vec::new(),
            monitor_data: dir.path().join("monitor"),
            monitor_log: dir.path().join("monitor.log"),
            monitor: None,
            bin,
            pg_autoctl,
            pg_ctl,
            opts,
            dir: Some(dir),
        };
        c.create_monitor()?;
        c.run_monitor()?;
        for i in 0..n {
            let node = Node {
                name: format!("node_{}", i + 1),
                pg_port: free_port()?,
                data: c.dir().join(format!("node_{}", i + 1)),
                log: c.dir().join(format!("node_{}.log", i + 1)),
                child: None,
            };
            c.nodes.push(node);
            c.create_node(i)?;
            c.run(i)?;
            let want = if i == 0 { "single" } else { "secondary" };
            let name = c.nodes[i].name.clone();
            c.wait_until(
                Duration::from_secs(90),
                &format!("{name} to be {want}"),
                |st| {
                    st.iter()
                        .any(|s| s.name == name && s.reported == want && s.goal == want)
                },
            )?;
        }
        c.wait_healthy(Duration::from_secs(90))?;
        Ok(c)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// `pg_autoctl` as the server user, with this formation's own config and state
    /// directories.
    fn command(&self) -> Command {
        let dir = self.dir();
        let mut c = self.bin.command_as_server_user(&self.pg_autoctl, dir);
        c.env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_DATA_HOME", dir.join("share"))
            .env("XDG_RUNTIME_DIR", dir.join("run"))
            .env("PG_CONFIG", self.bin.bin("pg_config"))
            .env_remove("PGDATA")
            .stdin(Stdio::null());
        c
    }

    fn create_monitor(&self) -> Result<()> {
        let out = self
            .command()
            .args(["create", "monitor", "--pgdata"])
            .arg(&self.monitor_data)
            .args(["--pgport", &self.monitor_port.to_string()])
            .args(["--hostname", "127.0.0.1", "--listen", "127.0.0.1"])
            .args(["--auth", "trust", "--no-ssl", "--pgctl"])
            .arg(self.bin.bin("pg_ctl"))
            .output()
            .context("pg_autoctl create monitor")?;
        check(out, "pg_autoctl create monitor")?;
        // Health checks and timeouts in seconds, not tens of seconds: a crash is seen
        // and failed over within the buffer's bounds.
        let conf = self.monitor_data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(
            "\npgautofailover.health_check_period = 1000\n\
             pgautofailover.health_check_timeout = 1000\n\
             pgautofailover.health_check_max_retries = 1\n\
             pgautofailover.health_check_retry_delay = 500\n\
             pgautofailover.node_considered_unhealthy_timeout = 3000\n\
             pgautofailover.primary_demote_timeout = 3000\n",
        );
        std::fs::write(&conf, text)?;
        Ok(())
    }

    /// Starts the monitor's `pg_autoctl run` (again).
    pub fn run_monitor(&mut self) -> Result<()> {
        let child = self.spawn_run(&self.monitor_data, &self.monitor_log, false)?;
        self.monitor = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.psql_monitor("select 1").is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the monitor did not answer within 30s\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the monitor (its keeper and PostgreSQL) and waits until it is gone.
    pub fn stop_monitor(&mut self) -> Result<()> {
        if let Some(c) = self.monitor.take() {
            stop(c, Duration::from_secs(20));
        }
        crate::kill_postmaster(&self.monitor_data);
        Ok(())
    }

    fn create_node(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let out = self
            .command()
            .args(["create", "postgres", "--pgdata"])
            .arg(&n.data)
            .args(["--pgport", &n.pg_port.to_string(), "--name", &n.name])
            .args(["--hostname", "127.0.0.1", "--listen", "127.0.0.1"])
            .args(["--auth", "trust", "--no-ssl", "--dbname", "postgres"])
            .args(["--monitor", &self.monitor_url()])
            .arg("--pgctl")
            .arg(&self.pg_ctl)
            .output()
            .context("pg_autoctl create postgres")?;
        check(out, &format!("pg_autoctl create postgres ({})", n.name))?;
        Ok(())
    }

    /// Starts node `i`'s `pg_autoctl run` (again).
    pub fn run(&mut self, i: usize) -> Result<()> {
        let (data, log) = (self.nodes[i].data.clone(), self.nodes[i].log.clone());
        let child = self.spawn_run(&data, &log, true)?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    fn spawn_run(&self, data: &Path, log: &Path, keeper: bool) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut c = self.command();
        c.args(["run", "--pgdata"]).arg(data);
        if let (true, Some(h)) = (keeper, &self.opts.hold) {
            c.env("HANDOFF_SHARD", &h.shard)
                .env("HANDOFF_ADMIN", &h.admin)
                .env("HANDOFF_BIN", &h.handoff)
                .env("HANDOFF_HOLD_TIMEOUT", &h.timeout)
                .env("HANDOFF_PG_CTL", self.bin.bin("pg_ctl"));
        }
        // Its own process group: a crash kills the keeper and all it started.
        c.process_group(0)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        c.spawn().context("starting pg_autoctl run")
    }

    /// `postgres://autoctl_node@127.0.0.1:<port>/pg_auto_failover`.
    pub fn monitor_url(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover",
            self.monitor_port
        )
    }

    /// Every node's reported and assigned state.
    pub fn state(&self) -> Result<Vec<NodeState>> {
        let rows = self.psql_monitor(
            "select nodename, nodeport, reportedstate, goalstate from pgautofailover.node \
             where formationid = 'default' and groupid = 0 order by nodeid",
        )?;
        rows.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                if f.len() != 4 {
                    bail!("unexpected row {l:?}");
                }
                Ok(NodeState {
                    name: f[0].to_string(),
                    port: f[1].parse()?,
                    reported: f[2].to_string(),
                    goal: f[3].to_string(),
                })
            })
            .collect()
    }

    /// The index of the node that reports and is assigned `primary` (or
    /// `wait_primary`, `single`).
    pub fn primary(&self) -> Option<usize> {
        let st = self.state().ok()?;
        let p = st.iter().find(|s| {
            s.reported == s.goal
                && matches!(s.reported.as_str(), "primary" | "wait_primary" | "single")
        })?;
        self.nodes.iter().position(|n| n.name == p.name)
    }

    /// Polls the monitor until `check` holds.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&[NodeState]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(st) = self.state() {
                if check(&st) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "pg_auto_failover: {what} did not happen within {timeout:?}; last state: {:?}\n{}",
                    self.state(),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One primary, every other node a secondary (reported and assigned).
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let n = self.nodes.len();
        self.wait_until(timeout, "one primary and secondaries", |st| {
            let settled = |s: &NodeState, want: &str| s.reported == want && s.goal == want;
            st.len() == n
                && if n == 1 {
                    settled(&st[0], "single")
                } else {
                    st.iter().filter(|s| settled(s, "primary")).count() == 1
                        && st.iter().filter(|s| settled(s, "secondary")).count() == n - 1
                }
        })
    }

    /// `pg_autoctl <args>` against the monitor (`--pgdata` of the monitor), e.g.
    /// `perform switchover`.
    pub fn ctl_monitor(&self, args: &[&str]) -> Result<Output> {
        self.command()
            .args(args)
            .arg("--pgdata")
            .arg(&self.monitor_data)
            .output()
            .context("pg_autoctl")
    }

    /// [`AutoFailoverCluster::ctl_monitor`] started, not waited for (its output
    /// piped): `wait_with_output` it.
    pub fn spawn_ctl_monitor(&self, args: &[&str]) -> Result<Child> {
        self.command()
            .args(args)
            .arg("--pgdata")
            .arg(&self.monitor_data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("pg_autoctl")
    }

    /// The shell words of `pg_autoctl <args> --pgdata <monitor>` with this formation's
    /// environment (for a command line run as the server user).
    pub fn ctl_monitor_shell(&self, args: &str) -> String {
        let dir = self.dir();
        format!(
            "env XDG_CONFIG_HOME={} XDG_DATA_HOME={} XDG_RUNTIME_DIR={} PG_CONFIG={} {} {args} --pgdata {}",
            dir.join("config").display(),
            dir.join("share").display(),
            dir.join("run").display(),
            self.bin.bin("pg_config").display(),
            self.pg_autoctl.display(),
            self.monitor_data.display()
        )
    }

    /// `pg_autoctl <args>` on node `i` (`--pgdata` of the node), e.g.
    /// `set node candidate-priority 0`.
    pub fn ctl_node(&self, i: usize, args: &[&str]) -> Result<Output> {
        self.command()
            .args(args)
            .arg("--pgdata")
            .arg(&self.nodes[i].data)
            .output()
            .context("pg_autoctl")
    }

    /// Kills node `i`'s keeper and PostgreSQL with SIGKILL (a machine dying).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = crate::signal_group(c.id(), "KILL");
            let _ = c.wait();
        }
        crate::kill_postmaster(&self.nodes[i].data);
        Ok(())
    }

    /// Rows of `sql` on the monitor's `pg_auto_failover` database (psql, unaligned).
    pub fn psql_monitor(&self, sql: &str) -> Result<String> {
        psql(&self.bin, self.monitor_port, "pg_auto_failover", sql)
    }

    /// Rows of `sql` on node `i` (psql, unaligned).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String> {
        psql(&self.bin, self.nodes[i].pg_port, "postgres", sql)
    }

    /// The last lines of the monitor's and every node's log.
    pub fn log_tails(&self) -> String {
        std::iter::once(("monitor", &self.monitor_log))
            .chain(self.nodes.iter().map(|n| (n.name.as_str(), &n.log)))
            .map(|(name, log)| crate::log_tail(name, log, 30))
            .collect()
    }
}

impl Drop for AutoFailoverCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        // SIGTERM: each pg_autoctl stops its PostgreSQL; then SIGKILL what is left.
        let children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .chain(self.monitor.take())
            .collect();
        for c in &children {
            let _ = crate::signal_group(c.id(), "TERM");
        }
        for c in children {
            stop(c, Duration::from_secs(15));
        }
        for n in &self.nodes {
            crate::kill_postmaster(&n.data);
        }
        crate::kill_postmaster(&self.monitor_data);
        if let Some(d) = self.dir.take() {
            if std::env::var_os("HANDOFF_TEST_KEEP_LOGS").is_some() {
                eprintln!("pg_auto_failover logs kept in {}", d.keep().display());
            }
        }
    }
}

/// handoff's pg_ctl (`deploy/pg_ctl`) in a directory of links to
/// PostgreSQL's other programs, as its header says to install it.
fn wrapper_dir(bin: &PgBin, dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let wrapped = dir.join("pgbin");
    std::fs::create_dir(&wrapped)?;
    for e in std::fs::read_dir(&bin.dir)? {
        let e = e?;
        if e.file_name() != "pg_ctl" {
            std::os::unix::fs::symlink(e.path(), wrapped.join(e.file_name()))?;
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pg_ctl");
    let ours = wrapped.join("pg_ctl");
    std::fs::copy(&script, &ours).with_context(|| format!("copying {}", script.display()))?;
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o755))?;
    bin.give_to_server_user(&wrapped)?;
    bin.give_to_server_user(&ours)?;
    Ok(wrapped)
}

/// Waits up to `timeout` for `child` to end (its group signalled before), then kills
/// its group.
fn stop(mut child: Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let _ = crate::signal_group(child.id(), "TERM");
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = crate::signal_group(child.id(), "KILL");
    let _ = child.kill();
    let _ = child.wait();
}

fn psql(bin: &PgBin, port: u16, db: &str, sql: &str) -> Result<String> {
    let out = Command::new(bin.bin("psql"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", db, "-XAtq", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn check(out: Output, what: &str) -> Result<Output> {
    if !out.status.success() {
        return Err(anyhow!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}
