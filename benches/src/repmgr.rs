//! `handoff-bench repmgr`: one switchover under load on a real two-node repmgr cluster
//! (Debian's repmgr 5, an sshd of its own for `repmgr standby switchover`), each target
//! on a fresh cluster:
//! - `handoff`: `POST /v1/shards/main/switchover {"to": "node2"}` to the release handoff
//!   (which holds and lameducks, then runs `repmgr standby switchover` on node2);
//! - `handoff-hook`: the same with `HANDOFF_REPMGR_HOOK=true`: handoff runs the
//!   switchover first and holds when repmgr stops the primary through handoff's pg_ctl;
//! - `repmgr-pgctl`: `repmgr standby switchover` on node2, repmgr stopping the primary
//!   through handoff's pg_ctl (`deploy/pg_ctl`: `handoff hold` first);
//! - `pgbouncer`: PgBouncer paused around repmgr's switchover, the floor of a scripted
//!   procedure: `PAUSE`, `repmgr standby switchover`, poll the new primary until it takes
//!   a write, repoint, `RELOAD`, `RESUME`;
//! - `direct`: clients with a libpq multi-host URL (`target_session_attrs=read-write`),
//!   `repmgr standby switchover`.
//!
//! Besides the load's figures it measures repmgr's own write gap in each run (an
//! `INSERT` on each node directly every 10 ms: the old primary's last accepted write to
//! the new one's first).

use anyhow::{bail, Context, Result};
use handoff_tests::paf::Hold;
use handoff_tests::pg::{free_port, PgBin};
use handoff_tests::repmgr::{Options, RepmgrCluster};

use crate::compare::{wait_listening, Kill};
use crate::patroni::{measure_two_nodes, Measured, TwoNodes};

/// Options of `handoff-bench repmgr`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench repmgr")]
pub struct Args {
    /// Which of handoff, handoff-hook, repmgr-pgctl, pgbouncer, direct to run (comma
    /// separated).
    #[arg(
        long,
        default_value = "handoff,handoff-hook,repmgr-pgctl,pgbouncer,direct"
    )]
    pub targets: String,
    #[command(flatten)]
    pub load: crate::patroni::TwoNodeLoad,
}

const TARGETS: [&str; 5] = [
    "handoff",
    "handoff-hook",
    "repmgr-pgctl",
    "pgbouncer",
    "direct",
];

pub async fn run(args: Args) -> Result<()> {
    let wanted = crate::patroni::targets(&args.targets, &TARGETS)?;
    let mut measured = Vec::new();
    for name in &wanted {
        measured.push(one(&args, name).await?);
    }
    crate::patroni::report(&measured, "repmgr's own write gap in that run (old primary's last write to the new primary's first, measured directly)");
    Ok(())
}

/// The release handoff in front of a repmgr cluster.
fn start_handoff(
    c: &RepmgrCluster,
    port: u16,
    admin: u16,
    pool: usize,
    hook: bool,
) -> Result<Kill> {
    let bin = std::env::current_exe()?.with_file_name("handoff");
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p handoff -p handoff-bench",
            bin.display()
        );
    }
    let child = crate::compare::handoff_command(&bin)
        .env("HANDOFF_SHARDS", "main")
        .env("HANDOFF_REPMGR", format!("main={}", c.url()))
        .env("HANDOFF_REPMGR_SWITCHOVER_COMMAND", c.switchover_command())
        .env("HANDOFF_SWITCHOVER_TIMEOUT", "60s")
        .env("HANDOFF_REPMGR_HOOK", hook.to_string())
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
    // repmgr's service_stop_command runs as the server user: its own copy of the binary
    // (its directory also holds PgBouncer's files).
    let release = std::env::current_exe()?.with_file_name("handoff");
    let (dir, copy) = handoff_tests::patroni::server_user_copy(&release)
        .context("copying the release handoff binary for repmgr's stop command")?;
    let opts = Options {
        repmgrd: false,
        hold: matches!(name, "handoff" | "handoff-hook" | "repmgr-pgctl").then(|| Hold {
            shard: "main".into(),
            admin: format!("127.0.0.1:{admin}"),
            handoff: copy,
            timeout: "2s".into(),
        }),
    };
    let cluster = tokio::task::block_in_place(|| RepmgrCluster::start(2, opts))?;
    let (old, new) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ctl = cluster.switchover_command().replace("%i", "2");
    let own = match name {
        "handoff" | "handoff-hook" | "repmgr-pgctl" => {
            let hook = name == "handoff-hook";
            let kill = start_handoff(&cluster, port, admin, args.load.pool_size, hook)?;
            wait_listening(port, "handoff").await?;
            let command = if name.starts_with("handoff") {
                format!(
                    "POST http://127.0.0.1:{admin}/v1/shards/main/switchover {{\"to\": \"node2\"}}"
                )
            } else {
                ctl.clone()
            };
            Some((kill, command))
        }
        _ => None,
    };
    let nodes = TwoNodes {
        old: (old.addr(), old.port),
        new: (new.addr(), new.port),
        old_conn: old.conn(),
    };
    let measured =
        measure_two_nodes(&args.load, name, (&bin, dir.path()), nodes, port, ctl, own).await;
    drop(cluster);
    measured
}
