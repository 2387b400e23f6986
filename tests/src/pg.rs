//! PostgreSQL clusters for tests: find the binaries, initdb, configure, start a primary
//! and streaming standbys, run SQL with psql, stop and clean up.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context, Result};

/// Roles whose pg_hba.conf line asks for a specific method (create them in a test).
pub const MD5_USER: &str = "md5_user";
pub const SCRAM_USER: &str = "scram_user";
pub const PASSWORD_USER: &str = "password_user";

/// The installed PostgreSQL binaries and the user to run servers as.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub dir: PathBuf,
    /// uid/gid to run server processes as, when the tests run as root.
    run_as: Option<(u32, u32)>,
}

fn version_key(p: &Path) -> Vec<u32> {
    p.iter().filter_map(|c| c.to_str()?.parse().ok()).collect()
}

impl PgBin {
    /// Finds `initdb`: on `PATH`, then `pg_config --bindir`, then the newest
    /// `/usr/lib/postgresql/*/bin`; installs PostgreSQL when none is found and it can
    /// ([`crate::setup`]).
    pub fn find() -> Result<Self> {
        crate::setup::ensure_postgres(|| Self::find_dir().is_some())?;
        let dir = Self::find_dir().ok_or_else(|| {
            anyhow!(
                "PostgreSQL server binaries (initdb) not found on PATH, via pg_config, or in \
                 /usr/lib/postgresql/*/bin"
            )
        })?;
        let run_as = if current_euid()? == 0 {
            let user = std::env::var("HANDOFF_TEST_PG_USER").unwrap_or_else(|_| "postgres".into());
            Some(lookup_user(&user)?)
        } else {
            None
        };
        Ok(Self { dir, run_as })
    }

    fn find_dir() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                // PATH may hold symlinks (e.g. /usr/local/bin/initdb): use the real
                // directory, where the other server tools live too.
                let Ok(initdb) = std::fs::canonicalize(d.join("initdb")) else {
                    continue;
                };
                if let Some(real) = initdb.parent() {
                    if real.join("pg_basebackup").is_file() {
                        return Some(real.to_path_buf());
                    }
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if d.join("initdb").is_file() {
                return Some(d);
            }
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|d| d.join("initdb").is_file())
            .collect();
        found.sort_by_key(|p| version_key(p));
        found.pop()
    }

    /// PostgreSQL's major version, from the binaries' directory (`…/15/bin`: "15").
    pub fn major(&self) -> String {
        self.dir
            .parent()
            .and_then(Path::file_name)
            .and_then(|m| m.to_str())
            .unwrap_or("15")
            .to_string()
    }

    /// The path of one binary (`psql`, `pgbench`, …).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A command for any program (e.g. pgbouncer), run as the unprivileged server user
    /// when the tests run as root.
    pub fn command_as_server_user(&self, program: &Path, cwd: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(cwd).env("HOME", cwd);
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Hands a file or directory to the server user (when running as root).
    pub fn give_to_server_user(&self, path: &Path) -> Result<()> {
        self.chown(path)
    }

    /// A command for a server-side tool, run as the unprivileged user when needed.
    fn server_cmd(&self, name: &str, cwd: &Path) -> Command {
        let mut c = Command::new(self.bin(name));
        c.current_dir(cwd).env("HOME", cwd).env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// [`PgBin::server_cmd`] inside the network namespace `ns` when given (the
    /// namespace is entered as root, then the user is switched).
    fn server_cmd_in(&self, name: &str, cwd: &Path, ns: Option<&str>) -> Command {
        let Some(ns) = ns else {
            return self.server_cmd(name, cwd);
        };
        let program = self.bin(name);
        let mut c = crate::netns::Net::command_in(ns, self.run_as, &program.to_string_lossy());
        c.current_dir(cwd).env("HOME", cwd).env_remove("PGDATA");
        c
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }
}

/// True when the tests run as root (servers then run as the server user).
pub fn running_as_root() -> bool {
    current_euid().is_ok_and(|u| u == 0)
}

fn current_euid() -> Result<u32> {
    // /proc/self is owned by the effective uid of the process reading it.
    Ok(std::fs::metadata("/proc/self")
        .context("reading /proc/self to learn the effective uid")?
        .uid())
}

fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == name {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("tests run as root, and user '{name}' (to run PostgreSQL as) does not exist; create it or set HANDOFF_TEST_PG_USER")
}

/// A free loopback TCP port (bound and released; PostgreSQL binds it next).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free loopback port below Linux's ephemeral range (32768–60999), for a port that
/// must be chosen long before it is bound: the outgoing connections made meanwhile
/// (to PostgreSQL, etcd, Patroni) take their local ports from that range, so they
/// cannot take this one. A port is handed out once per test process (two servers
/// chosen before either binds get two ports). Falls back to [`free_port`].
pub fn free_port_outside_ephemeral() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let start = (std::process::id() % 10_000) as u16;
    for i in 0..2_000u16 {
        let port = 20_000 + (start + i * 7) % 12_000;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    free_port()
}

fn check(out: Output, what: &str) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// One PostgreSQL server.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    /// The address it listens on: `127.0.0.1`, or its own in a network namespace.
    pub host: String,
    /// Its network namespace's host, for a cluster started with [`Cluster::start_in`].
    pub net_host: Option<crate::netns::Host>,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    bin: PgBin,
    root: PathBuf,
    running: bool,
}

impl Node {
    /// The timeline this primary writes on now (its control file names a new one only
    /// after a checkpoint; the name of its current WAL file at once).
    pub fn timeline(&self) -> Result<i32> {
        Ok(self
            .psql("select ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int")?
            .parse()?)
    }

    /// `host:port` (`127.0.0.1:port` unless in a network namespace).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn socket_addr(&self) -> std::net::SocketAddr {
        self.addr().parse().expect("a node's host is an IP address")
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        let ns = self.net_host.as_ref().map(|h| h.ns.as_str());
        let out = self
            .bin
            .server_cmd_in("pg_ctl", &self.root, ns)
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"])
            .output()?;
        check(out, &format!("pg_ctl start ({})", self.name)).map_err(|e| {
            anyhow!(
                "{e:#}\n--- server log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (`fast` or `immediate`). A server something else already
    /// stopped (a demote command, say) counts as stopped.
    pub fn stop(&mut self, mode: &str) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        if !self.data.join("postmaster.pid").exists() {
            self.running = false;
            return Ok(());
        }
        let out = self
            .bin
            .server_cmd("pg_ctl", &self.root)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()?;
        self.running = false;
        check(out, &format!("pg_ctl stop ({})", self.name)).map(|_| ())
    }

    /// The postmaster's pid and its children's (from `postmaster.pid` and `/proc`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let pidfile = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .with_context(|| format!("reading {}'s postmaster.pid", self.name))?;
        let pm: u32 = pidfile
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .parse()
            .context("postmaster.pid's first line")?;
        let mut pids = vec![pm];
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pm) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// Sends `signal` (e.g. `KILL`, `STOP`, `CONT`) to the postmaster and every backend
    /// at once.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pids = self.pids()?;
        let mut first_error = None;
        for pid in &pids {
            if let Err(e) = crate::signal(*pid, signal) {
                first_error.get_or_insert(e);
            }
        }
        // A backend may exit between the scan and the signal; the others still get it.
        // Only a missing postmaster is an error.
        if let Some(e) = first_error {
            if !Path::new(&format!("/proc/{}", pids[0])).exists() {
                bail!("kill -{signal} ({}): {e}", self.name);
            }
        }
        Ok(())
    }

    /// A crash: `kill -9` of the postmaster and all its processes. [`Node::start`]
    /// brings it back (crash recovery).
    pub fn crash(&mut self) -> Result<()> {
        let pids = self.pids()?;
        self.signal("KILL")?;
        self.running = false;
        // Wait until every process is gone (or a zombie): a restart refuses to start
        // while the old shared memory is still attached.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let alive = |p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .is_some_and(|zombie| !zombie)
        };
        while pids.iter().any(alive) {
            if std::time::Instant::now() > deadline {
                bail!("{}: processes outlived kill -9", self.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A dead (zombie) postmaster's pid still exists, and PostgreSQL would take the
        // lock file for a live server's: remove it, as a reboot would make it stale.
        let _ = std::fs::remove_file(self.data.join("postmaster.pid"));
        let _ = std::fs::remove_file(self.root.join(format!(".s.PGSQL.{}.lock", self.port)));
        let _ = std::fs::remove_file(self.root.join(format!(".s.PGSQL.{}", self.port)));
        Ok(())
    }

    /// Opens every database again by hand after handoff fenced this server, as an
    /// operator would: stop it, turn `datallowconn` back on in single-user mode (no
    /// connection can log in while the fence holds), start it.
    pub fn lift_fence_by_hand(&mut self) -> Result<()> {
        self.stop("fast")?;
        let mut child = self
            .bin
            .server_cmd("postgres", &self.root)
            .arg("--single")
            .arg("-D")
            .arg(&self.data)
            .arg("postgres")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("single-user stdin")?;
            stdin.write_all(
                b"UPDATE pg_database SET datallowconn = true WHERE datname <> 'template0'\n",
            )?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("ERROR") {
            bail!("single-user mode on {} failed: {text}", self.name);
        }
        self.start()
    }

    /// Whether a new session of `user` can log in to `db`: `Ok(())`, or the server's
    /// refusal.
    pub fn try_login(&self, user: &str, db: &str) -> std::result::Result<(), String> {
        let out = self
            .psql_as(user, db, "select 1")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Runs SQL with psql as the `postgres` superuser; returns unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = self.psql_as("postgres", "postgres", sql).output()?;
        let out = check(out, &format!("psql on {}: {sql}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// psql running `sql` as `user` in `db`, stopping at the first error.
    fn psql_as(&self, user: &str, db: &str, sql: &str) -> Command {
        let mut c = Command::new(self.bin.bin("psql"));
        c.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", &self.host])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                db,
                "-c",
                sql,
            ]);
        c
    }

    fn append_conf(&self, text: &str) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }
}

/// A primary and its streaming standbys in one temp directory.
#[derive(Debug)]
pub struct Cluster {
    pub primary: Node,
    pub standbys: Vec<Node>,
    pub bin: PgBin,
    /// The network the nodes live in, for [`Cluster::start_in`] (dropped after them).
    pub net: Option<crate::netns::Net>,
    dir: Option<tempfile::TempDir>,
}

const HBA: &str = "\
local all all trust
host replication all 127.0.0.1/32 trust
host all md5_user 127.0.0.1/32 md5
host all scram_user 127.0.0.1/32 scram-sha-256
host all password_user 127.0.0.1/32 password
host all all 127.0.0.1/32 trust
";

impl Cluster {
    /// Starts a primary with `standbys` streaming standbys and waits until every standby
    /// is streaming.
    pub fn start(standbys: usize) -> Result<Self> {
        Self::start_with(standbys, None)
    }

    /// [`Cluster::start`] with each server in a network namespace of its own on `net`
    /// (`net.cut(…)` then partitions one silently). Every server has
    /// `synchronous_standby_names = '*'` in its configuration, so whichever is primary
    /// waits for a standby's flush before it acknowledges a commit.
    pub fn start_in(standbys: usize, net: crate::netns::Net) -> Result<Self> {
        Self::start_with(standbys, Some(net))
    }

    fn start_with(standbys: usize, mut net: Option<crate::netns::Net>) -> Result<Self> {
        let bin = PgBin::find()?;
        let dir = tempfile::Builder::new().prefix("handoff-pg-").tempdir()?;
        let root = dir.path().to_path_buf();
        bin.chown(&root)?;
        let mut node = |name: &str| -> Result<Node> {
            let net_host = match net.as_mut() {
                Some(net) => Some(net.host(name)?),
                None => None,
            };
            Ok(Node {
                name: name.to_string(),
                host: net_host
                    .as_ref()
                    .map_or_else(|| "127.0.0.1".to_string(), |h| h.addr.to_string()),
                net_host,
                // Bound only once the server starts, seconds later for a standby.
                port: free_port_outside_ephemeral()?,
                data: root.join(name),
                log: root.join(format!("{name}.log")),
                bin: bin.clone(),
                root: root.clone(),
                running: false,
            })
        };
        let primary = node("primary")?;
        let mut pending = (0..standbys)
            .map(|i| node(&format!("standby{}", i + 1)))
            .collect::<Result<Vec<_>>>()?;
        pending.reverse();
        // Servers in namespaces: reached over the bridge, commits synchronous, each
        // server named so pg_stat_replication tells them apart after any rejoin.
        let in_net = net.as_ref().map(|n| {
            (
                format!(
                    "host replication all {0} trust\nhost all all {0} trust\n",
                    n.cidr()
                ),
                "synchronous_standby_names = '*'\n".to_string(),
            )
        });
        let out = bin
            .server_cmd("initdb", &root)
            .arg("-D")
            .arg(&primary.data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()?;
        check(out, "initdb")?;
        let (hba_net, sync) = in_net.unwrap_or_default();
        std::fs::write(primary.data.join("pg_hba.conf"), format!("{HBA}{hba_net}"))?;
        primary.append_conf(&format!(
            "\nlisten_addresses = '{}'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nwal_level = replica\nmax_wal_senders = 10\nhot_standby = on\n\
             max_connections = 100\nshared_buffers = 32MB\nwal_keep_size = 128MB\nwal_log_hints = on\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n{sync}",
            primary.host,
            primary.port,
            root.display()
        ))?;
        if primary.net_host.is_some() {
            primary.append_conf("cluster_name = 'primary'\n")?;
        }
        let mut cluster = Cluster {
            primary,
            standbys: Vec::new(),
            bin: bin.clone(),
            net,
            dir: Some(dir),
        };
        cluster.primary.start()?;
        while let Some(mut s) = pending.pop() {
            let out = bin
                .server_cmd("pg_basebackup", &root)
                .args([
                    "-h",
                    &cluster.primary.host,
                    "-p",
                    &cluster.primary.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .arg("-D")
                .arg(&s.data)
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
                .output()?;
            check(out, "pg_basebackup")?;
            // Each standby streams under its own name (as Patroni's and repmgr's do),
            // so the primary can tell them apart in pg_stat_replication.
            s.append_conf(&format!(
                "\nport = {}\ncluster_name = '{}'\nlisten_addresses = '{}'\n",
                s.port, s.name, s.host
            ))?;
            s.start()?;
            cluster.standbys.push(s);
        }
        let want = standbys.to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while cluster
            .primary
            .psql("select count(*) from pg_stat_replication where state = 'streaming'")?
            != want
        {
            if std::time::Instant::now() > deadline {
                bail!("standbys did not start streaming within 30s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(cluster)
    }

    /// Promotes `standbys[i]` (`pg_ctl promote`, waiting until it accepts writes)
    /// without touching the primary: the test plays the HA system.
    pub fn promote(&self, i: usize) -> Result<()> {
        let s = &self.standbys[i];
        let out = self
            .bin
            .server_cmd("pg_ctl", &s.root)
            .arg("-D")
            .arg(&s.data)
            .args(["-w", "-t", "60", "promote"])
            .output()?;
        check(out, &format!("pg_ctl promote ({})", s.name)).map(|_| ())
    }

    /// Makes commits on the primary wait until a standby has flushed them
    /// (`synchronous_standby_names = '*'`), so an acknowledged write survives a crash of
    /// the primary. Set on the primary only: a promoted standby does not wait.
    pub fn make_synchronous(&self) -> Result<()> {
        self.primary
            .psql("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
        self.primary.psql("SELECT pg_reload_conf()")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self
            .primary
            .psql("select count(*) from pg_stat_replication where sync_state = 'sync'")?
            == "0"
        {
            if std::time::Instant::now() > deadline {
                bail!("no standby became synchronous within 10s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Records that `standbys[i]` is now the primary and the old primary a standby
    /// (roles only: run [`Cluster::rejoin`] to make the old primary replicate).
    pub fn swap(&mut self, i: usize) {
        std::mem::swap(&mut self.primary, &mut self.standbys[i]);
    }

    /// Makes `standbys[i]` — an old primary after a switchover — a streaming standby of
    /// the current primary: stop, `pg_rewind`, recovery settings, start, wait until it
    /// streams.
    pub fn rejoin(&mut self, i: usize) -> Result<()> {
        let source = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.primary.host, self.primary.port
        );
        // A just-promoted server's control file names its new timeline only after a
        // checkpoint, and pg_rewind reads the timeline from there.
        self.primary.psql("CHECKPOINT")?;
        let node = &mut self.standbys[i];
        node.stop("fast")?;
        let out = self
            .bin
            .server_cmd("pg_rewind", &node.root)
            .arg("-D")
            .arg(&node.data)
            .arg(format!("--source-server={source}"))
            .args(["-R", "--no-sync"])
            .output()?;
        check(out, &format!("pg_rewind ({})", node.name))?;
        // pg_rewind copies the source's configuration files: restore this node's own.
        node.append_conf(&format!(
            "\nport = {}\nlisten_addresses = '{}'\n",
            node.port, node.host
        ))?;
        if node.net_host.is_some() {
            node.append_conf(&format!("cluster_name = '{}'\n", node.name))?;
        }
        node.start()?;
        if self.standbys[i].net_host.is_some() {
            // Servers in namespaces are named: wait for this one only (another may be
            // on its way back too).
            return self.wait_streaming(i, std::time::Duration::from_secs(30));
        }
        let want = self.standbys.len().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self
            .primary
            .psql("select count(*) from pg_stat_replication where state = 'streaming'")?
            != want
        {
            if std::time::Instant::now() > deadline {
                bail!("the rejoined standby did not start streaming within 30s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until `standbys[i]` streams from the primary (by its `cluster_name`: servers
    /// started with [`Cluster::start_in`]).
    pub fn wait_streaming(&self, i: usize, within: std::time::Duration) -> Result<()> {
        let sql = format!(
            "select count(*) from pg_stat_replication where state = 'streaming' and application_name = '{}'",
            self.standbys[i].name
        );
        let deadline = std::time::Instant::now() + within;
        while self.primary.psql(&sql)? != "1" {
            if std::time::Instant::now() > deadline {
                bail!(
                    "{} did not stream from {} within {within:?}",
                    self.standbys[i].name,
                    self.primary.name
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until `standbys[i]` receives the primary's current timeline and has replayed
    /// what the primary had written when the wait began. Streaming alone does not say
    /// it follows: a standby that received WAL past the promotion point still connects
    /// (it asks for the old timeline from the start of a segment, which the new primary
    /// has and sends up to the switch), shows as `streaming`, and then replays nothing
    /// of the new timeline.
    pub fn wait_following(&self, i: usize, within: std::time::Duration) -> Result<()> {
        let tli = self.primary.timeline()?;
        let lsn = self.primary.psql("select pg_current_wal_lsn()")?;
        let sql = format!(
            "select coalesce((select received_tli from pg_stat_wal_receiver where status = 'streaming'), 0) = {tli} \
                and coalesce(pg_last_wal_replay_lsn() >= '{lsn}', false)"
        );
        let node = &self.standbys[i];
        let deadline = std::time::Instant::now() + within;
        while node.psql(&sql)? != "t" {
            if std::time::Instant::now() > deadline {
                bail!(
                    "{} did not follow {} (timeline {tli}, up to {lsn}) within {within:?}",
                    node.name,
                    self.primary.name
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Points `standbys[i]` at the current primary after a promotion it did not take
    /// part in (`primary_conninfo` and a reload; it follows the new timeline), and waits
    /// until it replays the new timeline ([`Cluster::wait_following`]); one that cannot
    /// follow (it received WAL past the promotion point) is rewound instead ([`Cluster::rejoin`]), which restarts it and so ends
    /// every session on it: `Ok(Some(when))` says when the restart began.
    pub fn follow(&mut self, i: usize) -> Result<Option<std::time::Instant>> {
        let conninfo = format!(
            "host={} port={} user=postgres application_name={}",
            self.primary.host, self.primary.port, self.standbys[i].name
        );
        let node = &self.standbys[i];
        let repointed = node
            .psql(&format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"))
            .and_then(|_| node.psql("SELECT pg_reload_conf()"));
        if repointed.is_ok()
            && self
                .wait_following(i, std::time::Duration::from_secs(5))
                .is_ok()
        {
            return Ok(None);
        }
        let restarting = std::time::Instant::now();
        self.rejoin(i).map(|()| Some(restarting))
    }

    /// The index of the standby the primary waits for (`sync_state = 'sync'`).
    pub fn sync_standby(&self) -> Result<usize> {
        let name = self.primary.psql(
            "select application_name from pg_stat_replication where sync_state = 'sync' limit 1",
        )?;
        self.standbys
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| anyhow!("no synchronous standby (pg_stat_replication names {name:?})"))
    }

    /// Creates pgbench's tables on the primary (`pgbench -i -s scale`).
    pub fn pgbench_init(&self, scale: u32) -> Result<()> {
        let out = self
            .pgbench(self.primary.port)
            .args(["-i", "-q", "-s", &scale.to_string()])
            .output()?;
        check(out, "pgbench -i").map(|_| ())
    }

    /// pgbench against `127.0.0.1:port` (a proxy's, or a server's) as `postgres`, on
    /// database `postgres` — given by libpq's environment variables, so the caller
    /// adds only pgbench's own options.
    pub fn pgbench(&self, port: u16) -> Command {
        let mut cmd = Command::new(self.bin.bin("pgbench"));
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres");
        cmd
    }

    /// The directory holding data directories and logs.
    pub fn dir(&self) -> &Path {
        self.primary.root.as_path()
    }

    /// The last `lines` lines of every server's log, each under its name.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for n in std::iter::once(&self.primary).chain(&self.standbys) {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            let _ = writeln!(
                s,
                "--- {} ({}) log, last lines ---",
                n.name,
                n.log.display()
            );
            for l in tail.iter().rev() {
                let _ = writeln!(s, "{l}");
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self
            .standbys
            .iter_mut()
            .chain(std::iter::once(&mut self.primary))
        {
            let _ = n.stop("immediate");
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "test failed: PostgreSQL files kept in {}\n{}",
                    kept.display(),
                    self.log_tails(60)
                );
            }
        }
    }
}
