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
use crate::config::{Applies, PoolMode, VARIABLES};

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

/// The pools on each shard's current primary, sorted.
fn live_pools(ctx: &Ctx) -> Vec<PoolSnapshot> {
    let mut v: Vec<PoolSnapshot> = ctx
        .actions
        .shard
        .pools
        .list()
        .iter()
        .map(|p| p.snapshot())
        .filter(|p| !p.retired)
        .collect();
    v.sort_by(|a, b| (&a.database, &a.user, &a.shard).cmp(&(&b.database, &b.user, &b.shard)));
    v
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
                            l.user == p.user
                                && l.route.as_ref().is_some_and(|(i, db)| {
                                    Some(*i) == shard_index && *db == p.database
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
                login.map(|l| l.user.clone()),
                login.map(|l| l.database.clone()),
                s(state.as_str()),
                s(c.addr.ip()),
                s(c.addr.port()),
                c.local.map(|a| a.ip().to_string()),
                c.local.map(|a| a.port().to_string()),
                s(fmt_time(c.connected)),
                s(fmt_time(c.changed())),
                s(waited.as_secs()),
                s(waited.subsec_micros()),
                s(0),
                s(format!("{:x}", c.id)),
                None,
                s(0),
                login.and_then(|l| l.tls.then(|| "TLS".to_string())),
                login.map(|l| l.application_name.clone()),
                shard,
            ]
        })
        .collect();
    out.table(&cols, &rows);
}

fn servers(ctx: &Ctx, out: &mut Out) {
    let mut cols = CONN_COLS.to_vec();
    cols.push(("shard", T));
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

fn databases(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("name", T),
        ("host", T),
        ("port", I),
        ("database", T),
        ("force_user", T),
        ("pool_size", I),
        ("min_pool_size", I),
        ("reserve_pool", I),
        ("pool_mode", T),
        ("max_connections", I),
        ("current_connections", I),
        ("paused", I),
        ("disabled", I),
        ("shard", T),
    ];
    let cfg = &ctx.config;
    let mut routes: Vec<(String, &crate::config::DatabaseRoute)> =
        cfg.databases.iter().map(|(n, r)| (n.clone(), r)).collect();
    routes.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(r) = &cfg.default_route {
        routes.push(("*".to_string(), r));
    }
    let pools = live_pools(ctx);
    let mut rows: Vec<Row> = routes
        .into_iter()
        .map(|(name, r)| {
            let shard = &ctx.actions.shards[r.shard];
            let primary = shard.current().primary.clone();
            let server_db = r.server_db.clone();
            let current: usize = pools
                .iter()
                .filter(|p| p.shard == shard.name)
                .filter(|p| match &server_db {
                    Some(db) => &p.database == db,
                    None => name == "*" || p.database == name,
                })
                .map(|p| p.servers.len() + p.login)
                .sum();
            let paused = shard
                .snapshot(ctx.actions.shard.buffer_idle(&shard.name))
                .state
                .as_str()
                != "serving";
            vec![
                s(&name),
                s(&primary.host),
                s(primary.port),
                server_db.or_else(|| (name != "*").then(|| name.clone())),
                None,
                s(cfg.pool.size),
                s(cfg.pool.min_idle),
                s(0),
                s(pool_mode(ctx)),
                s(0),
                s(current),
                s(u8::from(paused)),
                s(0),
                s(&shard.name),
            ]
        })
        .collect();
    for name in super::NAMES {
        rows.push(vec![
            s(name),
            None,
            s(cfg.listen.port()),
            s(name),
            None,
            s(2),
            s(0),
            s(0),
            s("statement"),
            s(0),
            s(0),
            s(0),
            s(0),
            None,
        ]);
    }
    out.table(COLS, &rows);
}

fn config(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] =
        &[("key", T), ("value", T), ("default", T), ("changeable", T)];
    let rows: Vec<Row> = ctx
        .config
        .shown
        .iter()
        .map(|(k, v, d)| {
            // PgBouncer's "changeable": whether a running process takes a new value.
            let reloads = VARIABLES
                .iter()
                .any(|var| var.name == *k && var.applies == Applies::OnSighup);
            vec![s(k), s(v), s(d), s(if reloads { "yes" } else { "no" })]
        })
        .collect();
    out.table(COLS, &rows);
}

fn lists(ctx: &Ctx, out: &mut Out) {
    let clients = ctx.clients.list();
    let pools = live_pools(ctx);
    let mut users: Vec<&str> = clients
        .iter()
        .filter_map(|c| c.login().map(|l| l.user.as_str()))
        .collect();
    users.sort_unstable();
    users.dedup();
    let databases = ctx.config.databases.len() + usize::from(ctx.config.default_route.is_some());
    let used_servers: usize = pools.iter().map(|p| p.servers.len()).sum();
    let login = clients
        .iter()
        .filter(|c| c.state() == ClientState::Login)
        .count();
    let items: [(&str, usize); 12] = [
        ("databases", databases),
        ("users", users.len()),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", login),
        ("free_servers", 0),
        ("used_servers", used_servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    let rows: Vec<Row> = items.iter().map(|(k, n)| vec![s(k), s(n)]).collect();
    out.table(&[("list", T), ("items", I)], &rows);
}

fn shards(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("name", T),
        ("state", T),
        ("epoch", I),
        ("primary", T),
        ("hosts", T),
        ("source", T),
        ("in_flight", I),
        ("buffer_state", T),
        ("buffer_depth", I),
        ("since_ms", I),
        ("reason", T),
        ("split_brain", T),
        ("watched", T),
    ];
    let answer = crate::actions::shards(&ctx.actions);
    let rows: Vec<Row> = answer
        .shards
        .iter()
        .map(|sh| {
            vec![
                s(&sh.name),
                s(&sh.state),
                Some(sh.epoch.to_string()),
                s(&sh.primary),
                Some(sh.hosts.join(",")),
                s(&sh.source),
                Some(sh.in_flight.to_string()),
                s(&sh.buffer.state),
                Some(sh.buffer.depth.to_string()),
                Some(sh.since_ms.to_string()),
                s(&sh.reason),
                Some(sh.split_brain.join(",")),
                Some(
                    sh.watched
                        .iter()
                        .map(|w| w.host.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

fn buffers(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("shard", T),
        ("state", T),
        ("depth", I),
        ("size", I),
        ("bytes_all_shards", I),
        ("max_bytes", I),
        ("window_ms", I),
        ("reason", T),
    ];
    let b = &ctx.actions.shard.buffer;
    let cfg = &ctx.config.buffer;
    let rows: Vec<Row> = ctx
        .actions
        .shards
        .iter()
        .map(|sh| {
            let state = match b.state(&sh.name) {
                Some(handoff_buffer::State::Idle) | None => "idle",
                Some(handoff_buffer::State::Buffering) => "buffering",
                Some(handoff_buffer::State::Draining) => "draining",
            };
            vec![
                s(&sh.name),
                s(state),
                s(b.depth(&sh.name)),
                s(cfg.size),
                s(b.bytes()),
                s(cfg.max_bytes),
                s(cfg.window.as_millis()),
                b.reason(&sh.name).filter(|r| !r.is_empty()),
            ]
        })
        .collect();
    out.table(COLS, &rows);
}

/// A switchover's report as one row.
pub(crate) fn switchover_report(report: &crate::api::report::SwitchoverReport, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("shard", T),
        ("from", T),
        ("to", T),
        ("outcome", T),
        ("epoch", I),
        ("total_ms", T),
        ("steps", T),
    ];
    let steps = report
        .steps
        .iter()
        .map(|st| format!("{} {} ms", st.step, st.ms))
        .collect::<Vec<_>>()
        .join(", ");
    let row = vec![
        s(&report.shard),
        s(&report.from),
        s(&report.to),
        s(report.outcome.as_str()),
        Some(report.epoch.to_string()),
        Some(report.total_ms.to_string()),
        Some(steps),
    ];
    out.table_tagged(COLS, &[row], "SWITCHOVER");
}

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
