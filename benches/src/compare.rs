//! `handoff-bench compare`: one command that starts a local primary + standby, handoff
//! (the release binary, as its own process) and, when installed, PgBouncer in
//! transaction mode, then runs the same workload directly, through PgBouncer and through
//! handoff, and prints one table with ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handoff_tests::pg::free_port;
use handoff_tests::Cluster;

use crate::run::{self, workload::Workload, RunArgs, TargetResult};

/// Options of `handoff-bench compare`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench compare")]
pub struct CompareArgs {
    #[arg(long, value_enum, default_value = "select")]
    pub workload: Workload,
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    #[arg(long, default_value = "10s", value_parser = run::events::parse_duration)]
    pub duration: Duration,
    /// Server connections per pool, for both poolers.
    #[arg(long, default_value_t = 20)]
    pub pool_size: usize,
    #[arg(long, default_value_t = 100_000)]
    pub accounts: i32,
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
    /// Also run handoff with TLS to its clients (`handoff-tls`, a certificate from a CA
    /// made for the run): the price of TLS.
    #[arg(long)]
    pub tls: bool,
}

pub struct Kill(Child);

impl Kill {
    /// Kills `child` when dropped.
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// The process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PgBouncer, for the side-by-side runs: found, or installed when this process may
/// (root or password-less sudo: see `handoff_tests::setup`). `None` after saying why
/// it is missing and how to install it; the runs then leave PgBouncer out.
pub fn pgbouncer_binary() -> Option<PathBuf> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| match handoff_tests::setup::pgbouncer() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{e:#}");
                None
            }
        })
        .clone()
}

pub async fn wait_listening(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub fn start_pgbouncer(cluster: &Cluster, bin: &Path, port: u16, pool_size: usize) -> Result<Kill> {
    start_pgbouncer_at(
        &cluster.bin,
        cluster.dir(),
        cluster.primary.port,
        bin,
        port,
        PgBouncerOpts {
            pool_size,
            admin: false,
            max_clients: 2000,
            scram: None,
        },
    )
}

/// PgBouncer's pool size, whether user `postgres` may use its console, its client
/// limit, and how clients log in: trust, or SCRAM-SHA-256 for one user against its
/// verifier (`scram`: user, `SCRAM-SHA-256$…`).
#[derive(Debug, Clone, Copy)]
pub struct PgBouncerOpts<'a> {
    pub pool_size: usize,
    pub admin: bool,
    pub max_clients: usize,
    pub scram: Option<(&'a str, &'a str)>,
}

/// PgBouncer on `port` in front of the server on `server_port`, its files in `dir`
/// (`pgbouncer.ini`, `pgbouncer-users.txt`, `pgbouncer.log`); with `admin`, user
/// `postgres` may use its console; up to `max_clients` clients. It ignores
/// `extra_float_digits`, as PgBouncer is set up for pgJDBC clients (which send it).
pub fn start_pgbouncer_at(
    pg: &handoff_tests::PgBin,
    dir: &Path,
    server_port: u16,
    bin: &Path,
    port: u16,
    opts: PgBouncerOpts<'_>,
) -> Result<Kill> {
    let PgBouncerOpts {
        pool_size,
        admin,
        max_clients,
        scram,
    } = opts;
    let ini = dir.join("pgbouncer.ini");
    let users = dir.join("pgbouncer-users.txt");
    let (auth_type, userlist) = match scram {
        Some((user, verifier)) => ("scram-sha-256", format!("\"{user}\" \"{verifier}\"\n")),
        None => ("trust", "\"postgres\" \"\"\n".to_string()),
    };
    std::fs::write(&users, userlist)?;
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host=127.0.0.1 port={server_port}\n[pgbouncer]\n{}listen_addr = 127.0.0.1\n\
             listen_port = {port}\nauth_type = {auth_type}\nauth_file = {}\npool_mode = transaction\n\
             max_client_conn = {max_clients}\ndefault_pool_size = {pool_size}\nunix_socket_dir =\n\
             ignore_startup_parameters = extra_float_digits\nlogfile = {}\n",
            if admin { "admin_users = postgres\n" } else { "" },
            users.display(),
            dir.join("pgbouncer.log").display()
        ),
    )?;
    pg.give_to_server_user(&ini)?;
    pg.give_to_server_user(&users)?;
    let child = pg
        .command_as_server_user(bin, dir)
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting pgbouncer")?;
    Ok(Kill(child))
}

/// A command running handoff's `bin` with none of the environment's `HANDOFF_*`
/// variables (the harness's own `HANDOFF_TEST_*` are not handoff's, which refuses
/// unknown ones) and no takeover socket: only what the caller sets applies.
pub fn handoff_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HANDOFF_") {
            cmd.env_remove(k);
        }
    }
    // No takeover socket unless the bench gives one (in its own directory): by
    // default it is a file in /tmp, which a killed process leaves behind.
    cmd.env("HANDOFF_TAKEOVER_SOCKET", "off");
    cmd
}

/// The release `handoff` binary in front of `cluster`: its primary, then its standbys
/// (candidates for a switchover); clients on `port`, the admin API on `admin`.
pub fn start_handoff(cluster: &Cluster, port: u16, admin: u16, pool_size: usize) -> Result<Kill> {
    start_handoff_with(cluster, port, admin, pool_size, &[])
}

/// [`start_handoff`] with more `HANDOFF_*` variables.
pub fn start_handoff_with(
    cluster: &Cluster,
    port: u16,
    admin: u16,
    pool_size: usize,
    extra: &[(&str, String)],
) -> Result<Kill> {
    let bin = std::env::current_exe()?.with_file_name("handoff");
    start_handoff_bin(&bin, cluster, port, admin, pool_size, extra)
}

/// [`start_handoff_with`] with a given binary (e.g. an older build).
pub fn start_handoff_bin(
    bin: &std::path::Path,
    cluster: &Cluster,
    port: u16,
    admin: u16,
    pool_size: usize,
    extra: &[(&str, String)],
) -> Result<Kill> {
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p handoff -p handoff-bench)",
            bin.display()
        );
    }
    let hosts: Vec<String> = std::iter::once(&cluster.primary)
        .chain(&cluster.standbys)
        .map(|n| n.addr())
        .collect();
    let child = handoff_command(bin)
        .env("HANDOFF_SHARDS", format!("main={}", hosts.join(",")))
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("HANDOFF_POOL_SIZE", pool_size.to_string())
        .env("HANDOFF_MAX_CLIENT_CONN", "5000")
        .env("HANDOFF_LOG", "warn")
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .spawn()
        .context("starting handoff")?;
    Ok(Kill(child))
}

/// The comparison table: every target with its ratio to direct and to PgBouncer.
/// Throughput, latency, errors, the ratios to direct and to PgBouncer, and CPU per
/// transaction; a column with nothing to show (no PgBouncer run, no CPU measured) is
/// left out.
pub fn ratio_table(results: &[TargetResult]) -> String {
    let tps = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.summary.tps)
    };
    let direct = tps("direct");
    let pgbouncer = tps("pgbouncer");
    let with_cpu = results.iter().any(|r| r.cpu_us_per_txn.is_some());
    let mut s = format!(
        "{:<16} {:>10} {:>8} {:>8} {:>9} {:>7} {:>10}",
        "target", "tps", "p50 ms", "p99 ms", "max ms", "errors", "/ direct",
    );
    if pgbouncer.is_some() {
        s.push_str(&format!(" {:>12}", "/ pgbouncer"));
    }
    if with_cpu {
        s.push_str(&format!(" {:>12}", "cpu µs/txn"));
    }
    s.push('\n');
    for r in results {
        let m = &r.summary;
        let ratio = |base: Option<f64>| match base {
            Some(b) if b > 0.0 => format!("{:.2}", m.tps / b),
            _ => "-".to_string(),
        };
        s.push_str(&format!(
            "{:<16} {:>10.1} {:>8.2} {:>8.2} {:>9.2} {:>7} {:>10}",
            r.name,
            m.tps,
            m.p50,
            m.p99,
            m.max,
            m.errors,
            ratio(direct),
        ));
        if pgbouncer.is_some() {
            s.push_str(&format!(" {:>12}", ratio(pgbouncer)));
        }
        if with_cpu {
            let cpu = r
                .cpu_us_per_txn
                .map_or("-".to_string(), |c| format!("{c:.1}"));
            s.push_str(&format!(" {:>12}", cpu));
        }
        s.push('\n');
    }
    s
}

pub async fn compare(args: CompareArgs) -> Result<()> {
    let cluster = tokio::task::block_in_place(|| Cluster::start(1))?;
    // The proxies' processes: their CPU time per transaction goes in the table.
    let mut cpu_of = Vec::new();
    let mut targets = vec![(
        "direct".to_string(),
        format!("postgres://postgres@{}/postgres", cluster.primary.addr()),
    )];
    let _pgbouncer = match pgbouncer_binary() {
        Some(bin) => {
            let port = free_port()?;
            let child = start_pgbouncer(&cluster, &bin, port, args.pool_size)?;
            wait_listening(port, "pgbouncer").await?;
            cpu_of.push(("pgbouncer".to_string(), child.pid()));
            targets.push((
                "pgbouncer".into(),
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            ));
            Some(child)
        }
        None => {
            eprintln!("pgbouncer is not installed: comparing direct and handoff only (apt-get install pgbouncer)");
            None
        }
    };
    let port = free_port()?;
    let handoff = start_handoff(&cluster, port, free_port()?, args.pool_size)?;
    wait_listening(port, "handoff").await?;
    cpu_of.push(("handoff".to_string(), handoff.pid()));
    targets.push((
        "handoff".into(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    ));
    let _handoff_tls = if args.tls {
        let ca = handoff_tests::tls::TestCa::new("handoff-bench CA")?;
        let (cert, key) = ca.issue(&["localhost"])?;
        let dir = cluster.dir();
        let (ca_file, cert_file, key_file) = (
            dir.join("bench-ca.pem"),
            dir.join("bench.crt"),
            dir.join("bench.key"),
        );
        std::fs::write(&ca_file, &ca.cert_pem)?;
        std::fs::write(&cert_file, cert)?;
        std::fs::write(&key_file, key)?;
        let port = free_port()?;
        let child = start_handoff_with(
            &cluster,
            port,
            free_port()?,
            args.pool_size,
            &[
                ("HANDOFF_TLS_MODE", "require".into()),
                ("HANDOFF_TLS_CERT", cert_file.display().to_string()),
                ("HANDOFF_TLS_KEY", key_file.display().to_string()),
            ],
        )?;
        wait_listening(port, "handoff (TLS)").await?;
        cpu_of.push(("handoff-tls".to_string(), child.pid()));
        targets.push((
            "handoff-tls".into(),
            format!(
                "postgres://postgres@localhost:{port}/postgres?sslmode=require&sslrootcert={}",
                ca_file.display()
            ),
        ));
        Some(child)
    } else {
        None
    };

    let run_args = RunArgs {
        targets,
        workload: args.workload,
        clients: args.clients,
        duration: args.duration,
        rate: None,
        events: Vec::new(),
        accounts: args.accounts,
        out: args.out.clone(),
        quiet: args.quiet,
        target_events: Vec::new(),
        bypass: Vec::new(),
        cpu_of,
        meta: Vec::new(),
    };
    let results = run::run(run_args).await?;
    println!();
    print!("{}", ratio_table(&results));
    Ok(())
}

/// Options of `handoff-bench pgbouncer-switchover`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench pgbouncer-switchover")]
pub struct SwitchoverArgs {
    #[arg(long, value_enum, default_value = "tpcb")]
    pub workload: Workload,
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    #[arg(long, default_value = "12s", value_parser = run::events::parse_duration)]
    pub duration: Duration,
    /// When the switchover starts.
    #[arg(long, default_value = "4s", value_parser = run::events::parse_duration)]
    pub at: Duration,
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

/// The reference for later issues: a planned switchover behind PgBouncer the way it is
/// done by hand — PAUSE, stop the primary, promote the standby, point PgBouncer at it,
/// RELOAD, RESUME — injected with `--event` into a load run.
pub async fn pgbouncer_switchover(args: SwitchoverArgs) -> Result<()> {
    let cluster = tokio::task::block_in_place(|| Cluster::start(1))?;
    let port = free_port()?;
    let (_pgb, script) = pgbouncer_for_switchover(&cluster, port).await?;
    let run_args = RunArgs {
        targets: vec![(
            "pgbouncer".into(),
            format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        )],
        workload: args.workload,
        clients: args.clients,
        duration: args.duration,
        rate: None,
        events: vec![run::events::Event {
            at: args.at,
            command: script,
        }],
        accounts: 100_000,
        out: args.out,
        quiet: args.quiet,
        target_events: Vec::new(),
        bypass: Vec::new(),
        cpu_of: Vec::new(),
        meta: Vec::new(),
    };
    let results = run::run(run_args).await?;
    for r in &results {
        for e in &r.events {
            println!(
                "switchover ran {:.2}s..{:.2}s (exit {:?}){}",
                e.started,
                e.ended,
                e.exit_code,
                if e.exit_code == Some(0) {
                    String::new()
                } else {
                    format!(": {}", e.output)
                }
            );
        }
    }
    Ok(())
}

/// PgBouncer in front of `cluster`'s primary on `port`, with its admin console, and the
/// shell script of a manual switchover behind it: PAUSE, stop the primary, promote the
/// standby, point PgBouncer at it, RELOAD, RESUME.
pub async fn pgbouncer_for_switchover(cluster: &Cluster, port: u16) -> Result<(Kill, String)> {
    let Some(bin) = pgbouncer_binary() else {
        bail!("pgbouncer is not installed (apt-get install pgbouncer)");
    };
    let pgb = start_pgbouncer(cluster, &bin, port, 20)?;
    // The admin console needs an admin user.
    let ini = cluster.dir().join("pgbouncer.ini");
    let text = std::fs::read_to_string(&ini)?
        .replace("[pgbouncer]\n", "[pgbouncer]\nadmin_users = postgres\n");
    std::fs::write(&ini, text)?;
    let console = format!(
        "{} -X -q -h 127.0.0.1 -p {port} -U postgres pgbouncer -c",
        cluster.bin.bin("psql").display()
    );
    wait_listening(port, "pgbouncer").await?;
    psql_ok(&format!("{console} RELOAD"))?;
    let as_pg = as_server_user();
    let pg_ctl = cluster.bin.bin("pg_ctl");
    let script = format!(
        "set -e; {console} PAUSE; \
         {as_pg}{pg_ctl} -D {primary} -m fast -w stop; \
         {as_pg}{pg_ctl} -D {standby} -w promote; \
         sed -i 's/port={old}/port={new}/' {ini}; \
         {console} RELOAD; {console} RESUME",
        pg_ctl = pg_ctl.display(),
        primary = cluster.primary.data.display(),
        standby = cluster.standbys[0].data.display(),
        old = cluster.primary.port,
        new = cluster.standbys[0].port,
        ini = ini.display(),
    );
    Ok((pgb, script))
}

fn psql_ok(cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The prefix that runs a server command as the `postgres` user when we are root (the
/// harness's clusters belong to it).
pub fn as_server_user() -> &'static str {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(1)
        == 0;
    if root {
        "runuser -u postgres -- "
    } else {
        ""
    }
}
