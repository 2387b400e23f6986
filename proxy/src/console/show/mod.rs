//! The console's `SHOW` commands. Where a concept is PgBouncer's, the columns are
//! PgBouncer 1.18's, in its order and with its meaning, so that monitoring written for
//! PgBouncer reads handoff; handoff's own columns come after them.

use std::time::{Duration, SystemTime};

use handoff_protocol::backend::ColumnType::{self, Int8 as I, Text as T};
use handoff_protocol::error::ProxyError;
use handoff_protocol::sqlstate;

use super::{Ctx, Out};
use crate::backend::pool::PoolSnapshot;
use crate::clients::{ClientState, Totals};
use crate::config::PoolMode;

type Row = Vec<Option<String>>;

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// `2026-12-01 18:20:16 UTC`, as PgBouncer writes times.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    let u = crate::utc::Utc::of(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        u.year, u.month, u.day, u.hour, u.minute, u.second
    )
}

fn pool_mode(ctx: &Ctx) -> &'static str {
    match ctx.config.pool_mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

/// `SHOW <what>`.
pub(crate) fn show(ctx: &Ctx, what: &str, out: &mut Out) -> Result<(), ProxyError> {
    match what {
        "POOLS" => pools(ctx, out),
        "CLIENTS" => clients(ctx, out),
        "SERVERS" => servers(ctx, out),
        "STATS" => stats(ctx, out),
        "STATS_TOTALS" => stats_totals(ctx, out, false),
        "STATS_AVERAGES" => stats_totals(ctx, out, true),
        "DATABASES" => databases(ctx, out),
        "CONFIG" => config(ctx, out),
        "VERSION" => out.table(
            &[("version", T)],
            &[vec![s(format!("handoff {}", env!("CARGO_PKG_VERSION")))]],
        ),
        "LISTS" => lists(ctx, out),
        "SHARDS" => shards(ctx, out),
        "STANDBYS" => standbys(ctx, out),
        "MANAGERS" => managers(ctx, out),
        "BUFFERS" => buffers(ctx, out),
        "HELP" => out.table(
            &[("command", T), ("what", T)],
            &HELP
                .iter()
                .map(|(c, w)| vec![s(c), s(w)])
                .collect::<Vec<_>>(),
        ),
        other => {
            return Err(ProxyError::error(
                sqlstate::SYNTAX_ERROR,
                format!("SHOW {other}: not a console command"),
            )
            .hint("SHOW HELP lists them"))
        }
    }
    Ok(())
}

const HELP: &[(&str, &str)] = &[
    (
        "SHOW POOLS",
        "each pool: clients active and waiting, server connections",
    ),
    ("SHOW CLIENTS", "each client connection"),
    ("SHOW SERVERS", "each pooled server connection"),
    (
        "SHOW STATS",
        "per database: totals and the last period's averages",
    ),
    ("SHOW STATS_TOTALS", "per database: totals"),
    (
        "SHOW STATS_AVERAGES",
        "per database: the last period's averages",
    ),
    (
        "SHOW DATABASES",
        "each configured database and where it goes",
    ),
    ("SHOW CONFIG", "every setting"),
    ("SHOW VERSION", "handoff's version"),
    (
        "SHOW LISTS",
        "counts of databases, users, pools, clients, servers",
    ),
    ("SHOW SHARDS", "each shard: state, epoch, primary, buffer"),
    (
        "SHOW STANDBYS",
        "each shard's hosts as readers: rotation, lag, upstream",
    ),
    (
        "SHOW MANAGERS",
        "each HA manager's members: role, leader, what handoff serves",
    ),
    ("SHOW BUFFERS", "each shard's failover buffer"),
    (
        "PAUSE [db]",
        "hold new transactions (the shard of db, or every shard); lameduck the rest",
    ),
    (
        "RESUME [db]",
        "release what PAUSE held, to the same primary",
    ),
    (
        "RECONNECT [db]",
        "close server connections as their transactions end",
    ),
    (
        "KILL db",
        "drop every client and server connection of db now",
    ),
    (
        "SWITCHOVER shard TO 'host:port'",
        "a planned switchover run by handoff",
    ),
    ("SHUTDOWN", "stop handoff (gracefully, as on SIGTERM)"),
];

/// The pools on each shard's current primary, then the read pools on its standbys,
/// sorted.
fn live_pools(ctx: &Ctx) -> Vec<PoolSnapshot> {
    let shard = &ctx.actions.shard;
    let mut v: Vec<PoolSnapshot> = shard
        .pools
        .list()
        .iter()
        .chain(shard.read_pools.list().iter())
        .map(|p| p.snapshot())
        .filter(|p| !p.retired)
        .collect();
    v.sort_by(|a, b| {
        (a.reads, &a.database, &a.user, &a.shard, a.addr.to_string()).cmp(&(
            b.reads,
            &b.database,
            &b.user,
            &b.shard,
            b.addr.to_string(),
        ))
    });
    v
}

/// `primary`, or `standby` for a read pool.
fn role(p: &PoolSnapshot) -> &'static str {
    if p.reads {
        "standby"
    } else {
        "primary"
    }
}

fn pools(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("database", T),
        ("user", T),
        ("cl_active", I),
        ("cl_waiting", I),
        ("cl_active_cancel_req", I),
        ("cl_waiting_cancel_req", I),
        ("sv_active", I),
        ("sv_active_cancel", I),
        ("sv_being_canceled", I),
        ("sv_idle", I),
        ("sv_used", I),
        ("sv_tested", I),
        ("sv_login", I),
        ("maxwait", I),
        ("maxwait_us", I),
        ("pool_mode", T),
        ("shard", T),
        ("primary", T),
        ("role", T),
    ];
    let clients = ctx.clients.list();
    let rows: Vec<Row> = live_pools(ctx)
        .into_iter()
        .map(|p| {
            let shard_index = ctx.actions.shards.iter().position(|s| s.name == p.shard);
            let mine = |state: ClientState| {
                clients
                    .iter()
                    .filter(|c| c.state() == state)
                    .filter(|c| {
                        c.login().is_some_and(|l| {
                            // A reader's clients are those of `db@replica` / `db@any`.
                            let reader = crate::config::Target::split(&l.database)
                                .is_ok_and(|(_, t)| t != crate::config::Target::Primary);
                            reader == p.reads
                                && *l.user == *p.user
                                && l.route.as_ref().is_some_and(|(i, db)| {
                                    Some(*i) == shard_index && **db == *p.database
                                })
                        })
                    })
                    .count()
            };
            vec![
                s(&p.database),
                s(&p.user),
                s(mine(ClientState::Active)),
                s(mine(ClientState::Waiting)),
                s(0),
                s(0),
                s(p.active),
                s(0),
                s(0),
                s(p.idle),
                s(0),
                s(0),
                s(p.login),
                s(p.max_wait.as_secs()),
                s(p.max_wait.subsec_micros()),
                s(pool_mode(ctx)),
                s(&p.shard),
                s(&p.addr),
                s(role(&p)),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

/// The columns of `SHOW CLIENTS` and `SHOW SERVERS` (PgBouncer 1.18's).
const CONN_COLS: &[(&str, ColumnType)] = &[
    ("type", T),
    ("user", T),
    ("database", T),
    ("state", T),
    ("addr", T),
    ("port", I),
    ("local_addr", T),
    ("local_port", I),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I),
    ("wait_us", I),
    ("close_needed", I),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I),
    ("tls", T),
    ("application_name", T),
];

fn clients(ctx: &Ctx, out: &mut Out) {
    let mut cols = CONN_COLS.to_vec();
    cols.push(("shard", T));
    let rows: Vec<Row> = ctx
        .clients
        .list()
        .into_iter()
        .map(|c| {
            let login = c.login();
            let state = c.state();
            let waited = if state == ClientState::Waiting {
                SystemTime::now()
                    .duration_since(c.changed())
                    .unwrap_or_default()
            } else {
                Duration::ZERO
            };
            let shard = login
                .and_then(|l| l.route.as_ref())
                .map(|(i, _)| ctx.actions.shards[*i].name.clone());
            vec![
                s("C"),
                login.map(|l| l.user.to_string()),
                login.map(|l| l.database.to_string()),
                s(state.as_str()),
                s(c.addr.ip()),
                s(c.addr.port()),
                c.local.map(|a| a.ip().to_string()),
                c.local.map(|a| a.port().to_string()),
                s(fmt_time(c.connected())),
                s(fmt_time(c.changed())),
                s(waited.as_secs()),
                s(waited.subsec_micros()),
                s(0),
                s(format!("{:x}", c.id)),
                None,
                s(0),
                login.and_then(|l| l.tls.then(|| "TLS".to_string())),
                login.map(|l| l.application_name.to_string()),
                shard,
            ]
        })
        .collect();
    out.table(&cols, &rows);
}

fn servers(ctx: &Ctx, out: &mut Out) {
    let mut cols = CONN_COLS.to_vec();
    cols.push(("shard", T));
    cols.push(("role", T));
    let mut rows: Vec<Row> = Vec::new();
    for p in live_pools(ctx) {
        for (m, idle) in &p.servers {
            rows.push(vec![
                s("S"),
                s(&p.user),
                s(&p.database),
                s(if *idle { "idle" } else { "active" }),
                s(m.peer.ip()),
                s(m.peer.port()),
                m.local.map(|a| a.ip().to_string()),
                m.local.map(|a| a.port().to_string()),
                s(fmt_time(m.connected)),
                s(fmt_time(m.connected)),
                s(0),
                s(0),
                s(0),
                s(format!("{:x}", m.pid)),
                None,
                s(m.pid),
                m.tls.then(|| "TLS".to_string()),
                None,
                s(&p.shard),
                s(role(&p)),
            ]);
        }
    }
    out.table(&cols, &rows);
}

fn stats(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("database", T),
        ("total_xact_count", I),
        ("total_query_count", I),
        ("total_received", I),
        ("total_sent", I),
        ("total_xact_time", I),
        ("total_query_time", I),
        ("total_wait_time", I),
        ("avg_xact_count", I),
        ("avg_query_count", I),
        ("avg_recv", I),
        ("avg_sent", I),
        ("avg_xact_time", I),
        ("avg_query_time", I),
        ("avg_wait_time", I),
    ];
    let rows: Vec<Row> = ctx
        .clients
        .totals()
        .into_iter()
        .map(|(db, t)| {
            let a = ctx.clients.averages(&db);
            vec![
                s(&db),
                s(t.xacts),
                s(t.queries),
                s(t.received),
                s(t.sent),
                s(t.xact_us),
                s(t.query_us),
                s(t.wait_us),
                s(a.xact_count),
                s(a.query_count),
                s(a.recv),
                s(a.sent),
                s(a.xact_time),
                s(a.query_time),
                s(a.wait_time),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

fn stats_totals(ctx: &Ctx, out: &mut Out, averages: bool) {
    const COLS: &[(&str, ColumnType)] = &[
        ("database", T),
        ("xact_count", I),
        ("query_count", I),
        ("bytes_received", I),
        ("bytes_sent", I),
        ("xact_time", I),
        ("query_time", I),
        ("wait_time", I),
    ];
    let rows: Vec<Row> = ctx
        .clients
        .totals()
        .into_iter()
        .map(|(db, t)| {
            let t = if averages {
                let a = ctx.clients.averages(&db);
                Totals {
                    xacts: a.xact_count,
                    queries: a.query_count,
                    received: a.recv,
                    sent: a.sent,
                    xact_us: a.xact_time,
                    query_us: a.query_time,
                    wait_us: a.wait_time,
                }
            } else {
                t
            };
            vec![
                s(&db),
                s(t.xacts),
                s(t.queries),
                s(t.received),
                s(t.sent),
                s(t.xact_us),
                s(t.query_us),
                s(t.wait_us),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

mod settings;
mod shards;

use settings::{config, databases, lists};
pub(crate) use shards::switchover_report;
use shards::{buffers, managers, shards, standbys};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn times_read_as_pgbouncer_writes_them() {
        assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_976_416);
        assert_eq!(fmt_time(t), "2026-11-29 18:20:16 UTC");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(fmt_time(leap), "2000-02-29 00:00:00 UTC");
    }
}
