//! `SHOW DATABASES`, `SHOW CONFIG` and `SHOW LISTS`: what is configured, and how many of
//! each thing there are.

use handoff_protocol::backend::ColumnType::{self, Int8 as I, Text as T};

use super::{live_pools, pool_mode, s, Row};
use crate::clients::ClientState;
use crate::config::{Applies, VARIABLES};
use crate::console::{Ctx, Out};

pub(super) fn databases(ctx: &Ctx, out: &mut Out) {
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
    for name in crate::console::NAMES {
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

pub(super) fn config(ctx: &Ctx, out: &mut Out) {
    const COLS: &[(&str, ColumnType)] = &[
        ("key", T),
        ("value", T),
        ("default", T),
        ("changeable", T),
        ("applies", T),
    ];
    let rows: Vec<Row> = ctx
        .config
        .shown
        .iter()
        .map(|(k, v, d)| {
            // PgBouncer's "changeable": whether a running process takes a new value;
            // "applies": how (SIGHUP, a takeover by a new process, or a restart).
            let applies = VARIABLES
                .iter()
                .find(|var| var.name == *k)
                .map_or(Applies::Restart, |var| var.applies);
            let (changeable, how) = match applies {
                Applies::OnSighup => ("yes", "sighup"),
                Applies::Takeover => ("no", "takeover"),
                Applies::Restart => ("no", "restart"),
            };
            vec![s(k), s(v), s(d), s(changeable), s(how)]
        })
        .collect();
    out.table(COLS, &rows);
}

pub(super) fn lists(ctx: &Ctx, out: &mut Out) {
    let clients = ctx.clients.list();
    let pools = live_pools(ctx);
    let mut users: Vec<&str> = clients
        .iter()
        .filter_map(|c| c.login().map(|l| &*l.user))
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
