//! A real repmgr cluster for tests: N PostgreSQL nodes registered with repmgr (Debian's
//! `postgresql-<major>-repmgr`, installed on first use), optionally a `repmgrd` on each,
//! and an `sshd` of its own on a free loopback port, with key-based SSH for the server
//! user to localhost: `repmgr standby switchover` drives the old primary over SSH. With
//! [`crate::paf::Hold`], repmgr stops a primary through the project's `deploy/pg_ctl`
//! (`handoff hold` first) and reports its events with `handoff recheck`. Everything is
//! stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::paf::Hold;
use crate::pg::{free_port, PgBin};

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// repmgr stops primaries through handoff's pg_ctl and reports events to handoff.
    pub hold: Option<Hold>,
    /// A `repmgrd` on every node (automatic failover).
    pub repmgrd: bool,
}

/// One node.
#[derive(Debug)]
pub struct Node {
    pub id: u32,
    pub name: String,
    pub port: u16,
    data: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    repmgrd: Option<Child>,
}

impl Node {
    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A tokio-postgres connection string to this node.
    pub fn conn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            self.port
        )
    }
}

#[derive(Debug)]
pub struct RepmgrCluster {
    pub nodes: Vec<Node>,
    bin: PgBin,
    /// The directory of repmgr's binaries.
    repmgr_bin: PathBuf,
    sshd: Option<Child>,
    sshd_log: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl RepmgrCluster {
    /// Starts `n` nodes: node1 the primary, the others standbys cloned from it and
    /// registered. Returns once every standby streams.
    pub fn start(n: usize, opts: Options) -> Result<Self> {
        let bin = PgBin::find()?;
        let major = bin.major();
        crate::setup::repmgr(&major, &bin.dir)?;
        let dir = tempfile::Builder::new()
            .prefix("handoff-repmgr-")
            .tempdir()?;
        bin.give_to_server_user(dir.path())?;
        let root = dir.path().to_path_buf();
        let ssh_port = free_port()?;
        let sshd_log = root.join("sshd.log");
        let sshd = start_sshd(&bin, &root, ssh_port, &sshd_log)?;
        let ssh_options = format!(
            "-q -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -p {ssh_port} -i {}",
            root.join("id").display()
        );
        let mut c = Self {
            nodes: Vec::new(),
            repmgr_bin: bin.dir.clone(),
            bin,
            sshd: Some(sshd),
            sshd_log,
            dir: Some(dir),
        };
        for i in 1..=n as u32 {
            c.nodes.push(Node {
                id: i,
                name: format!("node{i}"),
                port: free_port()?,
                data: root.join(format!("node{i}")),
                conf: root.join(format!("node{i}.conf")),
                log: root.join(format!("node{i}.log")),
                repmgrd: None,
            });
        }
        for i in 0..n {
            c.write_conf(i, &ssh_options, &opts)?;
        }
        c.init_primary()?;
        c.repmgr(0, &["primary", "register"])?;
        for i in 1..n {
            let port = c.nodes[0].port.to_string();
            c.repmgr(
                i,
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "standby",
                    "clone",
                    "--fast-checkpoint",
                ],
            )?;
            let extra = format!("\nport = {}\n", c.nodes[i].port);
            append(&c.nodes[i].data.join("postgresql.conf"), &extra)?;
            c.pg_ctl(i, &["-w", "start"])?;
            c.repmgr(i, &["standby", "register"])?;
        }
        c.wait_streaming(Duration::from_secs(60))?;
        if opts.repmgrd {
            for i in 0..n {
                c.run_repmgrd(i)?;
            }
        }
        Ok(c)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    fn write_conf(&self, i: usize, ssh_options: &str, opts: &Options) -> Result<()> {
        let n = &self.nodes[i];
        let b = self.repmgr_bin.display();
        let mut conf = format!(
            "node_id={id}\nnode_name='{name}'\n\
             conninfo='host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2'\n\
             data_directory='{data}'\npg_bindir='{pg}'\nrepmgr_bindir='{b}'\n\
             ssh_options='{ssh_options}'\nuse_replication_slots=yes\n\
             failover=automatic\n\
             promote_command='{b}/repmgr standby promote -f {conf} --log-to-file'\n\
             follow_command='{b}/repmgr standby follow -f {conf} --log-to-file --upstream-node-id=%n'\n\
             log_file='{log}'\nrepmgrd_pid_file='{pid}'\nmonitor_interval_secs=1\nreconnect_attempts=2\nreconnect_interval=1\n\
             standby_reconnect_timeout=60\n",
            id = n.id,
            name = n.name,
            port = n.port,
            data = n.data.display(),
            pg = self.bin.dir.display(),
            conf = n.conf.display(),
            log = self.dir().join(format!("{}.repmgr.log", n.name)).display(),
            pid = self.dir().join(format!("{}.repmgrd.pid", n.name)).display(),
        );
        if let Some(h) = &opts.hold {
            let script = self.dir().join("pg_ctl");
            if !script.exists() {
                install_script(&self.bin, &script)?;
            }
            conf.push_str(&format!(
                "service_stop_command='HANDOFF_SHARD={shard} HANDOFF_ADMIN={admin} HANDOFF_BIN={handoff} HANDOFF_HOLD_TIMEOUT={t} HANDOFF_PG_CTL={pg_ctl} {script} -D {data} -m fast -W stop'\n\
                 event_notification_command='{handoff} recheck --shard {shard} --admin {admin} --event %e'\n",
                shard = h.shard,
                admin = h.admin,
                handoff = h.handoff.display(),
                t = h.timeout,
                pg_ctl = self.bin.bin("pg_ctl").display(),
                script = script.display(),
                data = n.data.display(),
            ));
        }
        std::fs::write(&n.conf, conf)?;
        self.bin.give_to_server_user(&n.conf)?;
        Ok(())
    }

    fn init_primary(&self) -> Result<()> {
        let n = &self.nodes[0];
        let out = self
            .server(&self.bin.bin("initdb"))
            .arg("-D")
            .arg(&n.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .arg("--locale=C")
            .output()?;
        check(out, "initdb")?;
        append(
            &n.data.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        )?;
        append(
            &n.data.join("postgresql.conf"),
            &format!(
                "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
                 fsync = off\nwal_level = replica\nhot_standby = on\nmax_wal_senders = 10\n\
                 max_replication_slots = 10\nwal_log_hints = on\nshared_preload_libraries = 'repmgr'\n\
                 max_connections = 100\nshared_buffers = 32MB\n",
                n.port,
                self.dir().display()
            ),
        )?;
        self.pg_ctl(0, &["-w", "start"])?;
        Ok(())
    }

    /// A command run as the server user, in this cluster's directory.
    fn server(&self, program: &Path) -> Command {
        let mut c = self.bin.command_as_server_user(program, self.dir());
        c.stdin(Stdio::null());
        c
    }

    fn pg_ctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        let n = &self.nodes[i];
        let out = self
            .server(&self.bin.bin("pg_ctl"))
            .arg("-D")
            .arg(&n.data)
            .arg("-l")
            .arg(&n.log)
            .args(args)
            .output()?;
        check(out, &format!("pg_ctl {} ({})", args.join(" "), n.name))
    }

    /// `repmgr -f <node i's conf> <args>` as the server user; fails unless it succeeds.
    pub fn repmgr(&self, i: usize, args: &[&str]) -> Result<Output> {
        let out = self.repmgr_output(i, args)?;
        check(
            out,
            &format!("repmgr {} ({})", args.join(" "), self.nodes[i].name),
        )
    }

    /// `repmgr -f <node i's conf> <args>` as the server user, whatever it returns.
    pub fn repmgr_output(&self, i: usize, args: &[&str]) -> Result<Output> {
        self.server(&self.repmgr_bin.join("repmgr"))
            .arg("-f")
            .arg(&self.nodes[i].conf)
            .args(args)
            .output()
            .context("repmgr")
    }

    /// `HANDOFF_REPMGR_SWITCHOVER_COMMAND` for this cluster: `repmgr standby switchover`
    /// with the candidate's configuration (`%i`), as the server user.
    pub fn switchover_command(&self) -> String {
        let as_user = if crate::pg::running_as_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{as_user}{} -f {}/node%i.conf standby switchover --siblings-follow",
            self.repmgr_bin.join("repmgr").display(),
            self.dir().display()
        )
    }

    /// `postgres://postgres@127.0.0.1:<port>,…/postgres` (for HANDOFF_REPMGR).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(Node::addr).collect();
        format!("postgres://postgres@{}/postgres", hosts.join(","))
    }

    /// Starts a `repmgrd` for node `i` (automatic failover).
    pub fn run_repmgrd(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join(format!("{}.repmgrd.log", n.name)))?;
        let child = self
            .server(&self.repmgr_bin.join("repmgrd"))
            .arg("-f")
            .arg(&n.conf)
            .arg("--daemonize=false")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting repmgrd")?;
        self.nodes[i].repmgrd = Some(child);
        Ok(())
    }

    /// The index of the node that is out of recovery, if exactly one is.
    pub fn primary(&self) -> Option<usize> {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.psql(i, "select not pg_is_in_recovery()")
                    .ok()
                    .as_deref()
                    == Some("t")
            })
            .collect();
        (up.len() == 1).then(|| up[0])
    }

    /// One node out of recovery with every other node streaming from it.
    pub fn wait_streaming(&self, timeout: Duration) -> Result<()> {
        let want = (self.nodes.len() - 1).to_string();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.primary() {
                let streaming = self
                    .psql(
                        p,
                        "select count(*) from pg_stat_replication where state = 'streaming'",
                    )
                    .ok();
                if streaming.as_deref() == Some(want.as_str()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "repmgr: the standbys did not stream within {timeout:?}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills node `i`'s PostgreSQL with SIGKILL (a machine dying; its repmgrd too).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].repmgrd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        crate::kill_postmaster(&self.nodes[i].data);
    }

    /// Stops node `i`'s PostgreSQL (fast).
    pub fn stop(&self, i: usize) -> Result<()> {
        self.pg_ctl(i, &["-m", "fast", "-w", "stop"]).map(|_| ())
    }

    /// Starts node `i`'s PostgreSQL again.
    pub fn restart(&self, i: usize) -> Result<()> {
        self.pg_ctl(i, &["-w", "start"]).map(|_| ())
    }

    /// Takes the server user's SSH key out of sshd's authorized keys (`false`) or puts it
    /// back: without it `repmgr standby switchover` cannot reach the old primary and
    /// refuses.
    pub fn allow_ssh(&self, allowed: bool) -> Result<()> {
        let (on, off) = (
            self.dir().join("authorized_keys"),
            self.dir().join("authorized_keys.off"),
        );
        if allowed {
            std::fs::rename(off, on)?;
        } else {
            std::fs::rename(on, off)?;
        }
        Ok(())
    }

    /// Rows of `sql` on node `i` (psql, unaligned).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.bin("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.nodes[i].port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", sql])
            .env("PGCONNECT_TIMEOUT", "3")
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The last lines of every node's logs and sshd's.
    pub fn log_tails(&self) -> String {
        let mut s = crate::log_tail("sshd", &self.sshd_log, 10);
        for n in &self.nodes {
            s.push_str(&crate::log_tail(&n.name, &n.log, 15));
            let repmgr = self.dir().join(format!("{}.repmgr.log", n.name));
            s.push_str(&crate::log_tail(&format!("{} repmgr", n.name), &repmgr, 20));
            let repmgrd = self.dir().join(format!("{}.repmgrd.log", n.name));
            s.push_str(&crate::log_tail(
                &format!("{} repmgrd", n.name),
                &repmgrd,
                15,
            ));
        }
        s
    }
}

impl Drop for RepmgrCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.repmgrd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for i in 0..self.nodes.len() {
            let _ = self.pg_ctl(i, &["-m", "immediate", "-w", "-t", "10", "stop"]);
            crate::kill_postmaster(&self.nodes[i].data);
        }
        if let Some(mut s) = self.sshd.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        if let Some(d) = self.dir.take() {
            if std::env::var_os("HANDOFF_TEST_KEEP_LOGS").is_some() {
                eprintln!("repmgr logs kept in {}", d.keep().display());
            }
        }
    }
}

/// An sshd of the test's own on `127.0.0.1:port` (foreground, its own host key), and a
/// key for the server user it accepts (`<dir>/id`).
fn start_sshd(bin: &PgBin, dir: &Path, port: u16, log: &Path) -> Result<Child> {
    let keygen = |key: &Path, as_server: bool| -> Result<()> {
        let mut c = if as_server {
            bin.command_as_server_user(Path::new("/usr/bin/ssh-keygen"), dir)
        } else {
            Command::new("/usr/bin/ssh-keygen")
        };
        let out = c
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(key)
            .output()
            .context("ssh-keygen")?;
        check(out, "ssh-keygen").map(|_| ())
    };
    keygen(&dir.join("hostkey"), false)?;
    keygen(&dir.join("id"), true)?;
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    // sshd's privilege separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/hostkey\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM yes\nAllowUsers postgres\n",
            dir = dir.display()
        ),
    )?;
    let log_file = std::fs::File::create(log)?;
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .context("starting sshd")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "sshd did not listen within 10s: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// The project's `deploy/pg_ctl`, copied where the server user can run it.
fn install_script(bin: &PgBin, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pg_ctl");
    std::fs::copy(&script, to).with_context(|| format!("copying {}", script.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    bin.give_to_server_user(to)
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
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
