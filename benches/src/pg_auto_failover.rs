//! `handoff-bench pg-auto-failover`: one switchover under load on a real two-node
//! pg_auto_failover formation (Debian's pg_autoctl: a monitor and two keepers), each
//! target on a fresh formation:
//! - `handoff`: `POST /v1/shards/main/switchover {"to": "node_2"}` to the release handoff
//!   (which holds and lameducks, then calls `perform_promotion` on the monitor);
//! - `pg_autoctl`: `pg_autoctl perform switchover`; handoff holds when the monitor assigns
//!   the primary `draining`;
//! - `pg_autoctl-pgctl`: the same, the keepers running handoff's pg_ctl
//!   (`deploy/pg_ctl`: `handoff hold` before PostgreSQL stops);
//! - `pgbouncer`: PgBouncer paused around the monitor's switchover, the floor of a
//!   scripted procedure: `PAUSE`, `pg_autoctl perform switchover`, poll the new primary
//!   until it takes a write (a temporary table: leaving recovery is not enough, see
//!   below), repoint, `RELOAD`, `RESUME`;
//! - `direct`: clients with a libpq multi-host URL (`target_session_attrs=read-write`),
//!   `pg_autoctl perform switchover`.
//!
//! Besides the load's figures it measures the monitor's own write gap in each run (an
//! `INSERT` on each node directly every 10 ms: the old primary's last accepted write to
//! the new one's first). A real write: a node pg_auto_failover has promoted stays
//! read-only (`stop_replication`) until the monitor assigns it `wait_primary`, so
//! leaving recovery is not yet taking writes.

use anyhow::{bail, Context, Result};
use handoff_tests::paf::{AutoFailoverCluster, Hold, Options};
use handoff_tests::pg::{free_port, PgBin};

use crate::compare::{wait_listening, Kill};
use crate::patroni::{measure_two_nodes, Measured, TwoNodes};

/// Options of `handoff-bench pg-auto-failover`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench pg-auto-failover")]
pub struct Args {
    /// Which of handoff, pg_autoctl, pg_autoctl-pgctl, pgbouncer, direct to run (comma
    /// separated).
    #[arg(
        long,
        default_value = "handoff,pg_autoctl,pg_autoctl-pgctl,pgbouncer,direct"
    )]
    pub targets: String,
    #[command(flatten)]
    pub load: crate::patroni::TwoNodeLoad,
}

const TARGETS: [&str; 5] = [
    "handoff",
    "pg_autoctl",
    "pg_autoctl-pgctl",
    "pgbouncer",
    "direct",
];

pub async fn run(args: Args) -> Result<()> {
    let wanted = crate::patroni::targets(&args.targets, &TARGETS)?;
    let mut measured = Vec::new();
    for name in &wanted {
        measured.push(one(&args, name).await?);
    }
    crate::patroni::report(&measured, "the monitor's own write gap in that run (old primary's last write to the new primary's first, measured directly)");
    Ok(())
}

/// The release handoff in front of a formation.
fn start_handoff(c: &AutoFailoverCluster, port: u16, admin: u16, pool: usize) -> Result<Kill> {
    let bin = std::env::current_exe()?.with_file_name("handoff");
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p handoff -p handoff-bench",
            bin.display()
        );
    }
    let child = crate::compare::handoff_command(&bin)
        .env("HANDOFF_SHARDS", "main")
        .env(
            "HANDOFF_PG_AUTO_FAILOVER",
            format!("main={}", c.monitor_url()),
        )
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("HANDOFF_POOL_SIZE", pool.to_string())
        .env("HANDOFF_MAX_CLIENT_CONN", "5000")
        .env("HANDOFF_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting handoff")?;
    Ok(Kill::new(child))
}

async fn one(args: &Args, name: &str) -> Result<Measured> {
    let port = free_port()?;
    let admin = handoff_tests::pg::free_port_outside_ephemeral()?;
    let bin = PgBin::find()?;
    // The keepers' pg_ctl runs as the server user: its own copy of the binary (its
    // directory also holds PgBouncer's files).
    let release = std::env::current_exe()?.with_file_name("handoff");
    let (dir, copy) = handoff_tests::patroni::server_user_copy(&release)
        .context("copying the release handoff binary for the keepers' pg_ctl")?;
    let opts = Options {
        hold: name.ends_with("-pgctl").then(|| Hold {
            shard: "main".into(),
            admin: format!("127.0.0.1:{admin}"),
            handoff: copy,
            timeout: "2s".into(),
        }),
    };
    let cluster = tokio::task::block_in_place(|| AutoFailoverCluster::start(2, opts))?;
    let (old, new) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ctl = format!(
        "{}{}",
        crate::compare::as_server_user(),
        cluster.ctl_monitor_shell("perform switchover")
    );
    let own = match name {
        "handoff" | "pg_autoctl" | "pg_autoctl-pgctl" => {
            let kill = start_handoff(&cluster, port, admin, args.load.pool_size)?;
            wait_listening(port, "handoff").await?;
            let command = if name == "handoff" {
                format!(
                    "POST http://127.0.0.1:{admin}/v1/shards/main/switchover {{\"to\": \"node_2\"}}"
                )
            } else {
                ctl.clone()
            };
            Some((kill, command))
        }
        _ => None,
    };
    let nodes = TwoNodes {
        old: (old.addr(), old.pg_port),
        new: (new.addr(), new.pg_port),
        old_conn: old.conn(),
    };
    let measured =
        measure_two_nodes(&args.load, name, (&bin, dir.path()), nodes, port, ctl, own).await;
    drop(cluster);
    measured
}
